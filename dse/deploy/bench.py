"""``dse bench``: the exported ShiftAddViT against the dense model in PyTorch, side by side, one run.

Contestants, all on the same images (the first ``batch`` validation images of the data the artifact was
exported with) and the same batch:

* the artifact, through the torch-free loader (:mod:`dse.deploy.artifact`, checksums verified);
* the dense model in PyTorch eager mode (``torch.inference_mode``);
* the dense model under ``torch.compile`` (skipped with ``--no-compile``; its compile time is reported).

Timing is interleaved: ``rounds`` rounds, each running every contestant for a block of calls, so slow
drifts of a shared machine (other jobs starting or stopping) hit all of them alike; per-call wall times
are pooled per contestant into a median and a p90. Blocks rather than strict alternation, so that one
runtime's spinning worker threads are idle again before the other runtime runs.

Energy: a measured source (``nvml`` for CUDA, ``rapl`` for CPU) when one works here; otherwise the
analytical model (``dse.hardware.energy``, 45 nm per-operation energies) over the kernels each model runs —
labelled, and covering the GEMM-like kernels only. Predictions: the cost model of a matching profile
(backend ``tvm`` for the artifact, ``torch`` for the dense eager model) and its error against the
measured median.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import models
from dse.checkpoints import build_from_architecture
from dse.config import Config, config_from_dict
from dse.cost.model import check_profile, read_profile
from dse.cost.sources import model_cost
from dse.deploy import artifact as art
from dse.deploy.export import profile_table, val_tensors
from dse.errors import CheckpointError, ShiftAddError
from dse.hardware import energy as en
from dse.hardware.threads import set_threads, tvm_threads
from dse.profiling.inventory import build_inventory
from dse.profiling.profiler import load_1m
from models.assignment import Assignment

log = logging.getLogger(__name__)


def _inputs(manifest: dict[str, Any], cfg: Config) -> tuple[np.ndarray, str]:
    batch = int(manifest["input"]["batch"])
    shape = tuple(int(s) for s in manifest["input"]["shape"])
    try:
        data = manifest.get("data")
        if data:
            cfg = config_from_dict({"data": dict(data), "seed": int(manifest.get("seed", cfg.seed))})
        x, _ = val_tensors(cfg, batch)
        if tuple(x.shape) == shape:
            return x.numpy().astype(manifest["input"]["dtype"]), f"validation images 0..{batch - 1}"
    except ShiftAddError as exc:
        log.info("validation images unavailable (%s); using random inputs", exc)
    rng = np.random.default_rng(0)
    return rng.standard_normal(shape).astype(manifest["input"]["dtype"]), "seeded random normal images"


def dense_model(manifest: dict[str, Any], cfg: Config, dense: str | Path | None = None) -> tuple[nn.Module, str]:
    """The dense baseline: ``dense`` or the manifest's ``dense_checkpoint`` or ``model.checkpoint``."""
    path = dense or manifest.get("dense_checkpoint") or cfg.model.checkpoint
    if not path or not Path(path).is_file():
        raise CheckpointError(f"no dense checkpoint to compare with (manifest says {path!r}); pass --dense FILE "
                              "(the weights.pt of `dse pretrain`)")
    arch = (manifest.get("model") or {}).get("architecture")
    if not arch:
        arch = (models.read_checkpoint(path).get("meta") or {}).get("architecture")
    if not arch:
        raise CheckpointError(f"neither the manifest nor {path} records the architecture; re-export the model")
    model = build_from_architecture(arch)
    models.load_weights(model, path)
    return model.eval(), str(path)


