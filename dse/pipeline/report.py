"""``report.md`` and ``report.html``: what a run measured, drawn only from the files the run wrote.

The report is a list of sections (text, tables, PNG plots). The same structure renders to Markdown
(plots as relative links) and to one self-contained HTML page (plots inlined as base64), so the two
never disagree. A stage that did not run (or whose file is missing) says so instead of guessing.

It opens with a verdict of at most five lines: does reparameterisation pay on this device? The measured
speed-up that answers it is the exported design's over the dense model compiled by the same TVM pipeline
(``bench.json``: ``speedup_vs_dense_tvm``), not over PyTorch (which also holds the compiler's gain). When
the search chose the dense design, its predictions (``pareto.csv``) say by how much the fastest ShiftAdd
design loses.
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

from dse.cost import provenance
from dse.cost.calibration import Calibration
from dse.fileio import atomic_write_text
from dse.pipeline.stages import stage_status
from dse.training.finetune import COSTS_JSON

log = logging.getLogger(__name__)

CHOICE_COLOURS = {"mult": "#4C72B0", "shift": "#DD8452", "moe": "#55A868", "msa": "#8172B3",
                  "hamming": "#C44E52", "dense": "#999999"}
DENSE_CHOICES = ("msa", "mult")
REPARAM_CHOICES = ("hamming", "shift", "moe")  # the pareto.csv count columns n_<choice> of a ShiftAdd design


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


def fmt_ms(v: float) -> str:
    """A latency in the verdict: three significant digits (at least one decimal below 100 ms)."""
    return f"{v:.{3 if v < 1 else 2 if v < 10 else 1 if v < 100 else 0}f}"


def fmt_x(v: float) -> str:
    """A speed-up (or slow-down) factor in the verdict."""
    return f"{v:.2f}×"


def fmt_change(v: float, digits: int = 2, unit: str = "") -> str:
    """A signed change (accuracy points, energy %), with a true minus sign."""
    return f"{v:+.{digits}f}{unit}".replace("-", "−")


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
    sources = sorted({str(x) for x in gemm.get("energy_source", []) if isinstance(x, str) and x}) or ["unknown"]
    energy = f"energy (mJ, source: {'+'.join(sources)})"
    ax.set_ylabel({"latency_ms": "latency (ms, median)", "energy_mj": energy}.get(metric, metric))
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
        _verdict_section(root, summary),
        _device_section(root, summary),
        _profile_section(summary, plots),
        _search_section(root),
        _assignment_section(root, plots),
        _finetune_section(root, plots),
        _accuracy_section(summary, plots),
        _bench_section(root, plots),
    ]


def _counts(assignment: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{"attention": {choice: layers}, "linear": {...}} of an assignment mapping."""
    out: dict[str, dict[str, int]] = {}
    for kind in ("attention", "linear"):
        for choice in (assignment.get(kind) or {}).values():
            out.setdefault(kind, {})
            out[kind][choice] = out[kind].get(choice, 0) + 1
    return out


def _design(assignment: dict[str, Any]) -> tuple[str, bool]:
    """(the chosen design in words, whether it is the dense all-mult design)."""
    counts = _counts(assignment)
    if all(c in DENSE_CHOICES for per_kind in counts.values() for c in per_kind):
        return "dense (all-mult)", True
    return "; ".join(f"{kind} " + ", ".join(f"{c} {n}" for c, n in sorted(per_kind.items()))
                     for kind, per_kind in counts.items()), False


def _predicted(pareto: pd.DataFrame | None) -> dict[str, Any]:
    """From the search's ``pareto.csv``: the dense design's row and the fastest ShiftAdd design's (a row that
    reparameterises at least one layer), each as a dict, and the chosen row."""
    out: dict[str, Any] = {"dense": None, "shiftadd": None, "chosen": None}
    if pareto is None or pareto.empty or "latency_ms" not in pareto:
        return out
    cols = [f"n_{c}" for c in REPARAM_CHOICES if f"n_{c}" in pareto]
    changed = pareto[cols].fillna(0).sum(axis=1) if cols else pd.Series(0, index=pareto.index)
    for name, rows in (("dense", pareto[changed == 0]), ("shiftadd", pareto[changed > 0])):
        rows = rows[rows["latency_ms"].notna()]
        if len(rows):
            out[name] = rows.loc[rows["latency_ms"].idxmin()].to_dict()
    if "chosen" in pareto:
        chosen = pareto[pareto["chosen"].astype(str).str.lower() == "true"]
        out["chosen"] = chosen.iloc[0].to_dict() if len(chosen) else None
    return out


def _profile_energy_source(summary: dict[str, Any]) -> str:
    stage = next((st for st in summary.get("stages", []) if st.get("name") == "profile"), {})
    return str((stage.get("summary") or {}).get("energy_source") or "unknown")


