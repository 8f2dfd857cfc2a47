"""Pareto-front arithmetic for the search (all objectives minimised) and the front's plot.

Dominance (Deb et al., NSGA-II, IEEE TEC 2002): ``a`` dominates ``b`` when ``a <= b`` in every objective and
``a < b`` in at least one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def nondominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` [n, objectives]; exact duplicates of a front
    point are all kept (de-duplicate beforehand if needed)."""
    pts = np.asarray(points, dtype=float)
    n = len(pts)
    mask = np.ones(n, dtype=bool)
    # Sorting by the first objective means only earlier rows can dominate a row (ties handled by <=/<).
    order = np.lexsort(pts.T[::-1])
    front: list[int] = []
    for i in order:
        p = pts[i]
        if front:
            f = pts[front]  # [k, objectives]
            if np.any(np.all(f <= p, axis=1) & np.any(f < p, axis=1)):
                mask[i] = False
                continue
        front.append(i)
    return mask


def dominated_by(point: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``points`` that dominate ``point``."""
    pts = np.asarray(points, dtype=float)
    return np.flatnonzero(np.all(pts <= point, axis=1) & np.any(pts < point, axis=1))


def spread(points: np.ndarray, k: int, start: int | None = None) -> list[int]:
    """``k`` row indices spread over ``points`` by farthest-point sampling in min-max normalised objective
    space (Gonzalez, 1985: a 2-approximation of the max-min spacing), starting at ``start`` (default: the
    row with the smallest first objective)."""
    pts = np.asarray(points, dtype=float)
    if k <= 0 or len(pts) == 0:
        return []
    lo, hi = pts.min(0), pts.max(0)
    z = (pts - lo) / np.where(hi > lo, hi - lo, 1.0)  # [n, objectives] in [0, 1]
    first = int(np.argmin(pts[:, 0])) if start is None else start
    chosen = [first]
    dist = np.linalg.norm(z - z[first], axis=1)
    while len(chosen) < min(k, len(pts)):
        nxt = int(np.argmax(dist))
        if dist[nxt] <= 0:
            break  # only duplicates left
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(z - z[nxt], axis=1))
    return chosen


def plot_front(
    path: Path,
    all_points: np.ndarray,
    front_rows: Sequence[dict[str, Any]],
    baselines: Sequence[dict[str, Any]],
    *,
    chosen: dict[str, Any] | None = None,
    latency_budget: float | None = None,
    energy_budget: float | None = None,
    title: str = "",
    energy_source: str = "unknown",
) -> Path:
    """Two panels — latency vs accuracy-risk proxy and latency vs energy — with every evaluated trial in
    grey, the front in colour (by energy), baselines marked and named, stage-B accuracies written next to
    their points and the chosen design starred. Rendered with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    pts = np.asarray(all_points, dtype=float).reshape(-1, 3)
    f_lat = np.array([r["latency_ms"] for r in front_rows], dtype=float)
    f_en = np.array([r["energy_mj"] for r in front_rows], dtype=float)
    f_risk = np.array([r["risk"] for r in front_rows], dtype=float)
    panels = (
        (axes[0], 2, f_risk, "accuracy-risk proxy (sum of per-layer loss increase)"),
        (axes[1], 1, f_en, f"predicted energy (mJ, source: {energy_source})"),
    )
    for ax, col, fy, ylabel in panels:
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, col], s=4, c="0.8", label="evaluated", rasterized=True)
        sc = ax.scatter(
            f_lat, fy, s=18, c=f_en if col == 2 else f_risk, cmap="viridis", label="Pareto front", zorder=3
        )
        fig.colorbar(sc, ax=ax, label=f"energy (mJ, {energy_source})" if col == 2 else "risk")
        for b in baselines:
            y = b["risk"] if col == 2 else b["energy_mj"]
            ax.scatter([b["latency_ms"]], [y], s=90, marker="D", facecolors="none", edgecolors="C3", zorder=4)
            acc = b.get("accuracy")
            label = b["baseline"] if acc is None or np.isnan(acc) else f"{b['baseline']} ({acc:.1f}%)"
            ax.annotate(
                label,
                (b["latency_ms"], y),
                xytext=(5, 5),
                textcoords="offset points",
                color="C3",
                fontsize=8,
            )
        for r in front_rows:
            if r.get("accuracy") is not None and not np.isnan(r["accuracy"]):
                y = r["risk"] if col == 2 else r["energy_mj"]
                ax.annotate(
                    f"{r['accuracy']:.1f}%",
                    (r["latency_ms"], y),
                    xytext=(4, -10),
                    textcoords="offset points",
                    fontsize=7,
                    color="C0",
                )
        if chosen is not None:
            y = chosen["risk"] if col == 2 else chosen["energy_mj"]
            ax.scatter(
                [chosen["latency_ms"]],
                [y],
                s=220,
                marker="*",
                c="gold",
                edgecolors="k",
                zorder=5,
                label="chosen",
            )
        if latency_budget is not None:
            ax.axvline(latency_budget, ls="--", c="C1", lw=1, label="latency budget")
        if energy_budget is not None and col == 1:
            ax.axhline(energy_budget, ls="--", c="C2", lw=1, label="energy budget")
        ax.set_xlabel("predicted latency (ms)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
