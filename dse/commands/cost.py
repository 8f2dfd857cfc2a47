"""``dse cost``: predicted per-layer and whole-model latency/energy of an assignment; ``--validate`` checks
the cost model against fresh measurements on this machine."""

from __future__ import annotations

import argparse
import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from dse.checkpoints import build_dense
from dse.commands.common import config_from_args, out_dir, table
from dse.commands.registry import command
from dse.cost.calibration import Calibration
from dse.cost.model import (
    check_profile,
    check_profile_target,
    default_profile_path,
    profile_identity,
    read_profile,
)
from dse.cost.sources import energy_text, model_cost
from dse.cost.validate import (
    calibrate,
    format_figure,
    summarize_shapes,
    validate_dense_model,
    validate_shapes,
)
from dse.deploy.holdout import validate_assignments
from dse.errors import UsageError
from dse.fileio import atomic_write_text
from dse.profiling.inventory import build_inventory
from dse.profiling.profiler import Settings, check_target_runnable
from models.assignment import Assignment


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registered or timm model name (default: config model.name)")
    p.add_argument("--profile", metavar="FILE", action="append",
                   help="profile CSV from `dse profile` on any device; the prediction is for that profile's device "
                   "and target. Repeat for one column per device (default: the stored profile for this device "
                   "and profile.target)")
    p.add_argument("--assignment", metavar="FILE.yaml", help="per-layer assignment (default: all mult / msa)")
    p.add_argument("--target", help="the target the model is compiled for (default: config profile.target, or the "
                   "--profile's own target); a --profile for another target is refused")
    p.add_argument("--batch", type=int, help="images per batch (default: config profile.batch)")
    p.add_argument("--backend", choices=("tvm", "torch"), default="tvm",
                   help="tvm: the compiled ShiftAddViT (default); torch: the PyTorch model")
    p.add_argument("--validate", action="store_true", help="measure held-out shapes and the dense PyTorch model "
                   "here and report the prediction error (CSV files in --out; needs this machine's profile)")
    p.add_argument("--calibrate", type=int, metavar="N", help="measure N random shapes per kernel primitive and "
                   "backend around the model's range into the profile (the regression's sample), then exit")
    p.add_argument("--holdout", type=int, help="--validate: held-out shapes per primitive and backend "
                   "(default: config cost.holdout_shapes)")
    p.add_argument("--assignments", type=int, metavar="N", help="--validate: random held-out assignments compiled "
                   "whole and timed interleaved, 0 for none (default: config cost.validate_assignments)")


def _config(args: argparse.Namespace):
    if args.calibrate is not None and args.calibrate < 1:
        raise UsageError(f"--calibrate must be positive, got {args.calibrate}")
    if args.assignments is not None and not args.validate:
        raise UsageError("--assignments sets how many held-out assignments --validate compiles; add --validate")
    if args.validate and args.assignment:
        raise UsageError("--validate checks the cost model itself; drop --assignment")
    if (args.validate or args.calibrate is not None) and args.profile and len(args.profile) > 1:
        raise UsageError("--validate and --calibrate measure this machine: give at most one --profile")
    cfg = config_from_args(args, flags={"model": "model.name", "batch": "profile.batch",
                                        "holdout": "cost.holdout_shapes",
                                        "assignments": "cost.validate_assignments"})
    if args.target:  # assigned after loading: a JSON target would be parsed as YAML by --set
        cfg.profile.target = args.target
    return cfg


def _load(cfg, profile_arg: str | None, *, here: bool, target_given: bool):
    """The profile to price with. ``here``: the command measures on this machine, so the profile must be this
    device's for ``profile.target``; otherwise any device's profile prices the model for that device (its
    target must match ``--target`` when one was given)."""
    path = Path(profile_arg) if profile_arg else default_profile_path(cfg.profile)
    profile = read_profile(path)
    if here:
        check_profile(profile, cfg.profile.target)
    elif target_given:
        check_profile_target(profile, cfg.profile.target)
    return profile


