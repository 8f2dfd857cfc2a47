"""The training loop shared by ``dse pretrain`` (dense baseline) and ``dse finetune`` (ShiftAddViT).

AdamW, per-step cosine schedule with linear warm-up, label smoothing, gradient clipping. Each epoch
ends with a validation pass, a row in ``metrics.csv`` and an atomically written ``checkpoint.pt``
holding everything needed to continue exactly: model, optimizer, scheduler, epoch, history and the
RNG states. Data order and augmentation depend only on (seed, epoch), so a run killed mid-epoch and
resumed repeats that epoch bit-for-bit and ends with the same metrics as an uninterrupted run.

Hooks (``TrainSpec``): ``extra_loss`` adds loss terms after each forward (distillation, MoE balance);
``on_epoch_start`` runs before an epoch's first step; ``epoch_metrics`` is read after an epoch's training
steps (before validation, so eval-mode forwards do not mix into training statistics) and its values go
into the metrics row; ``postfix`` supplies progress-bar fields.

Data parallel: when ``torch.distributed`` is initialised (``torchrun``; see :mod:`dse.training.distributed`) the
model is wrapped in DDP, every rank draws its shard through a ``DistributedSampler`` seeded like the
single-process order, training loss/accuracy are summed over ranks, every rank validates on the whole
validation set (identical results) and only rank 0 writes files.

Mixed precision (``amp``): on CUDA, ``"bf16"`` or ``"fp16"`` (with a gradient scaler) run the forward under
autocast; modules that must stay fp32 (the fixed-point grid of shift layers, Hamming codes) disable it
locally. ``None`` trains in fp32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dse.errors import CheckpointError, ConfigError
from dse.fileio import atomic_write_bytes, atomic_write_text
from dse.training.data import DataBundle, augment_batch, epoch_loader

log = logging.getLogger(__name__)

# A hook adds terms to the loss: (model, images, logits, labels) -> (extra_loss, {name: float}).
LossHook = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainSpec:
    """What the loop needs from a TrainConfig/FinetuneConfig (both satisfy it by field names)."""

    epochs: int
    lr: float
    min_lr: float
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    grad_clip: float
    batch_size: int
    eval_batch_size: int
    seed: int = 0
    workers: int = 0
    extra_loss: LossHook | None = None
    epoch_metrics: Callable[[nn.Module], dict[str, float]] | None = None
    on_epoch_start: Callable[[nn.Module, int], None] | None = None
    postfix: Callable[[nn.Module], dict[str, str]] | None = None  # progress-bar fields
    ce_weight: float = 1.0  # weight of the cross-entropy term (distillation takes the rest via extra_loss)
    amp: str | None = None  # "bf16" | "fp16" | None: autocast on CUDA only
    meta: dict[str, Any] = field(default_factory=dict)  # stored in the checkpoint (architecture, assignment)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cosine_lambda(total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``min_lr`` (Loshchilov & Hutter, SGDR, 2017)."""
    floor = min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: str = "cpu") -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over a dataset."""
    model.eval()
    loader = epoch_loader(dataset, batch_size, shuffle=False, seed=0, epoch=0)
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    return {"acc": 100.0 * correct / max(1, total), "loss": loss_sum / max(1, total)}


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: str = "cpu") -> torch.Tensor:
    """Logits for a whole dataset, in order ([N, classes])."""
    model.eval()
    loader = epoch_loader(dataset, batch_size, shuffle=False, seed=0, epoch=0)
    return torch.cat([model(x.to(device)).cpu() for x, _ in loader])


def _rng_state() -> dict:
    # Plain tensors/ints only, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, cached],
            "python": [version, list(internal), gauss]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _save_checkpoint(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_training_state(path: Path) -> dict:
    """Full training state (optimizer, scheduler, RNG), loaded with ``weights_only=True``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot resume from {path}: {str(exc).splitlines()[0] if str(exc) else exc}; "
                              "delete it to start over") from None


@dataclass
class _Totals:
    """Training statistics of one epoch (one rank's shard until summed over ranks)."""

    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    extras_sum: dict[str, float] = field(default_factory=dict)


