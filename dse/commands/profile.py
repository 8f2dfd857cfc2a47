from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from typing import Any

from dse.commands.common import config_from_args, table
from dse.commands.registry import command
from dse.deploy.calibrate import ensure_calibration
from dse.errors import StageError
from dse.profiling.inventory import compact_names, inventory_for_config
from dse.profiling.profiler import (
    PREEMPTED_RATIO,
    Settings,
    check_target_runnable,
    compile_model,
    load_warning,
    profile_model,
    summary_rows,
)
from dse.profiling.store import list_profiles, passes_of


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("--out DIR is the profile root here: rows go to DIR/<device>/<target>.csv with a .yaml beside it "
                "(default: config profile.dir = profiles). A rerun measures only rows that are missing.")
    p.add_argument("--model", help="registered or timm model name (default: config model.name)")
    p.add_argument("--target", help="cpu | cuda | cuda:sm_NN | a JSON target dict (default: config profile.target)")
    p.add_argument("--batch", type=int, help="images per batch (default: config profile.batch)")
    p.add_argument("--trials", type=int, help="MetaSchedule trials to tune kernels without a tuning record "
                   "(default: config profile.trials; 0 = default schedules)")
    p.add_argument("--passes", type=int, help="measure every row this many times, each pass over all rows, and keep "
                   "the median (a shared machine's speed moves in phases of minutes); with N > 1 the rows other "
                   "models or calibration put into the profile get their missing passes too "
                   "(default: config profile.passes)")
    p.add_argument("--force", action="store_true", help="re-measure every row of this model (and discard a "
                   "profile from another device or version)")
    p.add_argument("--list-shapes", action="store_true", help="print the layer inventory and exit (no measuring)")
    p.add_argument("--list", action="store_true", help="list the profiles under the profile root (device, target, "
                   "rows, models, date, energy source) and exit; any of them prices a model with `dse cost "
                   "--profile`")
    p.add_argument("--compile-only", action="store_true", help="build every kernel and op for the target, "
                   "measure nothing (works for CUDA without a GPU)")


def _config(args: argparse.Namespace):
    cfg = config_from_args(args, flags={"model": "model.name", "batch": "profile.batch", "trials": "profile.trials",
                                        "passes": "profile.passes"})
    if args.target:  # assigned after loading: a JSON target would otherwise be parsed as a YAML mapping by --set
        cfg.profile.target = args.target
    return cfg


def _list_text(entries: list[dict[str, Any]], root) -> str:
    if not entries:
        return f"no profiles under {root}; measure one with `dse profile`"
    rows = [{"device": e["device"], "target": e["target"], "rows": e.get("rows"),
             "models": ", ".join(e.get("models") or []) or ("-" if "error" not in e else e["error"][:60]),
             "date": (e.get("date") or "")[:10], "energy": ", ".join(e.get("energy_source") or []),
             "profile": e["profile"]} for e in entries]
    return f"profiles under {root}:\n" + table(rows)


def _shape_text(inv) -> str:
    kernel_groups: dict[tuple, list[str]] = defaultdict(list)
    def only(it) -> str:  # an item one backend alone runs (a fused attention's sdpa, and the ops it fuses)
        return f" ({it.backend} only)" if it.backend else ""

    for it in inv.items:
        if it.kind != "nonprim":
            kernel_groups[(it.kind, (it.choice or "-") + only(it), "|".join(it.primitives), *it.shape)].append(it.name)
    nonprim_groups: dict[tuple, list[str]] = defaultdict(list)
    for it in inv.nonprim():
        nonprim_groups[(it.op, (it.choice or "always") + only(it), *it.shape)].append(it.name)

    krows = [{"kind": k[0], "choice": k[1], "primitives": k[2], "b": k[3], "m": k[4], "k": k[5], "n": k[6],
              "layers": compact_names(names)} for k, names in kernel_groups.items()]
    nrows = [{"op": k[0], "when": k[1], "b": k[2], "m": k[3], "k": k[4], "n": k[5], "count": len(names),
              "where": compact_names(names)} for k, names in nonprim_groups.items()]
    c, h, w = inv.input_size
    head = (f"{inv.model}: {c}x{h}x{w} input, batch {inv.batch}, {len(inv.linears())} Linears, "
            f"{len(inv.attention)} attentions, Hamming codes of {inv.nbits} bits")
    return "\n".join([head, "", "kernel shapes (b, m, k, n), unique per primitive set:", table(krows), "",
                      "non-primitive work (dse.profiling.nonprim op shapes):", table(nrows)])


