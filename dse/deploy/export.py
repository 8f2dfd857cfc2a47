"""Stage: compile a fine-tuned ShiftAddViT for a target and package it (``dse export``).

Steps:

1. Load the model: a fine-tuned ``weights.pt`` (:func:`dse.training.finetune.load_finetuned`), or a dense one —
   exported as is, or reparameterised for ``--assignment`` without training (hash fitted on one batch).
2. MoE layers get a static capacity (models/moe.py ``mult_capacity``: the ``floor(r·T + 0.5)`` tokens of a
   batch with the highest Mult probability go to Mult, the rest to Shift), which is what makes routing a
   static graph. ``r`` is the layer's measured routing share on the validation set (top-1 routing, at the
   export batch), unless the assignment fixes it. What that costs is measured and recorded: validation
   accuracy under top-1 routing vs capacity routing (a token whose router is close to 50/50 may land on
   the other expert) and the extra dispatch work in the graph (argsort + gathers + concat per MoE layer).
3. Each shift layer (MoE Shift experts included, at their token count) gets the faster of ``matshift``
   and ``matshift_decode`` for its shape: from the profile's cost model when a profile exists (the same
   rule the cost model prices with), else measured here by timing both kernels, else (a target that
   cannot run here and has no profile) ``matshift_decode``. The reason is recorded per layer.
4. :func:`dse.deploy.graph.export_form` → :func:`dse.deploy.graph.to_relax` → :func:`kernels.relax_pipeline.compile_relax`, and the
   artifact folder (:mod:`dse.deploy.artifact`) with the manifest written last, checksums included.
5. Where the target runs here, the artifact is loaded back through the torch-free loader (checksums
   verified) and checked against PyTorch on the whole validation set, batch by batch: validation
   accuracy, top-1 agreement and the largest logit difference relative to the largest logit
   (``max|z_tvm - z_torch| / max|z_torch|`` per batch); and its latency is measured. The PyTorch side
   is the export form, whose shift layers compute exactly what each compiled kernel computes (see
   :func:`dse.deploy.graph.packed_shift_linear`).

With ``export.cuda_arch`` set and a CPU primary target, a compile-only CUDA artifact for the same model
is written inside it (``<out>/cuda-<arch>``, so everything the export writes is under ``--out``); its
manifest says ``run_on_device: false``.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kernels
import models
from dse.checkpoints import architecture, build_from_architecture, load_finetuned
from dse.config import Config, config_to_dict
from dse.cost import model as cost
from dse.cost.sources import energy_label, model_cost
from dse.deploy import artifact as art
from dse.deploy import graph
from dse.errors import CheckpointError, ConfigError, ShiftAddError
from dse.fileio import atomic_write
from dse.hardware.device import describe_device, versions
from dse.hardware.threads import set_torch_threads, tvm_threads, use_all_cores
from dse.profiling import store
from dse.profiling.inventory import build_inventory
from dse.profiling.profiler import busy_host_warning, load_1m
from dse.training.data import load_data
from dse.training.finetune import reparam_options
from kernels.compiled import library_functions
from kernels.relax_pipeline import CompiledRelax, compile_relax_recorded
from kernels.torch_ops import use_tvm
from models.assignment import DENSE, Assignment, layer_kinds
from models.hamming import fit_hamming
from models.moe import moe_layers, reset_routing_stats, routing_shares, set_moe_capacity
from models.ops import kernel_ops
from models.reparam import reparameterize
from models.shift import ShiftLinear

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Loading


def checkpoint_file(path: str | Path) -> Path:
    """``weights.pt`` itself, or the one inside a stage folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "weights.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the weights.pt (or its folder) that "
                              "`dse finetune` or `dse pretrain` wrote")
    return path


