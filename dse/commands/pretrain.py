from __future__ import annotations

import argparse
import time

from dse.commands.common import config_from_args, out_dir
from dse.commands.registry import command
from dse.training.pretrain import pretrain


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.pt in the output folder")
    p.add_argument("--epochs", type=int, help="override pretrain.epochs")


@command("pretrain", "train the dense baseline ViT (checkpoint.pt, weights.pt, metrics.csv)", _args)
def run(args: argparse.Namespace):
    extra = [f"pretrain.epochs={args.epochs}"] if args.epochs is not None else []
    cfg = config_from_args(args, *extra)
    out = out_dir(cfg)
    t0 = time.perf_counter()
    summary = pretrain(cfg, out, resume=args.resume)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    text = (f"dense {cfg.model.name}: val top-1 {summary['val_acc']:.2f}% after {summary['epochs']} epochs "
            f"({summary['seconds']:.0f} s) -> {summary['checkpoint']}")
    return {"text": text, "json": summary}
