from __future__ import annotations

import argparse
import time

from dse.commands.common import config_from_args, out_dir
from dse.commands.registry import command
from dse.training.distributed import process_group, rank, world_size
from dse.training.finetune import finetune


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", help="model name (default: config model.name)")
    p.add_argument("--checkpoint", metavar="DENSE.pt", help="dense weights (default: config model.checkpoint)")
    p.add_argument("--assignment", metavar="FILE.yaml",
                   help="per-layer assignment (default: config finetune.assignment, else the ShiftAddViT recipe: "
                        "hamming attention and moe in every Linear)")
    p.add_argument("--profile", metavar="FILE.csv",
                   help="profile CSV whose cost model weights the MoE balance loss, or a cost-table JSON "
                        "(default: the stored profile for this device and profile.target)")
    p.add_argument("--data", metavar="DIR", help="ImageFolder root with train/ and val/ (default: config data)")
    p.add_argument("--epochs", type=int, help="override finetune.epochs")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.pt in the output folder")
    p.add_argument("--strict-costs", action="store_true",
                   help="refuse MoE expert costs that are not all measured (regression, partial, cost table); "
                        "sets cost.strict")


@command("finetune", "fine-tune the ShiftAddViT for an assignment from the dense model "
         "(checkpoint.pt, weights.pt, metrics.csv)", _args)
def run(args: argparse.Namespace):
    extra = []
    if args.model:
        extra.append(f"model.name={args.model}")
    if args.data:
        extra += ["data.name=imagefolder", f"data.path={args.data}"]
    if args.epochs is not None:
        extra.append(f"finetune.epochs={args.epochs}")
    if args.strict_costs:
        extra.append("cost.strict=true")
    cfg = config_from_args(args, *extra)
    out = out_dir(cfg)
    t0 = time.perf_counter()
    with process_group(cfg.device) as device:
        summary = finetune(cfg, out, checkpoint=args.checkpoint, assignment=args.assignment, profile=args.profile,
                           model_name=args.model, resume=args.resume, device=device)
        summary["processes"] = world_size()
        if rank() != 0:
            return None  # rank 0 reports
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    text = (f"ShiftAddViT {cfg.model.name} ({', '.join(f'{k} {v}' for k, v in summary['assignment'].items())}): "
            f"val top-1 {summary['val_acc']:.2f}% vs dense {summary['dense_val_acc']:.2f}% "
            f"({-summary['drop']:+.2f} points) after {summary['epochs']} epochs ({summary['seconds']:.0f} s)")
    if summary.get("routing_gap_end") is not None:
        text += (f"\nMoE routing: mean |Mult share - cost-model equilibrium| "
                 f"{summary['routing_gap_start']:.3f} -> {summary['routing_gap_end']:.3f} "
                 f"over {summary['moe_layers']} layers")
    if summary.get("cost_provenance"):
        sources = ", ".join(f"{n} {source}" for source, n in summary["cost_sources"].items())
        text += f"\nMoE expert costs: {sources} ({summary['costs_json']})"
        text += "".join(f"\n  {name}: {line}" for name, line in summary["cost_provenance"].items()
                        if not line.startswith("measured"))
    text += f"\n-> {summary['weights']}"
    return {"text": text, "json": summary}