def load_model(cfg: Config, checkpoint: str | Path, assignment: str | Path | None = None,
               fit_images: torch.Tensor | None = None) -> tuple[nn.Module, Assignment, dict[str, Any]]:
    """(ShiftAddViT in eval mode, its assignment, checkpoint meta)."""
    path = checkpoint_file(checkpoint)
    meta = dict(models.read_checkpoint(path).get("meta") or {})
    if meta.get("assignment"):
        model, meta = load_finetuned(path)
        plan = Assignment.from_dict(meta["assignment"])
        if assignment is not None:
            given = Assignment.from_yaml(assignment)
            if given.attention != plan.attention or given.linear != plan.linear:
                raise CheckpointError(f"{path} was fine-tuned for another assignment than {assignment}; export it "
                                      "without --assignment or fine-tune for that assignment")
            plan.capacity = dict(given.capacity)
        return model.eval(), plan, meta
    arch = meta.get("architecture") or architecture(cfg)
    dense = build_from_architecture(arch)
    models.load_weights(dense, path)
    meta = {**meta, "architecture": arch, "dense_checkpoint": str(path)}
    if assignment is None:
        return dense.eval(), Assignment(), meta
    plan = Assignment.from_yaml(assignment)
    plan.validate(dense)
    if set(plan.counts()) - set(DENSE.values()):  # an all-mult plan (the dense baseline) converts nothing
        log.warning("exporting %s reparameterised for %s without fine-tuning: accuracy will be that of the "
                    "converted dense weights", path, assignment)
    torch.manual_seed(cfg.seed)  # router initialisation: the same model for the same seed
    model = reparameterize(dense, plan, costs=None, **reparam_options(cfg)).eval()
    if fit_images is not None:
        fit_hamming(model, fit_images)
    return model, plan, meta