def _summary_text(run, rows: list[dict[str, Any]]) -> str:
    srows = summary_rows(run)
    lines = []
    if run.measured == 0 and not run.failed:
        lines.append(f"nothing to measure: all {run.planned} rows for this model are already in {run.path} "
                     f"(use --force to re-measure); {run.seconds:.1f} s")
    else:
        what = "rows" if run.passes == 1 else f"row passes (of {run.passes} per row)"
        lines.append(f"measured {run.measured} {what} now ({run.present} of this model's {run.planned} rows were "
                     "complete"
                     + (f", {run.by_other} measured meanwhile by another process" if run.by_other else "")
                     + f") in {run.seconds:.1f} s -> {run.path}")
    repeats = sorted({int(r["repeats"]) for r in rows})
    windows = sorted({r.get("min_repeat_ms") for r in rows if r.get("min_repeat_ms") == r.get("min_repeat_ms")})
    if rows:
        lines.append(f"latency: median and p90 of {'/'.join(map(str, repeats))} repeats per row, each repeat the mean "
                     f"of back-to-back calls lasting >= {'/'.join(f'{w:g}' for w in windows if w is not None)} ms; "
                     "PyTorch rows use the same loop"
                     + (f"; a row measured in several passes keeps their median (up to {most} passes)"
                        if (most := max(passes_of(r) for r in rows)) > 1 else ""))
    energy = {"model": "analytical model (45 nm op/byte energies: an ASIC projection, not a measurement of "
                       "this machine)", "rapl": "RAPL (CPU package, measured)", "nvml": "NVML (GPU, measured)"}
    lines.append(f"energy: {energy.get(run.energy_source, run.energy_source)}")
    if run.busy_before:
        lines.append(f"{run.busy_before} stored row(s) had been measured under load: measured again now")
    if run.remeasured:
        lines.append(f"{run.remeasured} row(s) measured again: their median was over {PREEMPTED_RATIO:g}x their "
                     "fastest sample (other work took the CPU); each keeps its fastest attempt")
    busy = load_warning(rows, run.cores, run.busy_load_per_core)
    if busy:
        lines.append(f"warning: {busy}")
    if run.failed:
        lines.append(f"{len(run.failed)} row(s) failed (the others are saved): " + "; ".join(run.failed[:3]))
    lines.append("")
    lines.append(table(srows, ["primitive", "shape", "tvm_ms", "tvm_p90_ms", "torch_ms", "tvm/torch", "energy_mj",
                               "source", "schedule", "layers"], floatfmt="{:.4g}"))
    return "\n".join(lines)


def _calibration_text(cal, count: int) -> str:
    fitted, models, fresh = cal.fitted, cal.models, cal.fresh
    if fitted is None:
        return (f"in-context calibration: none ({cal.skipped}): TVM models are priced as the sum of their kernels "
                "and ops profiled alone")
    if not fresh:
        return f"in-context calibration (stored, rows unchanged): {fitted.describe()}"
    rows = [{"msa": m["msa"], "hamming": m["hamming"], "mult": m["mult"], "shift": m["shift"], "moe": m["moe"],
             "measured_ms": m["measured_ms"], "uncalibrated_ms": m["uncalibrated_ms"],
             "calibrated_ms": m["calibrated_ms"], "error": f"{100 * m['uncalibrated_error']:+.1f}% -> "
                                                             f"{100 * m['calibrated_error']:+.1f}%"} for m in models]
    ratio = "unknown" if fitted.speed_ratio is None else f"{fitted.speed_ratio:.2f}"
    return "\n".join([f"in-context calibration: {count} whole compiled models timed interleaved (host speed vs the "
                      f"rows: {ratio}, divided out): {fitted.describe()}",
                      table(rows, floatfmt="{:.4g}")])


@command("profile", "measure latency and energy of every primitive x layer shape of a model on a target", _args)
def run(args: argparse.Namespace):
    cfg = _config(args)
    if args.list:
        root = args.out or cfg.profile.dir
        entries = list_profiles(root)
        return {"text": _list_text(entries, root), "json": entries}
    settings = Settings.from_config(cfg.profile)
    if not args.list_shapes and not args.compile_only:
        check_target_runnable(settings.target)  # before building anything: one line, exit 1
    inv = inventory_for_config(cfg)
    if args.list_shapes:
        return {"text": _shape_text(inv), "json": inv.to_dict()}
    progress = not os.environ.get("CI")
    if args.compile_only:
        result = compile_model(inv, settings, progress=progress)
        text = f"compiled {result['compiled']} TVM kernels and ops for {result['target']} in {result['seconds']} s"
        if result["failed"]:
            raise StageError(f"{len(result['failed'])} of {result['compiled'] + len(result['failed'])} builds for "
                             f"{result['target']} failed: {result['failed'][0]}")
        return {"text": text, "json": result}
    root = args.out or cfg.profile.dir
    run_ = profile_model(inv, settings, root, force=args.force, progress=progress, label=None)
    text = _summary_text(run_, run_.rows)
    result = {"profile": str(run_.path), "planned": run_.planned, "present": run_.present, "measured": run_.measured,
              "measured_by_other": run_.by_other, "remeasured_preempted": run_.remeasured,
              "remeasured_busy": run_.busy_before, "failed": run_.failed, "seconds": round(run_.seconds, 2),
              "energy_source": run_.energy_source, "target": run_.target_slug, "summary": summary_rows(run_)}
    if not run_.failed:
        cal = ensure_calibration(cfg, run_.path, inv, refit=run_.measured > 0 or args.force)
        text += "\n\n" + _calibration_text(cal, cfg.profile.calibration_models)
        result["calibration"] = {"skipped": cal.skipped} if cal.fitted is None else {
            **cal.fitted.as_meta(), "fitted_now": cal.fresh, "models": cal.models or cal.fitted.models}
    if run_.failed:
        # the measured rows are saved: show them before the error line
        print(json.dumps(result, indent=2, default=str) if args.json else text)
        raise StageError(f"{len(run_.failed)} row(s) could not be measured (first: {run_.failed[0]}); the other "
                         "rows are saved, rerun to retry the missing ones")
    return {"text": text, "json": result}
