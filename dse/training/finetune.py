"""Stage: fine-tune the chosen ShiftAddViT from the dense model (``dse finetune``).

Steps, in order:

1. Build the dense model from its checkpoint (the architecture recorded in the checkpoint's ``meta``) and
   keep a frozen copy as the distillation teacher.
2. Resolve the assignment (a YAML file, or the ShiftAddViT recipe: Hamming attention everywhere and a
   Mult/Shift MoE in every Linear) and, when it has MoE layers, each layer's expert costs from the cost
   model of the measured profile (:mod:`dse.cost.model`). No profile, no MoE: the balance loss is never given a
   constant.
3. :func:`models.reparam.reparameterize` the dense model, then fit every Hamming attention's hash on the
   first training batch of epoch 0 (un-augmented, the same on every rank; ``fit_hamming``). The fitted
   state is made of buffers and parameters, so it is saved in every checkpoint and a resumed run loads it
   instead of refitting. It is never refitted during training (the models package's policy).
4. Train with :func:`dse.training.train.train`::

       loss = (1 - w) * CE(z_s, y) + w * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + c * sum_l B_l

   — knowledge distillation from the dense teacher (Hinton, Vinyals & Dean, "Distilling the knowledge in a
   neural network", 2015: the T^2 factor keeps the soft term's gradient scale independent of T), ``w =
   finetune.kd_weight``, ``T = finetune.kd_temperature``, and the latency-aware MoE balance loss ``B_l`` of
   each MoE layer (:func:`models.moe.moe_balance_loss`) times ``c = finetune.moe_coef``.
5. Write ``weights.pt`` = ``{"model": state_dict, "meta": {...}}`` (architecture, assignment, costs and
   their provenance, reparameterisation options, dense and final validation accuracy), ``assignment.yaml``,
   ``costs.json`` (each MoE layer's expert costs, equilibrium share and provenance: measured on which device
   and target, or which regression law with its leave-one-out error; ``cost.strict`` refuses anything but
   measured) and the resolved config next to ``checkpoint.pt`` and ``metrics.csv``. :func:`dse.checkpoints.load_finetuned` rebuilds the model.

Per epoch ``metrics.csv`` also holds, for every MoE layer, the share of training tokens routed to the Mult
expert (``mult_share/<layer>``) and the cost model's equilibrium share ``c_shift / (c_mult + c_shift)``
(``eq_share/<layer>``, :func:`models.moe.equilibrium_share`: where the balance loss is zero), and their mean
absolute gap (``routing_gap``).

The defaults are those of ``FinetuneConfig`` (:mod:`dse.config`).

Validation during fine-tuning runs the PyTorch reference of the shift/matadd ops (the same arithmetic as
the TVM kernels, without compiling a kernel per shape); export and bench run the kernels.
"""

from __future__ import annotations

import copy
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import models
from dse.checkpoints import load_dense
from dse.config import Config, save_config
from dse.cost import provenance
from dse.cost.sources import load_costs
from dse.errors import CheckpointError, ConfigError, ProfileError
from dse.fileio import atomic_write_bytes, atomic_write_text
from dse.hardware.threads import set_torch_threads
from dse.training.data import DataBundle, epoch_loader, load_data
from dse.training.train import TrainSpec, evaluate, is_main_process, load_training_state, set_seed, train
from models.assignment import Assignment
from models.costs import ExpertCosts, expert_costs, expert_provenance
from models.hamming import fit_hamming
from models.moe import equilibrium_share, moe_balance_loss, moe_layers, reset_routing_stats
from models.ops import kernel_ops
from models.reparam import reparameterize

log = logging.getLogger(__name__)

RECIPE = {"attention": "hamming", "linear": "moe"}  # ShiftAddViT: additive attention, Mult/Shift MoE
COSTS_JSON = "costs.json"


# ---------------------------------------------------------------------------------------------------
# Building blocks


def resolve_assignment(model: nn.Module, path: str | Path | None) -> Assignment:
    """The assignment in ``path``, or the ShiftAddViT recipe for ``model`` when ``path`` is None."""
    if path is None:
        return Assignment.uniform(model, **RECIPE)
    assignment = Assignment.from_yaml(path)
    assignment.validate(model)
    return assignment


def moe_names(assignment: Assignment) -> list[str]:
    return [name for name, choice in assignment.linear.items() if choice == "moe"]


def resolve_costs(cfg: Config, model: nn.Module, assignment: Assignment, *, profile: str | Path | None = None,
                  costs: ExpertCosts | None = None) -> dict[str, dict[str, float]]:
    """``{moe layer: {"mult": c, "shift": c}}`` from ``costs`` if given, else the profile's cost model
    (:func:`resolve_layer_costs` without the provenance)."""
    return resolve_layer_costs(cfg, model, assignment, profile=profile, costs=costs)[0]