def val_tensors(cfg: Config, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images and labels (the config's data, seeded split), stacked in order."""
    data = load_data(cfg.data, cfg.seed)
    xs, ys = [], []
    loader = torch.utils.data.DataLoader(data.val, batch_size=256, shuffle=False)
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        if limit is not None and sum(len(v) for v in xs) >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def batches(x: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, int]]:
    """``(batch tensor, real rows)``; the last partial batch repeats its final image (as the loader does)."""
    out = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        real = len(chunk)
        if real < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - real, *chunk.shape[1:])])
        out.append((chunk, real))
    return out


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Eval-mode logits, ``batch`` images per call. The shift/matadd custom ops run their PyTorch
    references (same arithmetic as the kernels, exact for the integer ones), not per-shape TVM builds."""
    model.eval()
    with use_tvm(False):
        return torch.cat([model(chunk)[:real] for chunk, real in batches(x, batch)])


def accuracy(logits: np.ndarray | torch.Tensor, labels: torch.Tensor) -> float:
    pred = np.asarray(logits).argmax(1)
    return float((pred == labels.numpy()).mean() * 100.0)


# ---------------------------------------------------------------------------------------------------
# MoE capacity


@torch.no_grad()
def calibrate_capacity(model: nn.Module, x: torch.Tensor, batch: int, fixed: dict[str, float] | None = None
                       ) -> dict[str, float]:
    """Set every MoE layer's capacity to its top-1 routing share on ``x`` (``fixed`` wins); returns them.

    Routing is measured with the PyTorch reference of the shift layers (the arithmetic fine-tuning
    validated with).
    """
    layers = dict(moe_layers(model))
    if not layers:
        return {}
    fixed = dict(fixed or {})
    set_moe_capacity(model, None)
    reset_routing_stats(model)
    with kernel_ops("off"):
        logits_of(model, x, batch)
    shares = routing_shares(model)
    reset_routing_stats(model)
    capacity = {name: float(fixed.get(name, shares[name])) for name in layers}
    set_moe_capacity(model, capacity)
    return capacity


# ---------------------------------------------------------------------------------------------------
# Shift primitive per layer


def shift_shapes(model: nn.Module, tokens: int) -> dict[str, tuple[int, int, int, int]]:
    """``{ShiftLinear name: (1, rows, in, out)}``; a MoE Shift expert gets the tokens its capacity leaves
    (possibly none)."""
    moe = dict(moe_layers(model))
    shapes = {}
    for name, module in model.named_modules():
        if not isinstance(module, ShiftLinear):
            continue
        rows = tokens
        parent = name.rpartition(".")[0]
        if parent in moe and moe[parent].mult_capacity is not None:
            rows = tokens - int(math.floor(moe[parent].mult_capacity * tokens + 0.5))
        shapes[name] = (1, rows, module.in_features, module.out_features)  # rows 0: the expert never runs
    return shapes


def profile_table(cfg: Config, target: Any, profile: str | Path | None, *, here: bool = False
                   ) -> tuple[Any, str | None]:
    """(cost table of the profile for ``target`` or None, which file / why not). Without ``profile``: this
    device's profile for the target, else the one device's under ``profile.dir`` that has it (exporting for a
    device measured elsewhere). ``here``: the caller measures on this machine, so only this device's profile
    is accepted, and any other is a ProfileError."""
    tdict = kernels.targets.target_to_dict(kernels.resolve_target(target))
    try:
        if profile is None:
            profile = store.find_profile(cfg.profile.dir, kernels.target_slug(tdict), _this_device(tdict))
        data = cost.read_profile(profile)
        cost.check_profile_target(data, tdict)
    except ShiftAddError as exc:
        return None, str(exc)
    if here:
        cost.check_profile(data, tdict)
    return cost.CostTable(data), str(profile)


def _this_device(tdict: dict[str, Any]) -> str | None:
    """This machine's slug for the target's kind of device, or None when it has no such device."""
    try:
        return describe_device("cuda" if tdict.get("kind") == "cuda" else "cpu").slug
    except ShiftAddError:
        return None


def choose_shift_primitives(shapes: dict[str, tuple[int, int, int, int]], target: Any, table: Any,
                            reason: str | None, force: str | dict[str, str] = "auto") -> dict[str, dict[str, Any]]:
    """``{layer: {"primitive", "source", "latency_ms": {prim: ms}}}`` (see the module docstring, step 3).

    ``force`` is ``export.shift_primitive``: a primitive for every layer, or ``{layer: primitive}`` for some
    (a MoE layer's name covers its Shift expert); ``auto`` (or an unnamed layer) applies the rule.
    """
    forced: dict[str, str] = {}
    for name in shapes:
        choice = force.get(name, force.get(name.rpartition(".")[0], "auto")) if isinstance(force, dict) else force
        if choice != "auto":
            forced[name] = choice
    unknown = sorted(set(force) - {n for n in shapes} - {n.rpartition(".")[0] for n in shapes}) \
        if isinstance(force, dict) else []
    if unknown:
        raise ConfigError(f"export.shift_primitive names {', '.join(unknown)}, which are not shift layers of this "
                          f"model; shift layers: {', '.join(shapes)}")
    tgt = kernels.resolve_target(target)
    runnable = not kernels.targets.is_cuda(tgt) or kernels.cuda_available()
    measured: dict[tuple[int, int, int, int], dict[str, float]] = {}
    out = {}
    for name, shape in shapes.items():
        if shape[1] == 0:
            out[name] = {"primitive": forced.get(name, "matshift_decode"),
                         "source": "unused: the MoE capacity sends every token to the Mult expert"}
            continue
        if name in forced:
            out[name] = {"primitive": forced[name], "source": "export.shift_primitive"}
            continue
        if table is not None:
            try:
                prim = cost.fastest_shift_primitive(table, "tvm", *shape)
                out[name] = {"primitive": prim, "source": "profile"}
                continue
            except ShiftAddError as exc:
                reason = str(exc)
        if runnable:
            if shape not in measured:
                measured[shape] = {p: kernels.build(p, *shape, target=tgt).time(min_repeat_ms=20, repeat=5).median_ms
                                   for p in graph.SHIFT_PRIMITIVES}
            out[name] = {"primitive": graph.fastest_shift(shape, measured[shape]), "source": "measured at export",
                         "latency_ms": measured[shape]}
        else:
            out[name] = {"primitive": "matshift_decode",
                         "source": f"default (cannot run {kernels.target_slug(tgt)} here; {reason})"}
    return out


# ---------------------------------------------------------------------------------------------------
# Cost-model prediction


def predict_cost(cfg: Config, model: nn.Module, plan: Assignment, batch: int, table: Any) -> dict[str, Any]:
    """The cost model's whole-model latency/energy for this assignment, or why there is none."""
    if table is None:
        return {"available": False, "reason": "no matching profile"}
    try:
        priced = model_cost(table, cfg.cost, build_inventory(model, batch=batch))
        pred = priced.predict(plan)
        return {"available": True, "latency_ms": float(pred.latency_ms), "energy_mj": float(pred.energy_mj),
                "energy_source": energy_label(priced),  # nvml/rapl measured, or model (analytical)
                "source": priced.source(plan)}  # the costs' provenance: measured, or which figures are regressed
    except ShiftAddError as exc:
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}