class _Loop:
    """One training run: the model (and its DDP wrapper), the optimiser, its schedule and the gradient scaler."""

    def __init__(self, model: nn.Module, data: DataBundle, spec: TrainSpec, device: str, distributed: bool):
        self.model, self.data, self.spec, self.device = model, data, spec, device
        model.to(device)
        self.ddp_model: nn.Module = model
        self.sampler = None
        if distributed:
            from torch.utils.data.distributed import DistributedSampler

            self.sampler = DistributedSampler(data.train, shuffle=True, seed=spec.seed)
            # No per-forward buffer broadcast: these models have no batch-norm statistics, and it would
            # overwrite each rank's own buffers (MoE routing counters) with rank 0's. Buffers are synced once here.
            self.ddp_model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True,
                                                                 broadcast_buffers=False)
        self.amp_dtype = _amp_dtype(spec.amp, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        self.opt, self.sched = self._optimizer()

    def _optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW (no weight decay on biases and norms) and its per-step warm-up + cosine schedule."""
        spec, model = self.spec, self.model
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)
        shard = len(self.sampler) if self.sampler is not None else len(self.data.train)  # a rank's samples per epoch
        steps_per_epoch = math.ceil(shard / spec.batch_size)
        total = max(1, spec.epochs * steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, cosine_lambda(total, spec.warmup_epochs * steps_per_epoch, spec.lr, spec.min_lr))
        return opt, sched

    def restore(self, ckpt_path: Path, resume: bool) -> tuple[int, list[dict[str, Any]]]:
        """(first epoch to run, metrics history): from the checkpoint when resuming one, else a fresh seed."""
        if resume and ckpt_path.exists():
            state = load_training_state(ckpt_path)
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            start_epoch = state["epoch"] + 1
            log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
            return start_epoch, state["history"]
        if not resume:
            set_seed(self.spec.seed)
        return 0, []

    def run_epoch(self, epoch: int, progress: bool) -> _Totals:
        """The training steps of one epoch; data order, augmentation and global RNG depend on (seed, epoch)."""
        spec = self.spec
        self.ddp_model.train()
        loader = epoch_loader(self.data.train, spec.batch_size, shuffle=True, seed=spec.seed, epoch=epoch,
                              workers=spec.workers, sampler=self.sampler)
        aug_gen = torch.Generator().manual_seed(spec.seed * 7919 + epoch)
        # Seed the global RNG per epoch too (dropout, hashing refits), so a resumed epoch replays exactly.
        torch.manual_seed(spec.seed * 104_729 + epoch)
        if spec.on_epoch_start is not None:
            spec.on_epoch_start(self.model, epoch)
        totals = _Totals()
        bar = _progress(loader, epoch, spec.epochs, enabled=progress)
        for x, y in bar:
            x, y = x.to(self.device), y.to(self.device)
            if self.data.augment:
                x = augment_batch(x, aug_gen)
            loss, logits, extras = self._step(x, y)
            n = y.numel()
            totals.seen += n
            totals.loss_sum += loss.item() * n
            totals.correct += (logits.argmax(1) == y).sum().item()
            for k, v in extras.items():
                totals.extras_sum[k] = totals.extras_sum.get(k, 0.0) + v * n
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(self._postfix(totals))
        return totals

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """One optimiser step on a batch: (loss, logits, the extra loss terms' values)."""
        spec, opt, scaler = self.spec, self.opt, self.scaler
        with _autocast(self.device, self.amp_dtype):
            logits = self.ddp_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.label_smoothing)
            if spec.ce_weight != 1.0:
                loss = spec.ce_weight * loss
            extras: dict[str, float] = {}
            if spec.extra_loss is not None:
                extra, extras = spec.extra_loss(self.model, x, logits, y)
                loss = loss + extra
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if spec.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), spec.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        self.sched.step()
        return loss, logits, extras

    def _postfix(self, totals: _Totals) -> dict[str, str]:
        spec = self.spec
        post = {"loss": f"{totals.loss_sum / totals.seen:.3f}", "acc": f"{100 * totals.correct / totals.seen:.1f}"}
        if spec.postfix is not None:
            post.update(spec.postfix(self.model))
        elif spec.epoch_metrics is not None:
            post.update({k: f"{v:.2f}" for k, v in list(spec.epoch_metrics(self.model).items())[:4]})
        return post

    def epoch_row(self, epoch: int, totals: _Totals, train_metrics: dict[str, float], t0: float) -> dict[str, Any]:
        """The epoch's metrics row, validation included."""
        val = evaluate(self.model, self.data.val, self.spec.eval_batch_size, self.device)
        seen = totals.seen
        row: dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": totals.loss_sum / max(1, seen),
            "train_acc": 100 * totals.correct / max(1, seen), "val_loss": val["loss"], "val_acc": val["acc"],
            "lr": self.opt.param_groups[0]["lr"], "epoch_s": time.perf_counter() - t0,
        }
        row.update({k: v / max(1, seen) for k, v in totals.extras_sum.items()})
        row.update(train_metrics)
        return row

    def save(self, ckpt_path: Path, metrics_path: Path, epoch: int, history: list[dict[str, Any]]) -> None:
        """``metrics.csv`` and the checkpoint to resume from, after an epoch (rank 0 only)."""
        row = history[-1]
        log.info("epoch %d/%d: train_loss %.4f val_acc %.2f%% (%.1fs)", epoch + 1, self.spec.epochs,
                 row["train_loss"], row["val_acc"], row["epoch_s"])
        atomic_write_text(metrics_path, pd.DataFrame(history).to_csv(index=False))
        payload = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                   "scheduler": self.sched.state_dict(), "epoch": epoch, "history": history, "rng": _rng_state(),
                   "meta": self.spec.meta}
        if self.scaler is not None:
            payload["scaler"] = self.scaler.state_dict()
        _save_checkpoint(ckpt_path, payload)


