from __future__ import annotations

import argparse

from dse.cli import command
from dse.commands.common import config_from_args, table


@command("run", "the whole pipeline on a config (default: the embedded digits ViT)")
def run(args: argparse.Namespace):
    from dse.pipeline import run_pipeline

    cfg = config_from_args(args)
    result = run_pipeline(cfg)
    rows = [{"stage": s["name"], "status": "reused" if s["reused"] else "ran", "seconds": s["seconds"],
             "folder": str(s["folder"])} for s in result["stages"]]
    text = table(rows, floatfmt="{:.1f}") + f"\n\ndense val top-1: {result['dense_val_acc']:.2f}%"
    return {"text": text, "json": result}