def _timed_block(fn: Callable[[], Any], calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def interleaved(contestants: dict[str, Callable[[], Any]], *, repeat: int, warmup: int, rounds: int = 3
                ) -> dict[str, art.LatencyStats]:
    """Per-call wall times of each contestant, ``rounds`` blocks each (module docstring)."""
    for fn in contestants.values():
        for _ in range(warmup):
            fn()
    per_round = max(1, -(-repeat // rounds))
    samples: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            samples[name] += _timed_block(fn, per_round)
    return {name: art.LatencyStats.from_ms(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------------
# Energy


def _dense_kernel_calls(model: nn.Module, x: torch.Tensor) -> list[tuple[str, int, int, int, int]]:
    """(primitive, b, m, k, n) of the dense model's GEMMs: every Linear and both attention products."""
    calls: list[tuple[str, int, int, int, int]] = []
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(
                lambda m, inp, _o: calls.append(("matmul", 1, inp[0].numel() // m.in_features, m.in_features,
                                                 m.out_features))))
        elif hasattr(module, "qkv") and hasattr(module, "num_heads") and hasattr(module, "head_dim"):
            def attn_hook(m: nn.Module, inp: tuple, _o: Any) -> None:
                bsz, tokens, _ = inp[0].shape
                bh, d = bsz * m.num_heads, m.head_dim
                calls.extend([("bmm", bh, tokens, d, tokens), ("bmm", bh, tokens, tokens, d)])

            hooks.append(module.register_forward_hook(attn_hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def energy(manifest: dict[str, Any], dense: nn.Module, x: torch.Tensor, fns: dict[str, Callable[[], Any]]
           ) -> dict[str, dict[str, Any]]:
    """{contestant: {"energy_mj", "energy_source"}} (module docstring)."""
    kind = "cuda" if (manifest.get("target") or {}).get("kind") == "cuda" else "cpu"
    try:
        source = en.select_source(kind, ["nvml", "rapl", "model"])
    except ShiftAddError as exc:
        return {name: {"energy_mj": None, "energy_source": f"none ({exc})"} for name in fns}
    if not isinstance(source, en.AnalyticalEnergyModel):
        out = {}
        for name, fn in fns.items():
            reading = source.measure(fn)
            out[name] = {"energy_mj": reading.energy_mj_per_call, "energy_source": source.name}
        source.close()
        return out
    tvm_calls = [(k["primitive"], k["b"], k["m"], k["k"], k["n"], k["calls"]) for k in manifest["kernels"]]
    dense_calls = [(*c, 1) for c in _dense_kernel_calls(dense, x)]
    totals = {}
    for label, calls in (("tvm", tvm_calls), ("dense", dense_calls)):
        totals[label] = float(sum(source.estimate(p, b, m, k, n).energy_mj * count for p, b, m, k, n, count in calls))
    label = "model (analytical, GEMM-like kernels only)"
    return {name: {"energy_mj": totals["tvm" if name == "tvm" else "dense"], "energy_source": label} for name in fns}


# ---------------------------------------------------------------------------------------------------
# The command


def bench(cfg: Config, artifact_dir: str | Path, *, torch_compile: bool | None = None, dense: str | Path | None = None,
          profile: str | Path | None = None) -> dict[str, Any]:
    b = cfg.bench
    set_threads(b.threads)
    torch_compile = b.torch_compile if torch_compile is None else torch_compile
    loaded = art.Artifact.load(artifact_dir)
    manifest = loaded.manifest
    if profile is not None:  # the bench measures here: another device's profile cannot be checked against it
        check_profile(read_profile(profile), manifest["target"])
    images, source = _inputs(manifest, cfg)
    model, dense_path = dense_model(manifest, cfg, dense)
    x = torch.from_numpy(images.copy())
    inp = loaded.device_input(images)

    def run_tvm() -> Any:
        return loaded._call(inp).numpy()

    @torch.inference_mode()  # PyTorch's fastest eager inference (no autograd bookkeeping), as the profile's rows
    def run_eager() -> Any:
        return model(x)

    fns: dict[str, Callable[[], Any]] = {"tvm": run_tvm, "eager": run_eager}
    compile_s = None
    if torch_compile:
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        compile_s = time.perf_counter() - t0

        @torch.inference_mode()
        def run_compiled() -> Any:
            return compiled(x)

        fns["compiled"] = run_compiled
    with torch.no_grad():
        agree = float((loaded.run(images).argmax(1) == model(x).numpy().argmax(1)).mean())
    stats = interleaved(fns, repeat=b.repeat, warmup=b.warmup)
    energies = energy(manifest, model, x, fns)
    predictions = _predictions(cfg, manifest, model, profile)
    labels = {"tvm": f"ShiftAddViT (TVM, {manifest['target_slug']})", "eager": "dense (PyTorch eager)",
              "compiled": "dense (torch.compile)"}
    eager_ms = stats["eager"].median_ms
    rows = []
    for name in fns:
        s, pred = stats[name], predictions.get(name)
        rows.append({
            "model": labels[name], "median_ms": s.median_ms, "p90_ms": s.p90_ms,
            "speedup_vs_eager": eager_ms / s.median_ms, **energies[name],
            "predicted_ms": pred, "prediction_error_pct": None if pred is None else
            100.0 * (pred - s.median_ms) / s.median_ms,
        })
    return {
        "rows": rows, "batch": loaded.batch, "inputs": source, "repeat": b.repeat, "warmup": b.warmup,
        "threads": {"torch": torch.get_num_threads(), "tvm": tvm_threads()},
        "load_1m": load_1m(), "torch_compile_s": compile_s, "artifact": str(artifact_dir), "dense_checkpoint": dense_path,
        "top1_agreement_with_dense": agree, "prediction_profile": predictions.get("profile"),
    }


def _predictions(cfg: Config, manifest: dict[str, Any], dense: nn.Module, profile: str | Path | None
                 ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pred = manifest.get("prediction") or {}
    if pred.get("available"):
        out["tvm"] = pred.get("latency_ms")
    table, reason = profile_table(cfg, manifest["target"], profile or manifest.get("prediction", {}).get("profile"),
                                   here=profile is not None)
    out["profile"] = reason
    if table is not None:
        try:
            inventory = build_inventory(dense, batch=int(manifest["input"]["batch"]))
            out["eager"] = float(model_cost(table, cfg.cost, inventory, "torch").predict(Assignment()).latency_ms)
        except ShiftAddError as exc:
            log.info("no torch-backend prediction: %s", exc)
    return out


__all__ = ["bench", "dense_model", "interleaved"]
