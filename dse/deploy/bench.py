"""``dse bench``: the exported ShiftAddViT against the dense model, side by side, one run.

Contestants, all on the same images (the first ``batch`` validation images of the data the artifact was
exported with) and the same batch:

* the artifact, through the torch-free loader (:mod:`dse.deploy.artifact`, checksums verified);
* the dense model in PyTorch eager mode (``torch.inference_mode``);
* the dense model under ``torch.compile`` (skipped with ``--no-compile``; its compile time is reported);
* the dense model compiled by TVM (skipped with ``--no-dense-tvm`` / ``bench.dense_tvm: false``): the dense
  checkpoint exported as ``dse export`` does, with the all-mult assignment, for the artifact's target,
  batch and data, built once into ``<artifact>-dense-tvm/`` and reused while the fingerprint in its
  ``dense_tvm.json`` holds (checkpoint, target, TVM version, batch, data, profile: the same kind of key as
  ``dse run``'s stages; a change rebuilds it). The ShiftAddViT's speed-up over it is the
  reparameterisation's own gain; its speed-up over PyTorch also holds the compiler's.

Timing is interleaved: ``rounds`` rounds, each running every contestant for a block of calls, so slow
drifts of a shared machine (other jobs starting or stopping) hit all of them alike; per-call wall times
are pooled per contestant into a median and a p90. Blocks rather than strict alternation, so that one
runtime's spinning worker threads are idle again before the other runtime runs. Each block starts with
``lead_in_ms`` of untimed calls, so the first calls after a switch (caches and thread pools cold from the
other runtime) are timed for no contestant.

Energy: a measured source (``nvml`` for CUDA, ``rapl`` for CPU) when one works here; otherwise the
analytical model (``dse.hardware.energy``, 45 nm per-operation energies) over the kernels each model runs —
labelled, and covering the GEMM-like kernels only. Predictions: the cost model of a matching profile
(backend ``tvm`` for the artifact, ``torch`` for the dense eager model) and its error against the
measured median.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import models
from dse.checkpoints import build_from_architecture
from dse.config import Config, config_from_dict, config_to_dict, save_config
from dse.cost.model import CostTable, check_profile, read_profile
from dse.cost.sources import model_cost
from dse.deploy import artifact as art
from dse.deploy.export import export, no_prediction_reason, profile_table, val_tensors
from dse.errors import CheckpointError, ShiftAddError
from dse.fileio import atomic_write_text, fingerprint, sha256_file
from dse.hardware import energy as en
from dse.hardware.device import describe_device, versions
from dse.hardware.threads import set_threads, torch_threads, tvm_threads
from dse.profiling import reference
from dse.profiling.inventory import build_inventory
from dse.profiling.profiler import busy_host_warning, load_1m
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


# ---------------------------------------------------------------------------------------------------
# The dense model compiled by TVM

DENSE_TVM_SUFFIX = "-dense-tvm"
DENSE_TVM_MARKER = "dense_tvm.json"  # {"key", "summary"}: written after a build succeeds


def dense_tvm_folder(artifact_dir: str | Path) -> Path:
    """``<artifact>-dense-tvm/``: the dense TVM baseline's folder (its artifact in ``artifact/``, its key in
    ``dense_tvm.json``, the config it was exported with in ``resolved_config.yaml``)."""
    path = Path(artifact_dir).resolve()
    return path.with_name(path.name + DENSE_TVM_SUFFIX)


def _dense_export_config(cfg: Config, manifest: dict[str, Any]) -> Config:
    """``cfg`` with the artifact's data, seed, batch and validation images: the dense model is exported for
    the same inputs (and checked on the same images) as the artifact it is compared with."""
    data = config_to_dict(cfg)
    if manifest.get("data"):
        data["data"] = dict(manifest["data"])
    data["seed"] = int(manifest.get("seed", cfg.seed))
    data["export"].update(batch=int(manifest["input"]["batch"]), cuda_arch=None,
                          val_images=(manifest.get("accuracy") or {}).get("val_images"))
    return config_from_dict(data)


def dense_tvm_artifact(cfg: Config, manifest: dict[str, Any], artifact_dir: str | Path, dense: nn.Module,
                       dense_path: str | Path, profile: str | Path | None) -> tuple[Path, bool]:
    """(the dense TVM artifact's folder, whether it was built now): the dense checkpoint through
    ``export`` with the all-mult assignment, reused while its fingerprint holds (module
    docstring). ``profile``: a profile CSV for the prediction (none: the store's, as export looks it up)."""
    folder = dense_tvm_folder(artifact_dir)
    dcfg = _dense_export_config(cfg, manifest)
    prof = str(profile) if profile is not None and os.path.isfile(profile) else None
    export_keys = {k: getattr(dcfg.export, k) for k in ("batch", "val_images", "tune_trials")}
    key = fingerprint("dense-tvm", sha256_file(dense_path), manifest["target"], versions().get("tvm"),
                      dcfg.seed, config_to_dict(dcfg.data), export_keys, sha256_file(prof) if prof else None)
    marker, out = folder / DENSE_TVM_MARKER, folder / "artifact"
    try:
        done = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        done = {}
    if isinstance(done, dict) and done.get("key") == key and (out / art.MANIFEST).is_file():
        log.info("dense TVM baseline: inputs unchanged, reusing %s", out)
        return out, False
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    plan = folder / "all_mult.yaml"
    log.info("exporting the dense model (all-mult) for %s into %s", manifest.get("target_slug"), out)
    try:
        Assignment.uniform(dense).to_yaml(plan)
        with torch_threads(0):  # export sets its own PyTorch threads; the bench's come back after it
            summary = export(dcfg, dense_path, out, target=manifest["target"], assignment=plan, profile=prof,
                             cuda_arch=False)
    except ShiftAddError as exc:
        raise type(exc)(f"building the dense TVM baseline in {folder} failed: {exc}; fix that and rerun, or "
                        "bench without it (--no-dense-tvm, or bench.dense_tvm=false)") from exc
    save_config(dcfg, folder)
    atomic_write_text(marker, json.dumps({"key": key, "summary": summary}, indent=2, default=str))
    return out, True


# ---------------------------------------------------------------------------------------------------
# Timing


ROUNDS = 3  # interleaved rounds of a bench: each contestant's calls in three blocks spread over the run


def _timed_block(fn: Callable[[], Any], calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _lead_in(fn: Callable[[], Any], ms: float) -> None:
    """Untimed calls of ``fn`` for ``ms`` milliseconds (at least one call when ``ms`` > 0)."""
    if ms <= 0:
        return
    end = time.perf_counter() + ms / 1e3
    fn()
    while time.perf_counter() < end:
        fn()


def calls_within(budget_s: float | None, call_ms: list[float], repeat: int, rounds: int) -> int:
    """Calls per contestant and round: ``repeat`` spread over ``rounds``, fewer where one round of every
    contestant at ``call_ms`` each would make the timed part outlast ``budget_s`` (at least 5 a round)."""
    per_round = max(1, -(-repeat // rounds))
    if budget_s is None or not call_ms:
        return per_round
    fit = int(budget_s * 1e3 / (rounds * sum(call_ms)))
    return max(min(5, per_round), min(per_round, fit))


def interleaved_rounds(contestants: dict[str, Callable[[], Any]], *, per_round: int, warmup: int, rounds: int = ROUNDS,
                       lead_in_ms: float = 20.0, budget_s: float | None = None,
                       between: Callable[[], Any] | None = None) -> dict[str, list[list[float]]]:
    """``{contestant: [per-call ms of round 1, of round 2, ...]}``: every round runs each contestant for a block
    of ``per_round`` calls after ``lead_in_ms`` of untimed ones (module docstring); ``budget_s`` lowers
    ``per_round`` (:func:`calls_within`, from the fastest warm-up call of each). ``between`` runs before every
    block and after the last (a thermometer, :func:`dse.profiling.reference.probe`: :func:`block_speeds` pairs its
    readings with the blocks)."""
    warm_ms = [min(_timed_block(fn, max(1, warmup))) for fn in contestants.values()]
    per_round = calls_within(budget_s, warm_ms, per_round * rounds, rounds)
    samples: dict[str, list[list[float]]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            if between is not None:
                between()
            _lead_in(fn, lead_in_ms)
            samples[name].append(_timed_block(fn, per_round))
    if between is not None:
        between()
    return samples


def block_speeds(readings: list[float], names: list[str], rounds: int) -> dict[str, list[float]]:
    """``{contestant: [reading during its block of round 1, ...]}`` from the thermometer's ``readings`` taken
    by :func:`interleaved_rounds` (before every block, in contestant order, and after the last): each block's
    is the smaller of the readings just before and just after it — a reading is only ever made slower by the
    host (a preempted repeat), so the smaller one is the better estimate of the host's speed around the block."""
    if len(readings) != rounds * len(names) + 1:
        raise ValueError(f"{len(readings)} readings for {rounds} rounds of {len(names)} blocks; expected "
                         f"{rounds * len(names) + 1}")
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for c, name in enumerate(names):
            k = r * len(names) + c
            out[name].append(min(readings[k], readings[k + 1]))
    return out


def interleaved(contestants: dict[str, Callable[[], Any]], *, repeat: int, warmup: int, rounds: int = ROUNDS,
                lead_in_ms: float = 20.0, budget_s: float | None = None,
                between: Callable[[], Any] | None = None) -> dict[str, art.LatencyStats]:
    """Each contestant's per-call wall times of :func:`interleaved_rounds`, pooled over its rounds."""
    per_round = max(1, -(-repeat // rounds))
    samples = interleaved_rounds(contestants, per_round=per_round, warmup=warmup, rounds=rounds, lead_in_ms=lead_in_ms,
                                 budget_s=budget_s, between=between)
    return {name: art.LatencyStats.from_ms([v for block in blocks for v in block]) for name, blocks in samples.items()}


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


def _manifest_calls(manifest: dict[str, Any]) -> list[tuple[str, int, int, int, int, int]]:
    """(primitive, b, m, k, n, calls) of every kernel an artifact's graph runs."""
    return [(k["primitive"], k["b"], k["m"], k["k"], k["n"], k["calls"]) for k in manifest["kernels"]]


def energy(manifest: dict[str, Any], dense: nn.Module, x: torch.Tensor, fns: dict[str, Callable[[], Any]],
           dense_manifest: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{contestant: {"energy_mj", "energy_source"}} (module docstring); ``dense_manifest``: the dense TVM
    artifact's, whose kernels the analytical model prices for the ``dense_tvm`` contestant."""
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
    calls = {"tvm": _manifest_calls(manifest), "dense": [(*c, 1) for c in _dense_kernel_calls(dense, x)]}
    if dense_manifest is not None:
        calls["dense_tvm"] = _manifest_calls(dense_manifest)
    totals = {label: float(sum(source.estimate(p, b, m, k, n).energy_mj * count for p, b, m, k, n, count in c))
              for label, c in calls.items()}
    label = "model (analytical, GEMM-like kernels only)"
    return {name: {"energy_mj": totals.get(name, totals["dense"]), "energy_source": label} for name in fns}


# ---------------------------------------------------------------------------------------------------
# The command


def bench(cfg: Config, artifact_dir: str | Path, *, torch_compile: bool | None = None, dense: str | Path | None = None,
          profile: str | Path | None = None, dense_tvm: bool | None = None,
          expected_digest: str | None = None) -> dict[str, Any]:
    b = cfg.bench
    set_threads(b.threads)
    torch_compile = b.torch_compile if torch_compile is None else torch_compile
    dense_tvm = b.dense_tvm if dense_tvm is None else dense_tvm
    loaded = art.Artifact.load(artifact_dir, expected_digest)
    loaded.check_kernels()
    manifest = loaded.manifest
    if profile is not None:  # the bench measures here: another device's profile cannot be checked against it
        check_profile(read_profile(profile), manifest["target"])
    images, source = _inputs(manifest, cfg)
    model, dense_path = dense_model(manifest, cfg, dense)
    x = torch.from_numpy(images.copy())
    inp = loaded.device_input(images)

    def run_tvm() -> Any:
        return loaded._call(inp).numpy()

    fns: dict[str, Callable[[], Any]] = {"tvm": run_tvm}
    dense_art, dense_built = None, False
    if dense_tvm:
        folder, dense_built = dense_tvm_artifact(cfg, manifest, artifact_dir, model, dense_path,
                                                 profile or (manifest.get("prediction") or {}).get("profile"))
        dense_art = art.Artifact.load(folder)
        dense_inp = dense_art.device_input(images)

        def run_dense_tvm() -> Any:
            return dense_art._call(dense_inp).numpy()

        fns["dense_tvm"] = run_dense_tvm

    @torch.inference_mode()  # PyTorch's fastest eager inference (no autograd bookkeeping), as the profile's rows
    def run_eager() -> Any:
        return model(x)

    fns["eager"] = run_eager
    compile_s = None
    if torch_compile:
        # compile in this process: with more compile threads Inductor starts a pool of worker processes that
        # import torch in the background while the contestants are timed (eager measured ~15% slower then)
        torch._inductor.config.compile_threads = 1
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
    speed: list[float] = []  # the host-speed reference kernel between the blocks
    stats = interleaved(fns, repeat=b.repeat, warmup=b.warmup, budget_s=b.budget_s,
                        between=lambda: speed.append(reference.probe(manifest["target"])))
    during = {name: statistics.median(v) for name, v in block_speeds(speed, list(fns), ROUNDS).items()}
    energies = energy(manifest, model, x, fns, dense_art.manifest if dense_art is not None else None)
    predictions, no_prediction, table = _predictions(cfg, manifest, model, profile)
    # the host's speed now against when the profile's rows were measured: a prediction times it is what the
    # rows would say on the host as it runs now (README, "The host's speed moves")
    meta = {} if table is None else table.profile.meta
    ratio = {name: reference.speed_ratio(meta, v) for name, v in during.items()}
    if dense_art is not None:
        predictions["dense_tvm"] = _artifact_prediction(dense_art.manifest)
        if predictions["dense_tvm"] is None:
            no_prediction["dense_tvm"] = no_prediction_reason(dense_art.manifest.get("prediction"))
    labels = {"tvm": f"ShiftAddViT (TVM, {manifest['target_slug']})", "dense_tvm": "dense (TVM)",
              "eager": "dense (PyTorch eager)", "compiled": "dense (torch.compile)"}
    median = {name: stats[name].median_ms for name in fns}
    rows = []
    for name in fns:
        s, pred = stats[name], predictions.get(name)
        rows.append({
            "model": labels[name], "median_ms": s.median_ms, "p90_ms": s.p90_ms,
            "speedup_vs_eager": median["eager"] / s.median_ms, **energies[name],
            "predicted_ms": pred, "prediction_error_pct": None if pred is None else
            100.0 * (pred - s.median_ms) / s.median_ms,
            "host_speed_ratio": ratio[name], "prediction_error_now_pct": None if pred is None or ratio[name] is None
            else 100.0 * (pred * ratio[name] - s.median_ms) / s.median_ms, "no_prediction": None if pred is not None else
            no_prediction.get(name, "unknown"), "contestant": name,
        })

    def speedup(baseline: str) -> float | None:  # the ShiftAddViT's: baseline median / its median
        return median[baseline] / median["tvm"] if baseline in median else None

    return {
        "rows": rows, "batch": loaded.batch, "inputs": source, "repeat": min(s.repeats for s in stats.values()),
        "warmup": b.warmup,
        "device": (device := _device(manifest)),
        "speedup_vs_eager": speedup("eager"), "speedup_vs_compiled": speedup("compiled"),
        "speedup_vs_dense_tvm": speedup("dense_tvm"),
        "dense_tvm": None if dense_art is None else {
            "median_ms": median["dense_tvm"], "p90_ms": stats["dense_tvm"].p90_ms,
            "predicted_ms": predictions["dense_tvm"], "artifact": str(dense_art.folder), "built": dense_built,
            "compiled_val_acc": (dense_art.manifest.get("accuracy") or {}).get("compiled_val_acc")},
        "threads": {"torch": torch.get_num_threads(), "tvm": tvm_threads()},
        "load_1m": (load := load_1m()), "load_warning": busy_host_warning(load, device.get("cores"), "dse bench"),
        "torch_compile_s": compile_s, "artifact": str(artifact_dir), "dense_checkpoint": dense_path,
        "top1_agreement_with_dense": agree, "prediction_profile": predictions.get("profile"),
        "host_speed": {"reference_kernel": list(reference.KERNEL), "now_ms": statistics.median(speed),
                       "now_samples_ms": speed, "then": reference.stored(meta),
                       "ratio": reference.speed_ratio(meta, statistics.median(speed))},
    }


def _device(manifest: dict[str, Any]) -> dict[str, Any]:
    """The device the bench runs on, named as its profile is (``describe_device``: name and slug)."""
    kind = "cuda" if (manifest.get("target") or {}).get("kind") == "cuda" else "cpu"
    try:
        info = describe_device(kind)
    except ShiftAddError as exc:
        return {"kind": kind, "name": kind, "slug": None, "note": str(exc)}
    return {"kind": info.kind, "name": info.name, "slug": info.slug, "cores": info.cores}


def _artifact_prediction(manifest: dict[str, Any]) -> float | None:
    """The cost model's latency for an artifact, as its export predicted it (None: no prediction)."""
    pred = manifest.get("prediction") or {}
    return float(pred["latency_ms"]) if pred.get("available") and pred.get("latency_ms") is not None else None


def _predictions(cfg: Config, manifest: dict[str, Any], dense: nn.Module, profile: str | Path | None
                 ) -> tuple[dict[str, Any], dict[str, str], CostTable | None]:
    """(predicted ms per contestant, why there is none for the others, the profile's table if there is one)."""
    out: dict[str, Any] = {"tvm": _artifact_prediction(manifest)}
    why = {"compiled": "the cost model prices TVM kernels and eager PyTorch, not torch.compile"}
    if out["tvm"] is None:
        why["tvm"] = no_prediction_reason(manifest.get("prediction"))
    table, reason = profile_table(cfg, manifest["target"], profile or manifest.get("prediction", {}).get("profile"),
                                   here=profile is not None)
    out["profile"] = reason
    if table is None:
        why["eager"] = f"no profile to price it ({reason})"
        return out, why, None
    try:
        inventory = build_inventory(dense, batch=int(manifest["input"]["batch"]))
        out["eager"] = float(model_cost(table, cfg.cost, inventory, "torch").predict(Assignment()).latency_ms)
    except ShiftAddError as exc:
        why["eager"] = f"no torch-backend prediction: {exc}"
        log.info("%s", why["eager"])
    return out, why, table


__all__ = ["ROUNDS", "bench", "block_speeds", "dense_model", "dense_tvm_artifact", "dense_tvm_folder", "interleaved",
           "interleaved_rounds"]
