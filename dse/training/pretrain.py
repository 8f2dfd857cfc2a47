"""Stage 0: the dense baseline every later stage starts from (no weights can be downloaded here,
so the tool makes its own; a user with a real checkpoint sets ``model.checkpoint`` instead).
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import models
from dse.checkpoints import architecture, build_dense
from dse.config import Config, save_config
from dse.fileio import atomic_write_bytes, atomic_write_text
from dse.hardware.threads import set_torch_threads
from dse.training.data import DataBundle, load_data
from dse.training.train import TrainSpec, evaluate, set_seed, train

log = logging.getLogger(__name__)


def train_spec(cfg: Config) -> TrainSpec:
    t = cfg.pretrain
    return TrainSpec(epochs=t.epochs, lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                     warmup_epochs=t.warmup_epochs, label_smoothing=t.label_smoothing, grad_clip=t.grad_clip,
                     batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size, seed=cfg.seed,
                     workers=cfg.data.workers, meta={"architecture": architecture(cfg), "stage": "pretrain"})


def pretrain(cfg: Config, out: Path, *, resume: bool = False, progress: bool = True,
             data: DataBundle | None = None) -> dict[str, Any]:
    """Train (or, with ``model.checkpoint`` set, just evaluate) the dense baseline."""
    set_torch_threads(cfg.pretrain.threads)
    data = data or load_data(cfg.data, cfg.seed)
    set_seed(cfg.seed)  # the initial weights too: the same seed gives the same dense model (it did not)
    model = build_dense(cfg)
    if cfg.model.checkpoint:
        models.load_weights(model, cfg.model.checkpoint)
    save_config(cfg, out)  # only once the inputs are known to be usable: a failed start changes nothing
    if cfg.model.checkpoint:
        metrics = evaluate(model, data.val, cfg.data.eval_batch_size, cfg.device)
        log.info("using the given checkpoint %s: val_acc %.2f%%", cfg.model.checkpoint, metrics["acc"])
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "meta": {"architecture": architecture(cfg)}}, buf)
        atomic_write_bytes(out / "weights.pt", buf.getvalue())
        # the given checkpoint's accuracy, evaluated once: the report shows it and a rerun reuses it
        atomic_write_text(out / "metrics.csv", pd.DataFrame([{"epoch": 0, "val_acc": metrics["acc"],
                                                              "val_loss": metrics["loss"]}]).to_csv(index=False))
        return {"val_acc": metrics["acc"], "epochs": 0, "checkpoint": str(out / "weights.pt")}
    if cfg.pretrain.low_res_epochs:
        _pretrain_low_res(cfg, model, out, resume=resume, progress=progress)
    row = train(model, data, train_spec(cfg), out, resume=resume, device=cfg.device, progress=progress)
    return {"val_acc": row.get("val_acc"), "epochs": cfg.pretrain.epochs, "checkpoint": str(out / "weights.pt")}


def _pretrain_low_res(cfg: Config, model: torch.nn.Module, out: Path, *, resume: bool, progress: bool) -> None:
    """Progressive resizing's first phase (``pretrain.low_res``): the same architecture at fewer tokens, in
    ``out/low_res_<px>``; its weights then start ``model`` with the position embedding resampled."""
    t = cfg.pretrain
    low_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, img_size=t.low_res))
    low = build_dense(low_cfg)
    spec = dataclasses.replace(train_spec(low_cfg), epochs=t.low_res_epochs)
    row = train(low, load_data(low_cfg.data, cfg.seed), spec, out / f"low_res_{t.low_res}px", resume=resume,
                device=cfg.device, progress=progress)
    models.load_resized(model, low)
    log.info("low-resolution phase: %d epochs at %d px, val_acc %.2f%%; continuing at %d px", t.low_res_epochs,
             t.low_res, row.get("val_acc", float("nan")), cfg.data.img_size)