def _energy_line(bench: dict[str, Any], predicted: dict[str, Any], summary: dict[str, Any]) -> str:
    """Energy of the exported design vs the dense model: measured by the bench against dense (TVM) when it
    has both, else the search's prediction (chosen vs dense design) from the profile."""
    rows = {r.get("contestant"): r for r in bench.get("rows", [])}
    mine, dense = rows.get("tvm") or {}, rows.get("dense_tvm") or {}
    if mine.get("energy_mj") and dense.get("energy_mj"):
        change = 100.0 * (mine["energy_mj"] / dense["energy_mj"] - 1.0)
        return (f"Energy vs dense (TVM): {fmt_change(change, 1, '%')} per batch ({mine['energy_mj']:.3g} vs "
                f"{dense['energy_mj']:.3g} mJ; source: {mine.get('energy_source')}).")
    chosen, base = predicted["chosen"], predicted["dense"]
    if chosen is not None and base is not None and base.get("energy_mj"):
        change = 100.0 * (chosen["energy_mj"] / base["energy_mj"] - 1.0)
        return (f"Energy vs dense: {fmt_change(change, 1, '%')} per batch, predicted by the search (profile energy "
                f"source: {_profile_energy_source(summary)}).")
    return "Energy vs dense: not available (neither the bench nor the search priced both)."


MIN_SPREAD = 0.02  # below 2% a speed-up is not told apart from the host's drift between interleaved rounds


def _timing_spread(bench: dict[str, Any]) -> float:
    """How far the exported design's and dense (TVM)'s p90 lie above their medians (the larger, at least
    :data:`MIN_SPREAD`): a speed-up inside it is not a measured one."""
    rows = [r for r in bench.get("rows", []) if r.get("contestant") in ("tvm", "dense_tvm") and r.get("median_ms")]
    return max([MIN_SPREAD, *(r["p90_ms"] / r["median_ms"] - 1.0 for r in rows if r.get("p90_ms"))])


