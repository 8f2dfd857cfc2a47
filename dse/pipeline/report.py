"""``report.md`` and ``report.html``: what a run measured, drawn only from the files the run wrote.

The report is a list of sections (text, tables, PNG plots). The same structure renders to Markdown
(plots as relative links) and to one self-contained HTML page (plots inlined as base64), so the two
never disagree. A stage that did not run (or whose file is missing) says so instead of guessing.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dse.fileio import atomic_write_text

log = logging.getLogger(__name__)

CHOICE_COLOURS = {"mult": "#4C72B0", "shift": "#DD8452", "moe": "#55A868", "msa": "#8172B3",
                  "hamming": "#C44E52", "dense": "#999999"}


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)


def _read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return ""
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


# ---------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_profile(profile: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """Grouped bars per GEMM-like shape: each primitive (TVM) and the PyTorch dense baseline."""
    gemm = profile[profile["primitive"].isin(["matmul", "matshift", "matshift_decode", "matadd", "bmm"])].copy()
    if gemm.empty or metric not in gemm:
        return None
    gemm["label"] = gemm.apply(lambda r: f"{int(r.batch)}x{int(r.m)}x{int(r.k)}x{int(r.n)}", axis=1)
    gemm["series"] = gemm.apply(lambda r: r.primitive if r.get("backend", "tvm") == "tvm"
                                else f"pytorch {r.primitive}", axis=1)
    table = gemm.pivot_table(index="label", columns="series", values=metric, aggfunc="min")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(table)), 4.2))
    table.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel({"latency_ms": "latency (ms, median)", "energy_mj": "energy (mJ)"}.get(metric, metric))
    ax.set_xlabel("kernel shape b x m x k x n")
    ax.set_yscale("log")
    ax.set_title(f"Per-shape {metric.split('_')[0]}: mult vs shift vs add vs PyTorch")
    ax.legend(fontsize=8, ncol=3)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_assignment(assignment: dict[str, Any], path: Path) -> Path | None:
    """A block x layer grid coloured by choice."""
    choices = {**assignment.get("attention", {}), **assignment.get("linear", {})}
    if not choices:
        return None
    rows: dict[str, dict[str, str]] = {}
    for name, choice in choices.items():
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] == "blocks" else ".".join(parts[:4])
        role = ".".join(parts[len(block.split(".")):]) or "attn"
        rows.setdefault(block, {})[role] = choice
    roles = sorted({r for v in rows.values() for r in v}, key=lambda r: (r != "attn", r))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.4 * len(roles) + 2, 0.5 * len(rows) + 1.2))
    for i, block in enumerate(rows):
        for j, role in enumerate(roles):
            choice = rows[block].get(role, "dense")
            ax.add_patch(plt.Rectangle((j, i), 0.95, 0.9, color=CHOICE_COLOURS.get(choice, "#cccccc")))
            ax.text(j + 0.47, i + 0.45, choice, ha="center", va="center", fontsize=8, color="white")
    ax.set_xlim(0, len(roles))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([j + 0.47 for j in range(len(roles))], roles, fontsize=8)
    ax.set_yticks([i + 0.45 for i in range(len(rows))], list(rows), fontsize=8)
    ax.set_title("Chosen assignment per block")
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _recipe_stage_b(root: Path) -> tuple[pd.DataFrame, str] | None:
    """(metrics, folder) of the stage-B fine-tune of the recipe (every Linear a MoE), if the search ran it."""
    for cand in sorted((root / "search" / "stage_b").glob("*/candidate.yaml")):
        try:
            linear = (yaml.safe_load(cand.read_text()) or {}).get("linear") or {}
        except (OSError, yaml.YAMLError):
            continue
        metrics = _read_csv(cand.parent / "metrics.csv")
        if linear and set(linear.values()) == {"moe"} and metrics is not None and not metrics.empty:
            return metrics, str(cand.parent.relative_to(root))
    return None


def plot_routing(metrics: pd.DataFrame, path: Path) -> Path | None:
    """Final Mult share per MoE layer next to the cost-model equilibrium (and the first epoch's)."""
    share_cols = [c for c in metrics.columns if c.startswith("mult_share/")]
    if not share_cols:
        return None
    layers = [c.split("/", 1)[1] for c in share_cols]
    first, last = metrics.iloc[0], metrics.iloc[-1]
    plt = _plt()
    import numpy as np

    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(layers)), 4))
    ax.bar(x - 0.27, [first[f"mult_share/{n}"] for n in layers], 0.27, label="epoch 1", color="#bbbbbb")
    ax.bar(x, [last[f"mult_share/{n}"] for n in layers], 0.27, label=f"epoch {int(last['epoch'])}",
           color=CHOICE_COLOURS["mult"])
    eq = [last.get(f"eq_share/{n}", float("nan")) for n in layers]
    ax.bar(x + 0.27, eq, 0.27, label="cost-model equilibrium", color=CHOICE_COLOURS["moe"])
    ax.set_xticks(x, layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of tokens to the Mult expert")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("MoE routing vs the latency-aware equilibrium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(values: dict[str, float], ylabel: str, title: str, path: Path,
              markers: dict[str, float] | None = None) -> Path | None:
    values = {k: v for k, v in values.items() if v is not None and v == v}
    if not values:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(values)), 3.6))
    bars = ax.bar(list(values), list(values.values()), color="#4C72B0")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for i, name in enumerate(values):
        if markers and markers.get(name) is not None:
            ax.plot([i - 0.4, i + 0.4], [markers[name]] * 2, color="#C44E52", lw=2,
                    label="cost-model prediction" if i == 0 or not ax.get_legend_handles_labels()[0] else None)
    if markers:
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# Sections


