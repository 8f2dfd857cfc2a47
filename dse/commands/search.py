from __future__ import annotations

import argparse
import logging
import sys

from dse.commands.common import config_from_args, out_dir, table
from dse.commands.registry import command
from dse.cost.sources import energy_text
from dse.search.driver import run_search


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name (config model.name); must match the checkpoint")
    p.add_argument("--checkpoint", metavar="DENSE.pt", help="dense weights (config model.checkpoint)")
    p.add_argument(
        "--profile",
        metavar="FILE",
        action="append",
        help="profile CSV from `dse profile` on any device, or a cost-table JSON; repeat to minimise the "
        "predicted latency on every given device (config search.profile; default: the stored profile for "
        "this device and profile.target)",
    )
    p.add_argument(
        "--stage",
        choices=("a", "b", "both"),
        help="a: cost model + risk proxy only; b: fine-tune "
        "front candidates of an existing stage A; both (default, config search.stage)",
    )
    p.add_argument(
        "--trials",
        type=int,
        help="stage-A trials the study should hold (config search.trials); "
        "a rerun continues until the stored count reaches it",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna RDB URL shared by workers, e.g. "
        "postgresql://user@host/db (default: sqlite:///<out>/study.db)",
    )
    p.add_argument("--study", metavar="NAME", help="study name (config search.study_name)")


@command(
    "search", "Optuna search over per-layer assignments (study, pareto.csv/png, best_assignment.yaml)", _args
)
def run(args: argparse.Namespace):
    extra = []
    for flag, key in (
        ("model", "model.name"),
        ("checkpoint", "model.checkpoint"),
        ("stage", "search.stage"),
        ("trials", "search.trials"),
        ("storage", "search.storage"),
        ("study", "search.study_name"),
    ):
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={value}")
    cfg = config_from_args(args, *extra)
    if args.profile:  # a list: assigned after loading, as --set would parse it as YAML
        cfg.search.profile = args.profile if len(args.profile) > 1 else args.profile[0]
    out = out_dir(cfg)
    chatty = not args.json and sys.stderr.isatty()
    log = logging.getLogger("dse.search.driver")

    def progress(line: str) -> None:
        if chatty:
            print(f"\r{line[:110]:110s}", end="", file=sys.stderr, flush=True)
        else:
            log.info(line)

    summary = run_search(cfg, out, progress=progress, train_progress=chatty)
    if chatty:
        print(file=sys.stderr)
    return {"text": _text(summary, cfg.search.stage), "json": summary}


def _text(s: dict, stage: str) -> str:
    lines = []
    if s.get("devices"):
        each = " (one latency objective each)" if len(s["devices"]) > 1 else ""
        lines.append(f"predicted for: {', '.join(s['devices'])}{each}")
    a = s.get("stage_a")
    if a:
        lines.append(
            f"stage A: {a['evaluated']} trials evaluated here in {a['seconds']:.1f} s "
            f"({a['trials_per_s']:.0f} trials/s, worker {a['worker']}); study holds {a['stored']}"
            + (f"; {a['repeats_replaced']} offspring repeated known designs and were replaced by unseen neighbours"
               if a.get("repeats_replaced") else "")
        )
    lines.append(
        f"{s['parameters']} parameters over {s['layers']} layers; front: {s['front_size']} designs of "
        f"{s['trials']} trials ({s['distinct_designs']} distinct designs); energy (mJ) source: "
        f"{s.get('energy_source', 'unknown')}"
    )
    rows = [
        {
            "trial": r["trial"],
            "baseline": r["baseline"],
            **({k: v for k, v in r.items() if k.startswith("latency_ms@")} or {"latency_ms": r["latency_ms"]}),
            "energy_mj": r["energy_mj"],
            "costs": r.get("cost_source", ""),
            "risk": r["risk"],
            **r["counts"],
        }
        for r in s["front"]
    ]
    step = max(1, len(rows) // 12)
    lines += ["", table(rows[::step], floatfmt="{:.4g}")]
    b = s["baselines"]
    lines.append("")
    for name, info in b.items():
        where = "on the front" if info["on_front"] else f"dominated by trial(s) {info['dominated_by']}"
        lines.append(
            f"baseline {name}: {info['latency_ms']:.4g} ms, {energy_text(info['energy_mj'])}, risk "
            f"{info['risk']:.4g} -> {where}"
        )
    if s.get("stage_b"):
        lines += ["", table(s["stage_b"], floatfmt="{:.4g}")]
    if s.get("chosen"):
        c = s["chosen"]
        acc = f", accuracy {c['accuracy']:.2f}%" if c.get("accuracy") is not None else ""
        lines += [
            "",
            f"chosen: trial {c['trial']} ({c['latency_ms']:.4g} ms, {energy_text(c['energy_mj'])}, risk "
            f"{c['risk']:.4g}{acc}) {c['counts']}; costs {c.get('cost_source') or 'unstated'}",
            f"rule: {s['rule']}",
            f"wrote {s['outputs']['best_assignment.yaml']}, pareto.csv, pareto.png",
        ]
    lines.append(f"dashboard: optuna-dashboard {s['storage']}")
    return "\n".join(lines)