@command("cost", "predicted latency/energy per layer and for the whole model, on any profiled device "
         "(--validate: check the cost model here)", _args)
def run(args: argparse.Namespace):
    cfg = _config(args)
    if args.calibrate is not None:
        return _calibrate(cfg, args)
    if args.validate:
        return _validate(cfg, args)
    return _price(cfg, args)


# ----------------------------------------------------------------------------------------------------
# pricing


def _price(cfg, args: argparse.Namespace) -> dict[str, Any]:
    model = build_dense(cfg)
    assignment = Assignment.from_yaml(args.assignment) if args.assignment else Assignment.uniform(model)
    assignment.validate(model)
    profiles = [_load(cfg, p, here=False, target_given=bool(args.target)) for p in (args.profile or [None])]
    inventory = build_inventory(model, batch=cfg.profile.batch, nbits=cfg.finetune.nbits, name=cfg.model.name)
    results = []
    for profile in profiles:
        mc = model_cost(profile, cfg.cost, inventory, args.backend)
        rows = mc.per_layer(assignment)
        total = mc.predict(assignment)
        device, target = profile_identity(profile)
        results.append({
            "model": cfg.model.name, "batch": inventory.batch, "backend": args.backend,
            "device": device, "target": target, "profile": str(profile.path), "metric": cfg.cost.metric,
            "assignment": assignment.to_dict(), "latency_ms": total.latency_ms, "energy_mj": total.energy_mj,
            "fixed_latency_ms": mc.fixed.latency_ms, "fixed_energy_mj": mc.fixed.energy_mj,
            "energy_source": profile.energy_sources,
            "layers": [r.as_dict() for r in rows if r.kind != "fixed"],
            "fixed": [r.as_dict() for r in rows if r.kind == "fixed"],
            "moe": {name: {"expert_costs": mc.moe_expert_costs(name), "equilibrium_share": mc.equilibrium_share(name)}
                    for name, choice in assignment.linear.items() if choice == "moe"},
        })
    if len(results) == 1:
        return {"text": _price_text(results[0]), "json": results[0]}
    return {"text": _devices_text(results), "json": {"model": cfg.model.name, "devices": results}}


def _device_label(r: dict) -> str:
    return f"{r['device']}/{r['target']}"


def _devices_text(results: list[dict]) -> str:
    """One latency column per device: the same assignment priced on every profile."""
    labels = [_device_label(r) for r in results]
    by_layer = [{x["layer"]: x for x in r["layers"]} for r in results]
    rows = []
    for x in results[0]["layers"]:
        row = {"layer": x["layer"], "choice": x["choice"]}
        for label, layers in zip(labels, by_layer):
            row[f"{label} ms"] = layers[x["layer"]]["latency_ms"]
        rows.append(row)
    for key, name in (("fixed_latency_ms", "(fixed work)"), ("latency_ms", "total")):
        rows.append({"layer": name, "choice": "", **{f"{label} ms": r[key] for label, r in zip(labels, results)}})
    lines = [f"{results[0]['model']} (batch {results[0]['batch']}), backend {results[0]['backend']}, "
             f"priced on {len(results)} devices"]
    lines += [f"  {label}: profile {r['profile']}, total {r['latency_ms']:.3f} ms, {energy_text(r['energy_mj'], '.4f')} "
              f"(energy source: {', '.join(r['energy_source']) or 'none'})" for label, r in zip(labels, results)]
    lines += ["", table(rows, floatfmt="{:.4f}")]
    return "\n".join(lines)


def _fmt_err(row: dict) -> str:
    if row["source"] == "measured":
        return "-"
    err = f"{100 * row['fit_error']:.0f}%" if row["fit_error"] is not None else "?"
    return err + (" extrapolated" if row["extrapolated"] else "")


