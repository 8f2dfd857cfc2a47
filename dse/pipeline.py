"""``dse run``: every stage in order, each in its own subfolder, reusing what has not changed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dse.config import Config, save_config
from dse.stages import StageResult, fingerprint, run_stage, section

log = logging.getLogger(__name__)


def run_pipeline(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    results: list[StageResult] = []

    from dse.pretrain import pretrain

    dense_key = fingerprint("pretrain", section(cfg, "seed", "model", "data", "pretrain"))
    dense = run_stage("pretrain", root / "dense", dense_key, ["weights.pt", "metrics.csv"], cfg,
                      lambda out: pretrain(cfg, out, resume=True, progress=progress))
    results.append(dense)

    return {"stages": [r.__dict__ for r in results], "dense_val_acc": dense.summary.get("val_acc"),
            "folder": str(root)}