def build_sections(root: Path, summary: dict[str, Any]) -> list[Section]:
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    return [
        _device_section(root, summary),
        _profile_section(summary, plots),
        _search_section(root),
        _assignment_section(root, plots),
        _finetune_section(root, plots),
        _accuracy_section(summary, plots),
        _bench_section(root, plots),
    ]


def _device_section(root: Path, summary: dict[str, Any]) -> Section:
    env = _read_json(root / "env.json") or {}
    s = Section("Device and versions")
    if env:
        v = env.get("versions", {})
        s.text.append(f"CPU: {env.get('cpu', {}).get('name')} ({env.get('cpu', {}).get('cores')} cores); "
                      f"GPU: {', '.join(env.get('gpus') or []) or 'none'}; energy sources: "
                      + ", ".join(f"{k} ({val})" for k, val in env.get("energy_sources", {}).items()))
        s.tables.append(("Versions", [{"package": k, "version": val} for k, val in v.items() if val]))
    else:
        s.text.append("env.json missing: the run did not record its environment.")
    stages = summary.get("stages", [])
    if stages:
        s.tables.append(("Stages", [{"stage": st["name"], "status": "reused" if st["reused"] else "ran",
                                     "seconds": round(st["seconds"], 1),
                                     "seconds when it ran": round(st["ran_seconds"], 1)}
                                    for st in stages]))
    return s


def _profile_section(summary: dict[str, Any], plots: Path) -> Section:
    prof_path = summary.get("profile_csv")
    rows_path = summary.get("model_rows_csv")
    s = Section("Profile: measured kernels on this device")
    whole = _read_csv(Path(prof_path)) if prof_path else None
    prof = _read_csv(Path(rows_path)) if rows_path else whole
    if prof is None or prof.empty:
        s.text.append("No profile was found for this run.")
        return s
    of = f" of the {len(whole)} in the device's profile (other models, calibration shapes)" if (
        whole is not None and len(whole) > len(prof)) else ""
    s.text.append(f"From `{rows_path or prof_path}`: the {len(prof)} rows that price this model{of}, taken "
                  f"from `{prof_path}`. Latency is the median of TVM's time evaluator "
                  "(PyTorch rows: median of timed eager calls); energy is labelled with its source.")
    gemm = prof[prof["primitive"].isin(["matmul", "matshift", "matshift_decode", "matadd", "bmm"])]
    cols = [c for c in ("primitive", "backend", "batch", "m", "k", "n", "latency_ms", "latency_ms_p90",
                        "energy_mj", "energy_source", "schedule") if c in gemm.columns]
    s.tables.append(("Primitive rows", gemm[cols].to_dict("records")))
    for metric in ("latency_ms", "energy_mj"):
        p = plot_profile(prof, metric, plots / f"profile_{metric.split('_')[0]}.png")
        if p:
            s.images.append((f"Per-shape {metric}", p))
    return s


def _search_section(root: Path) -> Section:
    s = Section("Search: Pareto front")
    pareto = _read_csv(root / "search" / "pareto.csv")
    if pareto is not None and not pareto.empty:
        cols = [c for c in ("trial", "source", "baseline", "latency_ms", "energy_mj", "risk", "accuracy",
                            "feasible", "chosen") if c in pareto.columns]
        s.tables.append(("Front, baselines and stage-B candidates", pareto[cols].head(20).to_dict("records")))
        if (root / "search" / "pareto.png").exists():
            s.images.append(("Pareto front (baselines marked)", root / "search" / "pareto.png"))
    else:
        s.text.append("The search stage did not run or wrote no pareto.csv.")
    return s