def _price_text(r: dict) -> str:
    trows = [{"layer": x["layer"], "choice": x["choice"], "latency_ms": x["latency_ms"],
              "energy_mj": x["energy_mj"], "source": x["source"], "fit err": _fmt_err(x), "detail": x["detail"]}
             for x in r["layers"]]
    groups: dict[str, list[dict]] = defaultdict(list)
    for x in r["fixed"]:
        groups[x["detail"]].append(x)
    for op, xs in groups.items():
        sources = {x["source"] for x in xs}
        trows.append({"layer": f"({op} x{len(xs)})", "choice": "fixed",
                      "latency_ms": sum(x["latency_ms"] for x in xs), "energy_mj": sum(x["energy_mj"] for x in xs),
                      "source": sources.pop() if len(sources) == 1 else "mixed",
                      "fit err": "-" if all(x["source"] == "measured" for x in xs) else
                      max((_fmt_err(x) for x in xs if x["source"] != "measured"), default="-"),
                      "detail": ""})
    lines = [f"{r['model']} (batch {r['batch']}) on {_device_label(r)}, backend {r['backend']}, profile {r['profile']}",
             table(trows, floatfmt="{:.4f}"), "",
             f"total: {r['latency_ms']:.3f} ms, {energy_text(r['energy_mj'], '.4f')} "
             f"(energy source: {', '.join(r['energy_source']) or 'none'}; fixed work {r['fixed_latency_ms']:.3f} ms)"]
    notes = dict.fromkeys(n for x in (*r["layers"], *r["fixed"]) for n in x.get("notes", ()))
    lines += [f"note: {n}" for n in notes]
    for name, m in r["moe"].items():
        c = m["expert_costs"]
        lines.append(f"moe {name}: per-token cost mult {c['mult']:.4g}, shift {c['shift']:.4g} ({r['metric']}); "
                     f"equilibrium mult share {m['equilibrium_share']:.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# calibration and validation


def _calibrate(cfg, args: argparse.Namespace) -> dict[str, Any]:
    if args.profile:
        raise UsageError("--calibrate extends the stored profile under profile.dir; drop --profile")
    model = build_dense(cfg)
    inventory = build_inventory(model, batch=cfg.profile.batch, nbits=cfg.finetune.nbits, name=cfg.model.name)
    res = calibrate(inventory, Settings.from_config(cfg.profile), cfg.profile.dir, count=args.calibrate,
                    seed=cfg.seed + 1)
    text = f"added {res['added']} calibration rows to {res['profile']}"
    if res["failed"]:
        text += f"; {len(res['failed'])} failed: " + "; ".join(res["failed"][:3])
    return {"text": text, "json": res}



def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def _validate(cfg, args: argparse.Namespace) -> dict[str, Any]:
    check_target_runnable(cfg.profile.target)
    profile = _load(cfg, (args.profile or [None])[0], here=True, target_given=True)
    out = out_dir(cfg)
    model = build_dense(cfg)
    inventory = build_inventory(model, batch=cfg.profile.batch, nbits=cfg.finetune.nbits, name=cfg.model.name)
    settings = Settings.from_config(cfg.profile)
    shapes = validate_shapes(profile, settings, inventory, count=cfg.cost.holdout_shapes, seed=cfg.seed,
                             side_by_side=cfg.cost.validate_rounds > 0)
    summary = summarize_shapes(shapes)
    dense = validate_dense_model(profile, model, inventory, threads=cfg.profile.torch_threads,
                                 min_runs=cfg.cost.validate_runs, settings=settings, rounds=cfg.cost.validate_rounds)
    atomic_write_text(out / "cost_holdout.csv", _csv_text([r.as_dict() for r in shapes]))
    atomic_write_text(out / "cost_dense_model.csv", _csv_text([dense]))
    held = None
    if cfg.cost.validate_assignments > 0:
        held = validate_assignments(cfg, profile, model, inventory, count=cfg.cost.validate_assignments,
                                    seed=cfg.seed, rounds=cfg.cost.validate_rounds, per_round=cfg.cost.validate_runs,
                                    poison_factor=cfg.cost.poison_factor)
        atomic_write_text(out / "cost_assignments.csv",
                          _csv_text([{k: v for k, v in r.items() if k != "plan"} for r in held["assignments"]]))
        atomic_write_text(out / "cost_kernels.csv", _csv_text(held["kernels"]))
    per = [{"backend/primitive": key, "shapes": s["count"], "within_10": s["within_10"],
            "within_15": s["within_15"], "rmspe": s["rmspe"], "law_loo_rmspe": s.get("law_loo_rmspe"),
            "drift": s.get("drift"), "repeat": s.get("repeatability"),
            "corr_within_15": s["drift_corrected_within_15"],
            "sbs_within_15": s.get("side_by_side_within_15"), "sbs_rmspe": s.get("side_by_side_rmspe"),
            "gbt_rmspe": s.get("learned_rmspe"), "better": s.get("better")}
           for key, s in summary.items() if key != "all"]
    text = "\n".join([
        f"cost model validation: {cfg.model.name} (batch {inventory.batch}), profile {profile.path}",
        f"held-out shapes (not in the profile), predicted vs measured: {format_figure(summary['all'])}",
        f"  drift-corrected (prediction x this primitive's now/profiled speed ratio on re-measured profiled "
        f"shapes): {format_figure(summary['all'], 'drift_corrected_')}",
        *([f"  side by side (each primitive's profiled rows re-measured and its law refitted just before its "
           f"held-out shapes; the method's own error): {format_figure(summary['all'], 'side_by_side_')}"]
          if "side_by_side_rmspe" in summary["all"] else []),
        _learned_text(summary["all"]),
        table(per, floatfmt="{:.3f}"),
        "  (law_loo_rmspe: the law's leave-one-out error on the profile; drift: now/profiled speed; repeat: RMS "
        "difference of one shape measured twice now, the noise floor; corr: drift-corrected; sbs: side by side; "
        "gbt: the learned regressor; better: the lower RMSPE of law and gbt on these shapes; the cost model "
        "prices with the law)",
        f"dense PyTorch model, {dense['threads']} threads: predicted {dense['predicted_ms']:.3f} ms from "
        f"{dense['rows_measured']} measured + {dense['rows_predicted']} predicted rows, measured "
        f"{dense['measured_ms']:.3f} ms (median of {dense['runs']} runs"
        + (f" in {dense['bursts']} bursts spread over the check" if dense["bursts"] > 1 else "")
        + f"; p90 {dense['measured_p90_ms']:.3f}) -> error {100 * dense['rel_error']:+.1f}%",
        *([f"  side by side ({dense['side_by_side_rounds']} rounds re-measuring its torch rows next to the model): "
           f"predicted {dense['side_by_side_predicted_ms']:.3f} ms, measured {dense['side_by_side_measured_ms']:.3f} "
           f"ms -> error {100 * dense['side_by_side_error']:+.1f}% (the method's own error, without drift since "
           "profiling)"] if "side_by_side_error" in dense else []),
        f"load average during the check: {dense['load_1m']} ({settings.torch_threads} threads; a loaded machine "
        "makes both sides noisy)",
        *(_assignments_text(held) if held else []),
        f"-> {out / 'cost_holdout.csv'}, {out / 'cost_dense_model.csv'}"
        + (f", {out / 'cost_assignments.csv'}, {out / 'cost_kernels.csv'}" if held else ""),
    ])
    return {"text": text, "json": {"model": cfg.model.name, "profile": str(profile.path), "holdout": summary,
                                   "dense_model": dense, "shapes": [r.as_dict() for r in shapes],
                                   "assignments": held}}


def _learned_text(s: dict[str, Any]) -> str:
    """The held-out shapes' line for the learned regressor, with the law's RMSPE on the same shapes."""
    head = "  learned regressor (gradient-boosted trees on the law's features): "
    if "learned_rmspe" not in s:
        return head + "no primitive has enough profile rows to fit it"
    return (head + f"{format_figure(s, 'learned_')} (the law on the same shapes: RMSPE "
            f"{100 * s['learned_law_rmspe']:.1f}%; better: {s['better']})")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _figures(s: dict[str, Any], prefix: str = "") -> str:
    tau = s.get(prefix + "kendall_tau")
    return (f"{100 * s[prefix + 'within_5']:.0f}% within ±5%, {100 * s[prefix + 'within_10']:.0f}% within ±10%, "
            f"mean |error| {100 * s[prefix + 'mean_abs_error']:.1f}%, worst {_pct(s[prefix + 'worst_error'])}, "
            f"Kendall tau {'-' if tau is None else f'{tau:.2f}'}")


def _assignments_text(held: dict[str, Any]) -> list[str]:
    """The held-out assignments' section of the validation report."""
    s, ref = held["summary"], held["reference"]
    rows = [{"#": r["assignment"], "msa": r["msa"], "ham": r["hamming"], "mult": r["mult"], "shift": r["shift"],
             "moe": r["moe"], "predicted_ms": r["predicted_ms"], "measured_ms": r["measured_ms"],
             "uncalibrated": _pct(r["uncalibrated_error"]),
             "error": _pct(r["rel_error"]), "corrected": _pct(r["corrected_error"]), "spread": _pct(r["spread"]),
             "in-model kernels/other ms": f"{r['in_model_kernels_ms']:.3f}/{r['in_model_other_ms']:.3f}"}
            for r in held["assignments"]]
    then = ref["then"]
    if ref["speed_ratio"] is None:
        speed = (f"host speed: reference kernel {'x'.join(map(str, ref['kernel'][1:]))} {ref['kernel'][0]} now "
                 f"{ref['now_ms']:.4f} ms; the profile stored no time for it, so the ratio then/now is unknown and "
                 "no drift correction is made (re-measure the profile with `dse profile --force` to record one)")
    else:
        speed = (f"host speed: reference kernel {'x'.join(map(str, ref['kernel'][1:]))} {ref['kernel'][0]} "
                 f"{then['latency_ms']:.4f} ms when profiled ({then['measured_at']}), {ref['now_ms']:.4f} ms now: "
                 f"the host runs {ref['speed_ratio']:.2f}x the time it did then")
    factors = ", ".join(f"{p} {f['factor']:.2f}" for p, f in held["in_context"].items() if f["factor"] is not None)
    poisoned = [k for k in held["kernels"] if k["poisoned"]]
    cal = held.get("calibration")
    lines = [f"held-out assignments ({s['count']}, none of them a calibration model; compiled whole, timed "
             f"interleaved in {held['rounds']} rounds of {held['per_round']} calls each): {_figures(s)}",
             ("  " + Calibration.from_meta(cal).describe() if cal else
              "  uncalibrated: the profile has no in-context calibration for this model and batch (or "
              "cost.calibrated is false); `dse profile` fits one"),
             *([f"  the same uncalibrated (kernels and ops as profiled alone): {_figures(s['uncalibrated'])}"]
               if cal else []),
             *([f"  drift-corrected (each block of calls brought to the profile's host speed by the reference kernel "
                f"timed around it; median ratio {s['speed_ratio']:.2f}): {_figures(s, 'corrected_')}"]
               if s.get("corrected_mean_abs_error") is not None else []),
             f"  measurement's own spread between rounds: up to {_pct(s['max_spread'])} (errors below it are noise)",
             speed, table(rows, floatfmt="{:.3f}"),
             f"in-context factor (kernel time inside the models / its profile row, per primitive): {factors}"]
    if poisoned:
        lines.append(f"rows that disagree with the kernel inside the model by more than {held['poison_factor']}x "
                     "(re-measure them: `dse profile --force`):")
        lines += [f"  {k['primitive']} {k['b']}x{k['m']}x{k['k']}x{k['n']}: profile {k['profile_ms']:.4f} ms, in model "
                  f"{k['in_model_ms']:.4f} ms ({k['ratio']:.2f}x, usually {k['usual_ratio']:.2f}x)" for k in poisoned]
    else:
        lines.append(f"no profile row disagrees with its kernel inside the models by more than {held['poison_factor']}x")
    return lines