def train(model: nn.Module, data: DataBundle, spec: TrainSpec, out: Path, *, resume: bool = False,
          device: str = "cpu", progress: bool = True, until_epoch: int | None = None) -> dict[str, Any]:
    """Train ``model`` in place; returns the final metrics row. Writes into ``out``.

    ``until_epoch`` stops after that many epochs of the ``spec.epochs`` schedule (a time-sliced job; a later
    call with ``resume=True`` continues exactly where it stopped).
    """
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.csv"
    distributed = dist.is_available() and dist.is_initialized()
    main = is_main_process()
    loop = _Loop(model, data, spec, device, distributed)
    start_epoch, history = loop.restore(ckpt_path, resume)
    last: dict[str, Any] = history[-1] if history else {}
    for epoch in range(start_epoch, min(spec.epochs, until_epoch or spec.epochs)):
        t0 = time.perf_counter()
        totals = loop.run_epoch(epoch, progress and main)
        train_metrics = spec.epoch_metrics(model) if spec.epoch_metrics is not None else {}
        if distributed:  # loss/accuracy over every rank's shard
            totals = _Totals(*_sum_over_ranks(totals.seen, totals.correct, totals.loss_sum, totals.extras_sum,
                                              device))
        last = loop.epoch_row(epoch, totals, train_metrics, t0)
        history.append(last)
        if main:
            loop.save(ckpt_path, metrics_path, epoch, history)
    if main:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "meta": spec.meta}, buf)
        atomic_write_bytes(out / "weights.pt", buf.getvalue())
    if distributed:
        dist.barrier()  # no rank returns before rank 0's files are complete
    return last


def _amp_dtype(amp: str | None, device: str) -> torch.dtype | None:
    if amp in (None, "", "off"):
        return None
    if amp not in AMP_DTYPES:
        raise ConfigError(f"unknown amp mode '{amp}'; use one of off, {', '.join(AMP_DTYPES)}")
    if torch.device(device).type != "cuda":
        return None  # CPU trains in fp32 (autocast gains nothing on these CPUs)
    return AMP_DTYPES[amp]


def _autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _sum_over_ranks(seen: int, correct: int, loss_sum: float, extras_sum: dict[str, float], device: str):
    keys = sorted(extras_sum)
    # float64: exact for these counts; the reduction runs on the process group's device.
    t = torch.tensor([seen, correct, loss_sum, *(extras_sum[k] for k in keys)], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t)
    vals = t.tolist()
    return int(vals[0]), int(vals[1]), vals[2], dict(zip(keys, vals[3:]))


def _progress(loader, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
                disable=None if os.environ.get("CI") else False)