def resolve_layer_costs(cfg: Config, model: nn.Module, assignment: Assignment, *, profile: str | Path | None = None,
                        costs: ExpertCosts | None = None
                        ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Each MoE layer's expert costs and where they come from (:mod:`dse.cost.provenance`), from ``costs`` if
    given, else the profile's cost model.

    An assignment without MoE layers needs neither (returns ``({}, {})``); with MoE layers a missing profile is
    an error, never a default constant; with ``cost.strict`` so is any cost that is not measured.
    """
    names = moe_names(assignment)
    if not names:
        return {}, {}
    if costs is None:
        costs = load_costs(cfg, model, profile or cfg.finetune.profile)
    try:
        values = {name: expert_costs(costs, name) for name in names}
        records = {name: expert_provenance(costs, name) or dict(provenance.UNSTATED) for name in names}
    except models.ModelError as exc:
        raise ProfileError(f"{exc}; re-run `dse profile` for this model") from None
    if cfg.cost.strict:
        provenance.check_strict(records)
    return values, records


def write_costs_json(out: Path, costs: Mapping[str, Mapping[str, float]], records: Mapping[str, Any],
                     cfg: Config) -> Path:
    """``costs.json`` beside the checkpoint: every MoE layer's expert costs per token, the share where the
    balance loss vanishes, and the costs' provenance."""
    layers = {name: {**c, "equilibrium_share": equilibrium_share(c), "provenance": records.get(name)}
              for name, c in costs.items()}
    data = {"metric": cfg.cost.metric, "strict": cfg.cost.strict,
            "sources": provenance.counts(records), "layers": layers}
    return atomic_write_text(out / COSTS_JSON, json.dumps(data, indent=1, default=str) + "\n")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 · KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch (Hinton et al. 2015)."""
    t = float(temperature)
    log_p_s = F.log_softmax(student.float() / t, dim=-1)  # [B, classes]
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)  # [B, classes]
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (t * t)


class FinetuneObjective:
    """The ``extra_loss`` hook: distillation (``w·KD``) plus ``moe_coef`` × the MoE balance loss."""

    def __init__(self, teacher: nn.Module | None, kd_weight: float, temperature: float, moe_coef: float,
                 with_moe: bool):
        if kd_weight > 0 and teacher is None:
            raise ConfigError("finetune.kd_weight > 0 needs a teacher model")
        if temperature <= 0:
            raise ConfigError(f"config key 'finetune.kd_temperature' must be positive, got {temperature}")
        self.teacher = teacher
        self.kd_weight, self.temperature = kd_weight, temperature
        self.moe_coef, self.with_moe = moe_coef, with_moe

    def __call__(self, model: nn.Module, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = logits.new_zeros((), dtype=torch.float32)
        terms: dict[str, float] = {}
        if self.kd_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            kd = distillation_loss(logits, teacher_logits, self.temperature)
            loss = loss + self.kd_weight * kd
            terms["kd_loss"] = kd.item()
        if self.with_moe:
            balance = moe_balance_loss(model)
            if self.moe_coef > 0:
                loss = loss + self.moe_coef * balance
            terms["moe_balance"] = balance.item()
        return loss, terms


class RoutingMonitor:
    """Per-epoch routing statistics of the MoE layers (training tokens only, summed over ranks)."""

    def __init__(self, model: nn.Module, costs: Mapping[str, Mapping[str, float]]):
        self.layers = [name for name, _ in moe_layers(model)]
        self.equilibrium = {name: equilibrium_share(costs[name]) for name in self.layers if name in costs}

    def reset(self, model: nn.Module, epoch: int = 0) -> None:
        reset_routing_stats(model)

    def shares(self, model: nn.Module, all_ranks: bool = False) -> dict[str, float]:
        layers = dict(moe_layers(model))
        if not layers:
            return {}
        counts = torch.stack([layers[n].token_counts for n in self.layers]).double()  # [L, 2]
        if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        total = counts.sum(1).clamp_min(1)
        return dict(zip(self.layers, (counts[:, 0] / total).tolist()))

    def metrics(self, model: nn.Module) -> dict[str, float]:
        shares = self.shares(model, all_ranks=True)
        row: dict[str, float] = {}
        for name, share in shares.items():
            row[f"mult_share/{name}"] = share
        for name, eq in self.equilibrium.items():
            row[f"eq_share/{name}"] = eq
        if shares and self.equilibrium:
            row["routing_gap"] = self.gap(shares)
        return row

    def postfix(self, model: nn.Module) -> dict[str, str]:
        """Live Mult share (%) of each MoE layer this epoch, in model order (Shift gets the rest)."""
        shares = self.shares(model)
        if not shares:
            return {}
        return {"mult%": "/".join(f"{100 * s:.0f}" for s in shares.values())}

    def gap(self, shares: Mapping[str, float]) -> float:
        """Mean |Mult share - equilibrium share| over the MoE layers."""
        if not self.equilibrium:
            return float("nan")
        return sum(abs(shares[n] - self.equilibrium[n]) for n in self.equilibrium) / len(self.equilibrium)


def batch_size(cfg: Config) -> int:
    size = cfg.finetune.batch_size or cfg.data.batch_size
    if size < 1:
        raise ConfigError(f"config key 'finetune.batch_size' must be positive, got {size}")
    return size


def fit_batch(data: DataBundle, cfg: Config) -> torch.Tensor:
    """The first training batch of epoch 0, un-augmented: the hashing fit's input (the same on every rank)."""
    loader = epoch_loader(data.train, batch_size(cfg), shuffle=True, seed=cfg.seed, epoch=0)
    images, _ = next(iter(loader))
    return images


def build_student(dense: nn.Module, assignment: Assignment, costs: Mapping[str, Mapping[str, float]],
                  cfg: Config, records: Mapping[str, Any] | None = None) -> nn.Module:
    """The reparameterised model; each MoE layer gets its expert costs and their provenance (``records``)."""
    records = records or {}
    given = {name: {**c, "provenance": records[name]} if name in records else c for name, c in costs.items()}
    return reparameterize(dense, assignment, costs=given or None, **reparam_options(cfg))


def reparam_options(cfg: Config) -> dict[str, Any]:
    ft = cfg.finetune
    return {"nbits": ft.nbits, "weight_bits": ft.weight_bits, "frac_bits": ft.frac_bits, "gate": ft.gate,
            "seed": cfg.seed}


def train_spec(cfg: Config, objective: FinetuneObjective, monitor: RoutingMonitor, meta: dict) -> TrainSpec:
    ft = cfg.finetune
    return TrainSpec(epochs=ft.epochs, lr=ft.lr, min_lr=ft.min_lr, weight_decay=ft.weight_decay,
                     warmup_epochs=ft.warmup_epochs, label_smoothing=ft.label_smoothing, grad_clip=ft.grad_clip,
                     batch_size=batch_size(cfg), eval_batch_size=cfg.data.eval_batch_size, seed=cfg.seed,
                     workers=cfg.data.workers, extra_loss=objective,
                     epoch_metrics=monitor.metrics if monitor.layers else None,
                     on_epoch_start=monitor.reset if monitor.layers else None,
                     postfix=monitor.postfix if monitor.layers else None,
                     ce_weight=1.0 - ft.kd_weight, amp=None if ft.amp == "off" else ft.amp, meta=meta)


# ---------------------------------------------------------------------------------------------------
# The stage


def finetune(cfg: Config, out: Path, *, checkpoint: str | Path | None = None, assignment: str | Path | None = None,
             profile: str | Path | None = None, costs: ExpertCosts | None = None, model_name: str | None = None,
             resume: bool = False, progress: bool = True, data: DataBundle | None = None,
             device: str | None = None, until_epoch: int | None = None) -> dict[str, Any]:
    """Fine-tune the ShiftAddViT for an assignment (module docstring); returns a summary dict.

    ``checkpoint`` defaults to ``model.checkpoint``, ``assignment`` to ``finetune.assignment`` (None: the
    recipe), ``profile`` to ``finetune.profile`` or the store's profile; ``costs`` (a mapping or cost model)
    replaces the profile. ``device`` overrides ``cfg.device`` (e.g. ``cuda:1`` for one rank).
    """
    ft = cfg.finetune
    device = device or cfg.device
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    set_torch_threads(ft.threads)
    checkpoint = checkpoint or cfg.model.checkpoint
    if not checkpoint:
        raise ConfigError("no dense checkpoint: pass --checkpoint DENSE.pt or set model.checkpoint "
                          "(`dse pretrain` writes one)")
    dense, arch = load_dense(cfg, checkpoint, model_name)
    plan = resolve_assignment(dense, assignment if assignment is not None else ft.assignment)
    layer_costs, cost_records = resolve_layer_costs(cfg, dense, plan, profile=profile, costs=costs)
    for name, record in provenance.not_measured(cost_records).items():
        log.warning("the MoE expert costs of %s are %s, not measured", name, provenance.describe(record))
    data = data or load_data(cfg.data, cfg.seed)

    teacher = copy.deepcopy(dense).to(device).eval()
    teacher.requires_grad_(False)
    with kernel_ops("off"):
        dense_val = evaluate(teacher, data.val, cfg.data.eval_batch_size, device)["acc"]
        set_seed(cfg.seed)  # router initialisation and hash seeds: the same student for the same seed
        student = build_student(dense, plan, layer_costs, cfg, cost_records).to(device)
        del dense
        monitor = RoutingMonitor(student, layer_costs)
        previous = _resumable_meta(out / "checkpoint.pt", plan, layer_costs) if resume else None
        if previous is not None:  # the checkpoint holds the fitted hash; train() loads it
            start_shares = previous.get("routing_start", {})
        else:
            images = fit_batch(data, cfg).to(device)
            fitted = fit_hamming(student, images)
            log.info("fitted the hash of %d Hamming attention layer(s) on one batch of %d images", fitted,
                     images.shape[0])
            start_shares = _routing_on(student, images, monitor)
        meta = {"stage": "finetune", "architecture": arch, "assignment": plan.to_dict(), "costs": layer_costs,
                "cost_provenance": cost_records, "reparam": reparam_options(cfg), "dense_checkpoint": str(checkpoint), "dense_val_acc": dense_val,
                "routing_start": start_shares}
        if is_main_process():
            save_config(cfg, out)
            plan.to_yaml(out / "assignment.yaml")
            if layer_costs:
                write_costs_json(out, layer_costs, cost_records, cfg)
        objective = FinetuneObjective(teacher if ft.kd_weight > 0 else None, ft.kd_weight, ft.kd_temperature,
                                      ft.moe_coef, with_moe=bool(monitor.layers))
        row = train(student, data, train_spec(cfg, objective, monitor, meta), out, resume=resume, device=device,
                    progress=progress, until_epoch=until_epoch)
        final_val = evaluate(student, data.val, cfg.data.eval_batch_size, device)["acc"]
    end_shares = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("mult_share/")}
    meta = {**meta, "val_acc": final_val, "epochs": row.get("epoch", 0)}
    if is_main_process():
        buf = io.BytesIO()
        torch.save({"model": student.state_dict(), "meta": meta}, buf)
        atomic_write_bytes(out / "weights.pt", buf.getvalue())
    summary = {
        "val_acc": final_val, "dense_val_acc": dense_val, "drop": dense_val - final_val,
        "epochs": row.get("epoch", 0), "assignment": plan.counts(), "weights": str(out / "weights.pt"),
        "moe_layers": len(monitor.layers), "routing_start": start_shares, "routing_end": end_shares,
        "equilibrium": monitor.equilibrium, "routing_gap_start": monitor.gap(start_shares) if start_shares else None,
        "routing_gap_end": monitor.gap(end_shares) if end_shares else None,
        "epoch_s": [r.get("epoch_s") for r in _history(out)],
        "cost_sources": provenance.counts(cost_records),
        "cost_provenance": {name: provenance.describe(r) for name, r in cost_records.items()},
        "costs_json": str(out / COSTS_JSON) if layer_costs else None,
    }
    return summary