def no_prediction_reason(prediction: dict[str, Any] | None) -> str:
    """Why an export made no prediction (its manifest's ``prediction``: the cost model's reason, else the
    profile lookup's)."""
    pred = prediction or {}
    return str(pred.get("reason") or pred.get("profile") or "the manifest records no prediction")


# ---------------------------------------------------------------------------------------------------
# Writing


def _write_weights(path: Path, params: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, **params)
        tmp.write_bytes(buf.getvalue())

    atomic_write(path, write)


def _weights_summary(params: dict[str, np.ndarray]) -> dict[str, Any]:
    by_dtype: dict[str, int] = {}
    for value in params.values():
        by_dtype[str(value.dtype)] = by_dtype.get(str(value.dtype), 0) + int(value.nbytes)
    return {"arrays": len(params), "bytes": int(sum(by_dtype.values())), "bytes_by_dtype": by_dtype}


def _kernel_summary(g: graph.RelaxGraph, compiled: CompiledRelax) -> dict[str, Any]:
    """The manifest's ``kernels`` — one row per kernel the BUILT library defines (primitive, problem size, how often
    main() calls it) — and ``library``: the compile pipeline that built it and any kernel the graph asked for but
    the library lacks (the graph alone would list those as if they ran)."""
    counts: dict[str, int] = {}
    for name in graph.call_tir_targets(g.mod):
        counts[name] = counts.get(name, 0) + 1
    built = set(library_functions(compiled.executable))
    rows = [{"function": name, "primitive": prim, **dict(zip("bmkn", g.kernel_shapes[name])),
             "calls": counts.get(name, 0)} for name, prim in sorted(g.kernel_calls.items())]
    missing = [r["function"] for r in rows if r["function"] not in built]
    if missing:
        log.warning("the built library lacks %d kernel(s) the graph calls (e.g. %s); compile pipeline %s",
                    len(missing), missing[0], compiled.pipeline)
    library = {"pipeline": compiled.pipeline, "functions": len(built), "kernels_missing": missing}
    if compiled.fallback_reason:
        library["fallback_reason"] = compiled.fallback_reason
    return {"kernels": [r for r in rows if r["function"] in built], "library": library}


