from __future__ import annotations

import argparse

from dse.commands.common import config_from_args, table
from dse.commands.registry import command
from dse.pipeline.run import run_pipeline
from dse.pipeline.stages import stage_status


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict-costs", action="store_true",
                   help="refuse MoE expert costs that are not all measured (sets cost.strict)")


@command("run", "the whole pipeline: pretrain, profile, search, finetune, export, bench, report", _args)
def run(args: argparse.Namespace):
    cfg = config_from_args(args, *(["cost.strict=true"] if args.strict_costs else []))
    result = run_pipeline(cfg)
    rows = [{"stage": s["name"],
             "status": stage_status(s),
             "seconds": s["seconds"], "folder": str(s["folder"])} for s in result["stages"]]
    acc = result["accuracy"]
    lines = [table(rows, floatfmt="{:.1f}"), "", "validation top-1:"]
    lines += [f"  {name:<10} {v['acc']:.2f}%  ({v['source']})" for name, v in acc.items()]
    bench = next((s["summary"] for s in result["stages"] if s["name"] == "bench"), {})
    for row in bench.get("rows", []):
        pred = row.get("predicted_ms")
        lines.append(f"  {row['model']:<40} {row['median_ms']:.2f} ms"
                     + (f" (predicted {pred:.2f} ms)" if pred else ""))
    lines.append(f"\nreport: {result['report']['markdown']} and {result['report']['html']}")
    return {"text": "\n".join(lines), "json": result}