def _resumable_meta(path: Path, plan: Assignment, costs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The meta of a checkpoint to resume from (None: nothing to resume); refuses another assignment."""
    if not path.exists():
        return None
    meta = load_training_state(path).get("meta") or {}
    if meta.get("assignment") != plan.to_dict():
        raise CheckpointError(f"{path} was written for another assignment; pass another --out, or drop --resume "
                              "to start over")
    if meta.get("costs") != dict(costs):
        log.warning("the expert costs changed since %s was written; the resumed epochs use the new ones", path)
    return meta


@torch.no_grad()
def _routing_on(model: nn.Module, images: torch.Tensor, monitor: RoutingMonitor) -> dict[str, float]:
    """Mult share per MoE layer on one batch (eval-mode routing: the training rule without noise)."""
    if not monitor.layers:
        return {}
    was_training = model.training
    model.eval()
    reset_routing_stats(model)
    try:
        model(images)
        return monitor.shares(model)
    finally:
        reset_routing_stats(model)
        model.train(was_training)


def _history(out: Path) -> list[dict]:
    path = out / "metrics.csv"
    if not path.exists():
        return []
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


__all__ = ["COSTS_JSON", "RECIPE", "FinetuneObjective", "RoutingMonitor", "distillation_loss", "finetune",
           "resolve_assignment", "resolve_costs", "resolve_layer_costs", "write_costs_json"]