def _assignment_section(root: Path, plots: Path) -> Section:
    s = Section("Chosen assignment")
    chosen = _read_yaml(root / "search" / "best_assignment.yaml") or _read_yaml(root / "finetune" / "assignment.yaml")
    if isinstance(chosen, dict):
        counts: dict[str, int] = {}
        for choice in {**chosen.get("attention", {}), **chosen.get("linear", {})}.values():
            counts[choice] = counts.get(choice, 0) + 1
        s.text.append("Layers per choice: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        p = plot_assignment(chosen, plots / "assignment.png")
        if p:
            s.images.append(("Assignment per block", p))
    else:
        s.text.append("No assignment was chosen.")
    return s


def _finetune_section(root: Path, plots: Path) -> Section:
    s = Section("Fine-tuning and MoE routing")
    ft = _read_csv(root / "finetune" / "metrics.csv")
    if ft is None or ft.empty:
        s.text.append("The fine-tune stage did not run.")
        return s
    last = ft.iloc[-1]
    s.text.append(f"{len(ft)} epochs; final validation top-1 {last['val_acc']:.2f}%.")
    routed, where = ft, "the chosen design"
    if not [c for c in ft.columns if c.startswith("mult_share/")]:
        recipe = _recipe_stage_b(root)
        s.text.append("The chosen assignment has no MoE layer" + (
            f"; the routing below is the recipe's stage-B fine-tune ({recipe[1]}, {len(recipe[0])} epochs)."
            if recipe else "."))
        if recipe:
            routed, where = recipe
    share_cols = [c for c in routed.columns if c.startswith("mult_share/")]
    if share_cols:
        last_r = routed.iloc[-1]
        s.tables.append((f"Mult share per MoE layer (final epoch) vs equilibrium: {where}", [
            {"layer": c.split("/", 1)[1], "epoch 1": routed.iloc[0][c], "final": last_r[c],
             "equilibrium": last_r.get("eq_share/" + c.split("/", 1)[1])} for c in share_cols]))
        p = plot_routing(routed, plots / "routing.png")
        if p:
            s.images.append(("Routing share vs equilibrium", p))
    return s


def _accuracy_section(summary: dict[str, Any], plots: Path) -> Section:
    s = Section("Accuracy")
    acc = summary.get("accuracy", {})
    if acc:
        s.tables.append(("Validation top-1 (%)", [{"model": k, "top-1": v.get("acc"), "epochs": v.get("epochs"),
                                                   "source": v.get("source")} for k, v in acc.items()]))
        p = plot_bars({k: v.get("acc") for k, v in acc.items()}, "top-1 (%)", "Validation accuracy",
                      plots / "accuracy.png")
        if p:
            s.images.append(("Accuracy", p))
    return s


def _bench_section(root: Path, plots: Path) -> Section:
    s = Section("Bench: exported model vs dense PyTorch")
    bench = _read_json(root / "bench" / "bench.json")
    if isinstance(bench, dict) and bench.get("rows"):
        s.tables.append(("Latency (same inputs, same batch, one run)", bench["rows"]))
        lat = {r["model"]: r.get("median_ms") for r in bench["rows"]}
        pred = {r["model"]: r.get("predicted_ms") for r in bench["rows"]}
        p = plot_bars(lat, "latency (ms, median)", "Exported ShiftAddViT vs dense PyTorch", plots / "bench.png",
                      markers=pred)
        if p:
            s.images.append(("Bench", p))
        for note in bench.get("notes", []):
            s.text.append(note)
    else:
        s.text.append("The bench stage did not run.")
    return s


# ---------------------------------------------------------------------------------------------------
# Rendering


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(title: str, sections: list[Section], root: Path) -> str:
    parts = [f"# {title}", ""]
    for s in sections:
        parts += [f"## {s.title}", ""]
        parts += [t + "\n" for t in s.text]
        for caption, rows in s.tables:
            parts += [f"**{caption}**", "", _md_table(rows), ""]
        for caption, path in s.images:
            parts += [f"![{caption}]({path.relative_to(root).as_posix()})", ""]
    return "\n".join(parts)


def render_html(title: str, sections: list[Section]) -> str:
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.2em}"
           "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
           "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}h2{border-bottom:1px solid #ddd}")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        out += [f"<p>{html.escape(t)}</p>" for t in s.text]
        for caption, rows in s.tables:
            out.append(f"<p><b>{html.escape(caption)}</b></p>")
            if rows:
                cols = list(rows[0])
                out.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + "</tr>")
                for r in rows:
                    out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>")
                out.append("</table>")
        for caption, path in s.images:
            data = base64.b64encode(path.read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(root: Path, summary: dict[str, Any], title: str = "ShiftAddDSE run report") -> dict[str, Path]:
    sections = build_sections(root, summary)
    md, page = root / "report.md", root / "report.html"
    atomic_write_text(md, render_markdown(title, sections, root))
    atomic_write_text(page, render_html(title, sections))
    return {"markdown": md, "html": page}