def write_artifact(out: Path, g: graph.RelaxGraph, exe: Any, plan: Assignment, manifest: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for stale in (art.MANIFEST,):  # a half-written folder must never look finished
        (out / stale).unlink(missing_ok=True)
    exe.export_library(str(out / art.LIBRARY))
    _write_weights(out / art.WEIGHTS, g.params)
    plan.to_yaml(out / art.ASSIGNMENT)
    art.write_manifest(out, manifest)
    return out


# ---------------------------------------------------------------------------------------------------
# The stage


def export(cfg: Config, checkpoint: str | Path, out: str | Path, *, target: Any = None,
           assignment: str | Path | None = None, profile: str | Path | None = None,
           cuda_arch: str | None | bool = True) -> dict[str, Any]:
    """Compile and package the model (module docstring). Returns a summary; ``cuda_arch=True`` means
    ``cfg.export.cuda_arch``."""
    ex = cfg.export
    set_torch_threads(ex.threads)
    use_all_cores()  # before any kernel runs: the shift-kernel timing and the latency use every core
    out = Path(out)
    target = target if target is not None else ex.target
    tgt = kernels.resolve_target(target)
    target_dict = kernels.targets.target_to_dict(tgt)
    batch = ex.batch
    t_start = time.perf_counter()

    x_val, y_val = val_tensors(cfg, ex.val_images)
    fit = x_val[: cfg.data.batch_size]
    model, plan, meta = load_model(cfg, checkpoint, assignment, fit_images=fit)
    tokens = batch * tokens_per_image(model, x_val[:1])

    capacity = calibrate_capacity(model, x_val, batch, plan.capacity)
    plan = Assignment(attention=dict(plan.attention), linear=dict(plan.linear), capacity=capacity)
    log.info("loaded and calibrated the model in %.1f s (MoE capacity %s)", time.perf_counter() - t_start, capacity)
    shapes = shift_shapes(model, tokens)
    table, table_reason = profile_table(cfg, tgt, profile)
    choices = choose_shift_primitives(shapes, tgt, table, table_reason, ex.shift_primitive)
    form = graph.export_form(model, lambda name, _layer: choices[name]["primitive"])

    t0 = time.perf_counter()
    example = full_batch(x_val, batch)
    g = graph.to_relax(form, example.contiguous(), tgt, tune_trials=ex.tune_trials,
                       tuning_dir=cfg.profile.tuning_dir)
    log.info("imported the traced model into Relax in %.1f s", time.perf_counter() - t0)
    compiled = compile_relax_recorded(g.mod, tgt)
    exe = compiled.executable
    compile_s = time.perf_counter() - t0
    log.info("compiled for %s in %.1f s", kernels.target_slug(tgt), compile_s)

    t0 = time.perf_counter()
    moe_cost = _moe_cost(form, x_val, y_val, batch, capacity)
    ref_logits = logits_of(form, x_val, batch)
    manifest = _manifest(cfg, meta, plan, g, compiled, tgt, target_dict, batch, tokens, choices, capacity, moe_cost,
                         predict_cost(cfg, model, plan, batch, table), table_reason, checkpoint)
    manifest["accuracy"] = {"val_images": len(x_val), "pytorch_val_acc": accuracy(ref_logits, y_val),
                            "finetune_val_acc": meta.get("val_acc")}
    manifest["compile_s"] = round(compile_s, 1)
    manifest["run_on_device"] = False
    write_artifact(out, g, exe, plan, manifest)
    if not kernels.targets.is_cuda(tgt) or kernels.cuda_available():
        manifest = _check_on_device(out, manifest, x_val, y_val, ref_logits, ex.repeat)
    else:
        manifest["latency"] = {"measured": None, "note": "compile-only: no CUDA device on the exporting machine"}
        manifest["accuracy"].update(compiled_val_acc=None, top1_agreement=None, max_rel_logit_err=None,
                                    median_rel_logit_err=None)
    art.write_manifest(out, manifest)
    log.info("checked the artifact against PyTorch in %.1f s", time.perf_counter() - t0)
    summary = _summary(out, manifest)

    arch = cfg.export.cuda_arch if cuda_arch is True else (cuda_arch or None)
    if arch and not kernels.targets.is_cuda(tgt):
        t0 = time.perf_counter()
        cuda_tgt = kernels.resolve_target(f"cuda:{arch}")
        cuda_table, cuda_reason = profile_table(cfg, cuda_tgt, None)
        cuda_choices = choose_shift_primitives(shapes, cuda_tgt, cuda_table, cuda_reason, ex.shift_primitive)
        cuda_form = graph.export_form(model, lambda name, _layer: cuda_choices[name]["primitive"])
        summary["cuda"] = export_compile_only(cuda_form, plan, example, out / f"cuda-{arch}",
                                              cuda_tgt, cuda_choices, manifest)
        log.info("compiled the CUDA companion in %.1f s", time.perf_counter() - t0)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    return summary


def export_compile_only(form: nn.Module, plan: Assignment, example: torch.Tensor, out: Path, tgt: Any,
                        choices: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The export form compiled for a CUDA target without running it (no GPU needed)."""
    t0 = time.perf_counter()
    g = graph.to_relax(form, example.contiguous(), tgt)
    compiled = compile_relax_recorded(g.mod, tgt)
    exe = compiled.executable
    arch = kernels.targets.target_to_dict(tgt).get("arch")
    manifest = {k: v for k, v in base.items() if k not in ("latency", "files")}
    manifest.update({
        "target": kernels.targets.target_to_dict(tgt), "target_slug": kernels.target_slug(tgt),
        "device": {"kind": "cuda", "name": f"an NVIDIA GPU of {arch}", "note": "compile-only, not run here"},
        **_kernel_summary(g, compiled), "params": g.param_names, "weights": _weights_summary(g.params),
        "shift_primitives": choices, "run_on_device": False, "compile_s": round(time.perf_counter() - t0, 1),
        "latency": {"measured": None, "note": "compile-only artifact: no CUDA device on the exporting machine"},
        "prediction": {"available": False, "reason": "no CUDA profile used for the companion artifact"},
    })
    manifest["accuracy"] = {**base.get("accuracy", {}), "compiled_val_acc": None, "top1_agreement": None,
                            "max_rel_logit_err": None, "median_rel_logit_err": None}
    write_artifact(out, g, exe, plan, manifest)
    return {"folder": str(out), "target": manifest["target_slug"], "run_on_device": False,
            "compile_pipeline": manifest["library"]["pipeline"]}


def tokens_per_image(model: nn.Module, image: torch.Tensor) -> int:
    """Rows per image at the first decision Linear (patches + prefix tokens), seen by a forward hook."""
    linear_names = [n for n, k in layer_kinds(model).items() if k == "linear"]
    if not linear_names:
        return 1
    seen: list[int] = []
    handle = model.get_submodule(linear_names[0]).register_forward_hook(
        lambda _m, inp, _out: seen.append(int(inp[0].reshape(-1, inp[0].shape[-1]).shape[0])))
    try:
        with torch.no_grad(), kernel_ops("off"):
            model.eval()(image)
    finally:
        handle.remove()
    return seen[0] // len(image)


def _moe_cost(form: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
              capacity: dict[str, float]) -> dict[str, Any] | None:
    """Validation accuracy with top-1 routing vs the static capacity (both on the export form)."""
    if not capacity:
        return None
    set_moe_capacity(form, None)
    top1 = accuracy(logits_of(form, x, batch), y)
    set_moe_capacity(form, capacity)
    cap = accuracy(logits_of(form, x, batch), y)
    return {"val_acc_top1_routing": top1, "val_acc_capacity_routing": cap, "delta_points": cap - top1,
            "dispatch_ops_per_layer": "argsort(T) + argsort (inverse) + 2 gathers + concat"}


def _manifest(cfg: Config, meta: dict[str, Any], plan: Assignment, g: graph.RelaxGraph, compiled: CompiledRelax,
              tgt: Any,
              target_dict: dict[str, Any], batch: int, tokens: int, choices: dict[str, Any], capacity: dict[str, float],
              moe_cost: dict[str, Any] | None, prediction: dict[str, Any], table_reason: str | None,
              checkpoint: str | Path) -> dict[str, Any]:
    kind = "cuda" if kernels.targets.is_cuda(tgt) else "cpu"
    try:
        device = describe_device(kind).as_dict() if kind == "cpu" else {"kind": "cuda"}
    except ShiftAddError as exc:
        device = {"kind": kind, "error": str(exc)}
    return {
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {"architecture": meta.get("architecture"), "assignment_counts": plan.counts()},
        "source_checkpoint": str(checkpoint_file(checkpoint)),
        "dense_checkpoint": meta.get("dense_checkpoint"),
        "data": config_to_dict(cfg)["data"], "seed": cfg.seed,
        "target": target_dict, "target_slug": kernels.target_slug(tgt), "device": device, "versions": versions(),
        "input": {"shape": list(g.input_shape), "dtype": g.input_dtype, "batch": batch},
        "params": g.param_names, "weights": _weights_summary(g.params),
        **_kernel_summary(g, compiled),
        "shift_primitives": choices,
        "moe": {"capacity": capacity, "cost": moe_cost, "tokens_per_batch": tokens} if capacity else None,
        "prediction": {**prediction, "profile": table_reason},
    }


def relative_logit_errors(logits: np.ndarray, ref: np.ndarray, batch: int) -> list[float]:
    """Per batch ``max|z - z_ref| / max|z_ref|``: the error relative to the batch's logit scale (a per-element
    relative error is meaningless for logits near zero)."""
    return [float(np.abs(logits[i:i + batch] - ref[i:i + batch]).max() / max(float(np.abs(ref[i:i + batch]).max()),
                                                                              1e-12))
            for i in range(0, len(ref), batch)]


def full_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The first ``batch`` images of ``x`` [N, C, H, W], cycling through them when there are fewer: the compiled
    graph is static, so a validation set smaller than one batch still makes one."""
    return x[torch.arange(batch) % len(x)]


def _check_on_device(out: Path, manifest: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                     ref: torch.Tensor, repeat: int) -> dict[str, Any]:
    loaded = art.Artifact.load(out)
    logits = loaded.predict(x.numpy())
    ref_np = ref.numpy()
    errs = relative_logit_errors(logits, ref_np, loaded.batch)
    batch = loaded.batch
    agree = float((logits.argmax(1) == ref_np.argmax(1)).mean())
    timing = loaded.time(full_batch(x, batch).numpy(), repeat=repeat)
    manifest = dict(manifest)
    manifest["accuracy"] = {**manifest["accuracy"], "compiled_val_acc": accuracy(logits, y), "top1_agreement": agree,
                            "max_rel_logit_err": max(errs), "median_rel_logit_err": float(np.median(errs))}
    load = load_1m()
    manifest["latency"] = {"measured": timing.as_dict(), "batch": batch, "threads": tvm_threads(), "load_1m": load,
                           "load_warning": busy_host_warning(load, describe_device("cpu").cores, "dse export")}
    manifest["run_on_device"] = True
    return manifest


def _summary(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    acc = manifest.get("accuracy", {})
    lat = (manifest.get("latency") or {}).get("measured") or {}
    return {"folder": str(out), "target": manifest["target_slug"], "run_on_device": manifest["run_on_device"],
            "kernels": sorted({k["primitive"] for k in manifest["kernels"]}),
            "compile_pipeline": (manifest.get("library") or {}).get("pipeline"),
            "kernels_missing": (manifest.get("library") or {}).get("kernels_missing", []),
            "pytorch_val_acc": acc.get("pytorch_val_acc"), "compiled_val_acc": acc.get("compiled_val_acc"),
            "top1_agreement": acc.get("top1_agreement"), "max_rel_logit_err": acc.get("max_rel_logit_err"),
            "latency_ms": lat.get("median_ms"), "prediction": manifest.get("prediction"),
            "load_warning": (manifest.get("latency") or {}).get("load_warning"),
            "moe": manifest.get("moe"), "manifest_sha256": art.manifest_digest(out)}


__all__ = ["calibrate_capacity", "choose_shift_primitives", "export", "load_model", "no_prediction_reason", "tokens_per_image",
           "val_tensors"]