def _verdict_section(root: Path, summary: dict[str, Any]) -> Section:
    """At most five lines (module docstring): the answer, the chosen design, the measured speed-ups, the
    accuracy change, the energy change."""
    s = Section("Verdict")
    bench = _read_json(root / "bench" / "bench.json")
    bench = bench if isinstance(bench, dict) and bench.get("rows") else {}
    chosen = _read_yaml(root / "search" / "best_assignment.yaml") or _read_yaml(root / "finetune" / "assignment.yaml")
    predicted = _predicted(_read_csv(root / "search" / "pareto.csv"))
    device = (bench.get("device") or {}).get("name") or "this device"
    medians = {r.get("contestant"): r.get("median_ms") for r in bench.get("rows", [])}
    acc = summary.get("accuracy") or {}
    points = (acc["chosen"]["acc"] - acc["dense"]["acc"]) if "chosen" in acc and "dense" in acc else None
    accuracy = f"accuracy {fmt_change(points)} points" if points is not None else "accuracy change not measured"
    design, dense_chosen = _design(chosen) if isinstance(chosen, dict) else ("none chosen", False)
    vs_dense, vs_eager = bench.get("speedup_vs_dense_tvm"), bench.get("speedup_vs_eager")

    if dense_chosen:
        base, fastest = predicted["dense"], predicted["shiftadd"]
        line = f"On {device}, reparameterisation does not pay for this model: best is the dense model compiled"
        if base is not None and fastest is not None and fastest["latency_ms"] >= base["latency_ms"]:
            line += (f" ({fmt_ms(base['latency_ms'])} ms); the fastest ShiftAdd design is "
                     f"{fmt_ms(fastest['latency_ms'])} ms ({fmt_x(fastest['latency_ms'] / base['latency_ms'])} "
                     "slower; search predictions).")
        elif base is not None and fastest is not None:
            line += (f" ({fmt_ms(base['latency_ms'])} ms); the fastest ShiftAdd design is predicted "
                     f"{fmt_x(base['latency_ms'] / fastest['latency_ms'])} faster ({fmt_ms(fastest['latency_ms'])} ms) "
                     "but costs more accuracy (or risk) than search.max_accuracy_drop allows.")
        else:
            line += " (the search's choice; pareto.csv lists no ShiftAdd design to compare)."
    elif not bench:
        line = f"On {device}, nothing was measured: the bench stage did not run (or wrote no bench.json)."
    elif vs_dense is None:
        line = (f"On {device}, ShiftAddViT runs {fmt_x(vs_eager)} vs PyTorch eager ({fmt_ms(medians['tvm'])} ms vs "
                f"{fmt_ms(medians['eager'])} ms), but the dense model compiled by TVM was not measured "
                f"(bench.dense_tvm off), so this includes the compiler's gain; {accuracy}.")
    elif abs(vs_dense - 1.0) <= (spread := _timing_spread(bench)):
        line = (f"On {device}, ShiftAddViT and the dense model compiled by TVM measure the same within the timing "
                f"spread ({fmt_ms(medians['tvm'])} ms vs {fmt_ms(medians['dense_tvm'])} ms, {fmt_x(vs_dense)}; "
                f"p90 spread {100 * spread:.0f}%): the reparameterisation buys nothing measurable here; "
                f"{fmt_x(vs_eager)} vs PyTorch eager; {accuracy}.")
    elif vs_dense >= 1.0:
        line = (f"On {device}, ShiftAddViT pays: {fmt_x(vs_dense)} faster than the dense model compiled by TVM "
                f"({fmt_ms(medians['tvm'])} ms vs {fmt_ms(medians['dense_tvm'])} ms), {fmt_x(vs_eager)} vs PyTorch "
                f"eager; {accuracy}.")
    else:
        line = (f"On {device}, ShiftAddViT does not pay as measured: {fmt_x(1.0 / vs_dense)} slower than the dense "
                f"model compiled by TVM ({fmt_ms(medians['tvm'])} ms vs {fmt_ms(medians['dense_tvm'])} ms; the "
                f"search chose it on predictions), {fmt_x(vs_eager)} vs PyTorch eager; {accuracy}.")
    s.text.append(line)
    s.text.append(f"Chosen design: {design}.")
    if bench:
        gains = [f"{fmt_x(bench[key])} vs {name} at {fmt_ms(medians[contestant])} ms{note}"
                 for key, name, contestant, note in (
                     ("speedup_vs_dense_tvm", "dense (TVM)", "dense_tvm", " (the reparameterisation's own gain)"),
                     ("speedup_vs_eager", "PyTorch eager", "eager", ""),
                     ("speedup_vs_compiled", "torch.compile", "compiled", ""))
                 if bench.get(key) is not None]
        s.text.append(f"Measured speed-up of the exported design ({fmt_ms(medians['tvm'])} ms, batch "
                      f"{bench.get('batch')}): " + "; ".join(gains) + ".")
    if points is not None:
        s.text.append(f"Accuracy vs dense: {fmt_change(points)} points (chosen {acc['chosen']['acc']:.2f}% vs dense "
                      f"{acc['dense']['acc']:.2f}%).")
    s.text.append(_energy_line(bench, predicted, summary))
    return s


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
        s.tables.append(("Stages", [{"stage": st["name"], "status": stage_status(st),
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
    stage = next((st for st in summary.get("stages", []) if st.get("name") == "profile"), {})
    if stage.get("summary", {}).get("load_warning"):
        s.text.append(f"**Warning:** {stage['summary']['load_warning']}.")
    cal = stage.get("summary", {}).get("calibration")
    s.text.append("TVM predictions are " + (f"{Calibration.from_meta(cal).describe()} (in-context factors per group "
                                            "of work, `dse.cost.calibration`)." if cal else
                                            "uncalibrated: the sum of kernels and ops profiled alone."))
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
        cols = [c for c in ("trial", "source", "baseline", "latency_ms", "energy_mj", "energy_source", "cost_source",
                            "risk", "accuracy", "feasible", "chosen") if c in pareto.columns]
        s.tables.append(("Front, baselines and stage-B candidates", pareto[cols].head(20).to_dict("records")))
        if "cost_source" in pareto.columns:
            regressed = pareto[pareto["cost_source"] != provenance.MEASURED]
            if len(regressed):
                s.text.append(f"{len(regressed)} of {len(pareto)} designs are priced partly or wholly without "
                              "measured rows (cost_source: regression = the cost model's fitted law, mixed = some "
                              "layers regressed, partial = some work unpriced); `dse cost` shows which layers.")
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
    _cost_provenance(s, _read_json(root / "finetune" / COSTS_JSON))
    return s


def _cost_provenance(s: Section, costs: Any) -> None:
    """Where each MoE layer's expert costs (the balance loss's weights) came from, from ``costs.json``."""
    if not isinstance(costs, dict) or not costs.get("layers"):
        return
    counts = ", ".join(f"{n} {source}" for source, n in (costs.get("sources") or {}).items())
    s.text.append(f"MoE expert costs ({costs.get('metric')} per token): {counts}"
                  + (" (cost.strict: only measured costs accepted)." if costs.get("strict") else "."))
    # per-token costs are tiny (1e-4 ms): shown with significant digits, not the tables' fixed decimals
    s.tables.append(("MoE expert costs and their provenance", [
        {"layer": name, "mult": f"{c['mult']:.4g}", "shift": f"{c['shift']:.4g}",
         "equilibrium": c.get("equilibrium_share"), "provenance": provenance.describe(c.get("provenance"))}
        for name, c in costs["layers"].items()]))


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
        if bench.get("dense_tvm"):
            s.text.append("dense (TVM) is the dense checkpoint exported by the same TVM pipeline with every layer "
                          "mult/msa: the exported design's speed-up over it is the reparameterisation's own gain, "
                          "its speed-up over PyTorch also holds the compiler's.")
        if bench.get("load_warning"):
            s.text.append(f"**Warning:** {bench['load_warning']}.")
        speed = bench.get("host_speed") or {}
        if speed.get("ratio"):
            s.text.append(f"Host speed: the reference kernel ran {speed['ratio']:.2f}x its time when the profile was "
                          "measured; `prediction_error_now_pct` is each prediction times the ratio around that "
                          "contestant's own blocks against its measured median.")
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
