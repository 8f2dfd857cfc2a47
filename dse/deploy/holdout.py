"""Held-out assignments: whole compiled models against the cost model's prediction (``dse cost --validate``).

The held-out shapes of :mod:`dse.cost.validate` check single kernels; what the search relies on is the sum: a
whole model, compiled, for assignments the cost model priced but nobody measured. Here:

1. ``count`` random assignments (seeded) of the dense model, each drawn with its own mixing weights over the
   choices (a Dirichlet draw per assignment, then a choice per layer), so they range from nearly dense to
   nearly all shift/add and their latencies spread enough to rank. Only choices the profile can price are
   drawn. MoE layers get the equilibrium Mult share of their experts' costs as static capacity, so the graph
   routes exactly what the prediction assumes.
2. Each is reparameterised (no training: latency does not depend on the weights' values), compiled as
   ``dse export`` compiles (the same shift-primitive rule from the same profile, :func:`dse.deploy.graph.to_relax`,
   :func:`kernels.relax_pipeline.compile_relax`) and kept in memory.
3. All of them are timed interleaved (:func:`dse.deploy.bench.interleaved_rounds`): ``rounds`` rounds, each a
   block of calls of every model in turn, so the host's drift hits them alike; the measured latency is the
   median of all calls, the spread the range of the round medians over that median.
4. Inside each model every packed call is timed by the VM's instrument hook (:mod:`kernels.instrument`): the
   project's kernels against their profile rows (:func:`dse.cost.fidelity.compare_kernels`).
5. The host-speed reference kernel (:mod:`dse.profiling.reference`) is timed before every round and after the
   last (its median against its time when the profile was measured), for the drift-corrected errors.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

import kernels
from dse.config import Config
from dse.cost.fidelity import POISON_FACTOR, assignment_summary, compare_kernels
from dse.cost.model import CostTable, ModelCost
from dse.cost.sources import model_cost
from dse.deploy import graph
from dse.deploy.artifact import Artifact
from dse.deploy.bench import block_speeds, interleaved_rounds
from dse.deploy.export import choose_shift_primitives, shift_shapes, tokens_per_image
from dse.hardware.threads import use_all_cores
from dse.profiling import reference
from dse.profiling.profiler import load_1m
from dse.training.finetune import reparam_options
from kernels.instrument import floor_ms, time_calls
from kernels.relax_pipeline import compile_relax
from models.assignment import Assignment
from models.hamming import fit_hamming
from models.moe import set_moe_capacity
from models.reparam import reparameterize

log = logging.getLogger(__name__)


def priced_choices(mc: ModelCost) -> dict[str, tuple[str, ...]]:
    """``{layer: choices the profile can price}``, model order."""
    return {name: tuple(c for j, c in enumerate(mc.choices[kind]) if np.isfinite(mc.lat[i, j]))
            for i, (name, kind) in enumerate(zip(mc.layers, mc.kinds))}


def with_capacity(mc: ModelCost, attention: dict[str, str], linear: dict[str, str]) -> Assignment:
    """The assignment, its MoE layers given the equilibrium Mult share of their experts' costs as static capacity
    (so the compiled graph routes what the prediction assumes)."""
    capacity = {n: round(mc.equilibrium_share(n), 4) for n, c in linear.items() if c == "moe"}
    return Assignment(attention=attention, linear=linear, capacity=capacity)


def random_assignments(mc: ModelCost, count: int, seed: int, exclude: Iterable[tuple[str, ...]] = ()
                       ) -> list[Assignment]:
    """``count`` distinct random assignments (module docstring, step 1), MoE capacity set, none of them one of
    ``exclude`` (:meth:`ModelCost.choice_names` of assignments, e.g. the calibration's models)."""
    rng = np.random.default_rng(seed)
    choices = priced_choices(mc)
    out: list[Assignment] = []
    seen: set[tuple[str, ...]] = set(exclude)
    for _ in range(50 * count):
        if len(out) == count:
            break
        weights = {kind: rng.dirichlet(np.ones(len(mc.choices[kind]))) for kind in ("linear", "attention")}
        picks = {}
        for name, kind in zip(mc.layers, mc.kinds):
            allowed = choices[name]
            w = np.array([weights[kind][mc.choices[kind].index(c)] for c in allowed])
            picks[name] = str(rng.choice(allowed, p=w / w.sum()))
        key = tuple(picks[n] for n in mc.layers)
        if key in seen:
            continue
        seen.add(key)
        out.append(with_capacity(mc, {n: c for n, c in picks.items() if mc.kinds[mc.index[n]] == "attention"},
                                 {n: c for n, c in picks.items() if mc.kinds[mc.index[n]] == "linear"}))
    return out


def calibration_seed(cfg: Config) -> int:
    """The calibration's own seed, apart from the validation's (``cfg.seed``), so held-out means held out."""
    return cfg.seed + 7919


def calibration_plans(mc: ModelCost, count: int, seed: int) -> list[Assignment]:
    """The models :mod:`dse.deploy.calibrate` fits the in-context factors on: the corners first (dense; every
    Linear shift; every Linear MoE with Hamming attention; Hamming attention with mult Linears — each group
    at its largest), then random assignments (seed ``seed``) up to ``count``. Only choices the profile prices."""
    priced = priced_choices(mc)

    def uniform(attention: str, linear: str) -> Assignment | None:
        picks = {n: (attention if k == "attention" else linear) for n, k in zip(mc.layers, mc.kinds)}
        if any(c not in priced[n] for n, c in picks.items()):
            return None
        return with_capacity(mc, {n: c for n, c in picks.items() if mc.kinds[mc.index[n]] == "attention"},
                             {n: c for n, c in picks.items() if mc.kinds[mc.index[n]] == "linear"})

    corners = [p for p in (uniform("msa", "mult"), uniform("msa", "shift"), uniform("hamming", "moe"),
                           uniform("hamming", "mult")) if p is not None][:count]
    keys = [mc.choice_names(p) for p in corners]
    return corners + random_assignments(mc, count - len(corners), seed, exclude=keys)


def compile_assignment(cfg: Config, dense: nn.Module, plan: Assignment, images: torch.Tensor, target: Any,
                       table: CostTable) -> tuple[Artifact, graph.RelaxGraph]:
    """``dense`` reparameterised for ``plan`` and compiled for ``target`` as ``dse export`` compiles it, run in
    memory (module docstring, step 2)."""
    tgt = kernels.resolve_target(target)
    torch.manual_seed(cfg.seed)  # router initialisation
    model = reparameterize(dense, plan, costs=None, **reparam_options(cfg)).eval()
    fit_hamming(model, images)
    if plan.capacity:
        set_moe_capacity(model, dict(plan.capacity))
    shapes = shift_shapes(model, len(images) * tokens_per_image(model, images[:1]))
    choices = choose_shift_primitives(shapes, tgt, table, None)
    form = graph.export_form(model, lambda name, _layer: choices[name]["primitive"])
    g = graph.to_relax(form, images.contiguous(), tgt)
    exe = compile_relax(g.mod, tgt)
    device = kernels.targets.device_for(tgt)
    return Artifact.in_memory(exe, [g.params[n] for n in g.param_names], g.input_shape, g.input_dtype, device), g


@dataclasses.dataclass
class Timed:
    """Compiled models timed interleaved (:func:`time_compiled`)."""

    compiled: list[tuple[Artifact, graph.RelaxGraph]]
    inputs: list[Any]
    samples: list[list[list[float]]]  # [model][round][call] ms
    compile_s: list[float]
    reference_ms: float  # the host-speed reference kernel between the blocks (median)
    reference_samples: list[float]
    block_reference_ms: list[list[float]]  # [model][round]: the reference kernel around that block
    load_1m: float | None

    def measured_ms(self) -> list[float]:
        """Median of every call of each model."""
        return [float(np.median([v for block in blocks for v in block])) for blocks in self.samples]

    def at_speed_ms(self, then_ms: float) -> list[float]:
        """Each model's time at the host speed of ``then_ms`` (the reference kernel's time when the profile was
        measured): per round, the block's median times then / the reference around that block; then the
        median over rounds. A slow phase of the host that covers a block is divided out of that block alone."""
        return [float(np.median([np.median(block) * then_ms / ref for block, ref in zip(blocks, refs)]))
                for blocks, refs in zip(self.samples, self.block_reference_ms)]


def time_compiled(cfg: Config, dense: nn.Module, plans: list[Assignment], inventory: Any, table: CostTable, *,
                  seed: int, rounds: int, per_round: int, what: str) -> Timed:
    """Each plan compiled (step 2), then all timed interleaved (step 3), the host-speed reference kernel timed
    before every block and after the last (step 5)."""
    target = cfg.profile.target
    images = torch.randn(inventory.batch, *inventory.input_size, generator=torch.Generator().manual_seed(seed))
    compiled, compile_s = [], []
    for i, plan in enumerate(plans):
        t0 = time.perf_counter()
        compiled.append(compile_assignment(cfg, dense, plan, images, target, table))
        compile_s.append(time.perf_counter() - t0)
        log.info("compiled %s %d/%d (%s) in %.1f s", what, i + 1, len(plans), choice_counts(plan), compile_s[-1])
    inputs = [art.device_input(images.numpy()) for art, _ in compiled]
    fns = {str(i): (lambda art=art, inp=inp: art._call(inp).numpy()) for i, ((art, _), inp)
           in enumerate(zip(compiled, inputs))}
    loads = [load_1m()]
    tgt = kernels.resolve_target(target)
    speed: list[float] = []  # the host-speed reference kernel between the blocks
    samples = interleaved_rounds(fns, per_round=per_round, warmup=3, rounds=max(2, rounds),
                                 between=lambda: speed.append(reference.probe(tgt)))
    loads.append(load_1m())
    around = block_speeds(speed, list(fns), max(2, rounds))
    return Timed(compiled, inputs, [samples[str(i)] for i in range(len(plans))], compile_s,
                 statistics.median(speed), speed, [around[str(i)] for i in range(len(plans))],
                 max((v for v in loads if v is not None), default=None))


def kernel_times(artifact: Artifact, g: graph.RelaxGraph, inp: Any, runs: int) -> dict[str, Any]:
    """The project's kernels timed inside the model (step 4): ``kernels`` (primitive, shape, calls per forward,
    median ms of one call) and the forward's instrumented time split into those kernels and everything else."""
    times = time_calls(artifact.vm, lambda: artifact._call(inp), runs)
    rows = []
    for name, prim in sorted(g.kernel_calls.items()):
        if name not in times:  # a kernel the compiler dropped (dead code) or renamed
            log.info("kernel %s was not seen in the compiled model's calls", name)
            continue
        t = times[name]
        rows.append({"primitive": prim, **dict(zip("bmkn", g.kernel_shapes[name])), "calls": t.calls_per_run,
                     "in_model_ms": t.median_ms, "function": name})
    in_kernels = sum(times[r["function"]].per_run_ms for r in rows)
    return {"kernels": rows, "kernels_ms": in_kernels,
            "other_ms": sum(t.per_run_ms for t in times.values()) - in_kernels, "hook_floor_ms": floor_ms(times)}


def choice_counts(plan: Assignment) -> dict[str, int]:
    counts = dict.fromkeys(("msa", "hamming", "mult", "shift", "moe"), 0)
    counts.update(plan.counts())
    return counts


def validate_assignments(cfg: Config, profile: Any, dense: nn.Module, inventory: Any, *, count: int = 8,
                         seed: int = 0, rounds: int = 3, per_round: int = 30, kernel_runs: int = 20,
                         poison_factor: float = POISON_FACTOR) -> dict[str, Any]:
    """Predicted vs measured latency of ``count`` compiled held-out assignments (module docstring).

    Returns ``assignments`` (one row each), ``summary`` (:func:`dse.cost.fidelity.assignment_summary`),
    ``kernels`` and ``in_context`` (:func:`dse.cost.fidelity.compare_kernels` over every model's kernels, one row
    per kernel shape: the median over the models that run it) and the host-speed reference."""
    use_all_cores()
    table = CostTable(profile)
    mc = model_cost(table, cfg.cost, inventory, "tvm")
    raw = model_cost(table, cfg.cost, inventory, "tvm", calibrated=False)
    taken = [raw.choice_names(p) for p in calibration_plans(raw, cfg.profile.calibration_models, calibration_seed(cfg))]
    plans = random_assignments(mc, count, seed, exclude=taken)
    timed = time_compiled(cfg, dense, plans, inventory, table, seed=seed, rounds=rounds, per_round=per_round,
                          what="held-out assignment")
    ratio = reference.speed_ratio(profile.meta, timed.reference_ms)
    then = reference.stored(profile.meta)
    at_speed = timed.at_speed_ms(float(then["latency_ms"])) if then else [None] * len(plans)

    rows, per_kernel = [], {}
    for i, (plan, (art, g), inp, measured) in enumerate(zip(plans, timed.compiled, timed.inputs,
                                                              timed.measured_ms())):
        blocks = timed.samples[i]
        round_medians = [float(np.median(block)) for block in blocks]
        predicted = float(mc.predict(plan).latency_ms)
        uncalibrated = float(raw.predict(plan).latency_ms)
        inside = kernel_times(art, g, inp, kernel_runs)
        for k in inside["kernels"]:
            per_kernel.setdefault((k["primitive"], k["b"], k["m"], k["k"], k["n"]), []).append(k)
        rows.append({
            "assignment": i, **choice_counts(plan), "predicted_ms": predicted, "measured_ms": measured,
            "rel_error": (predicted - measured) / measured, "uncalibrated_ms": uncalibrated,
            "uncalibrated_error": (uncalibrated - measured) / measured,
            "at_speed_ms": at_speed[i],
            "corrected_error": None if at_speed[i] is None else (predicted - at_speed[i]) / at_speed[i],
            "spread": (max(round_medians) - min(round_medians)) / measured,
            "round_medians_ms": round_medians, "in_model_kernels_ms": inside["kernels_ms"],
            "in_model_other_ms": inside["other_ms"], "hook_floor_ms": inside["hook_floor_ms"],
            "compile_s": timed.compile_s[i], "plan": plan.to_dict(),
        })
    merged = [{"primitive": key[0], **dict(zip("bmkn", key[1:])), "calls": ks[0]["calls"], "models": len(ks),
               "in_model_ms": float(np.median([k["in_model_ms"] for k in ks]))} for key, ks in sorted(per_kernel.items())]
    kernel_rows, factors = compare_kernels(merged, table, factor=poison_factor)
    summary = assignment_summary(rows, ratio)
    uncal = assignment_summary([{**r, "predicted_ms": r["uncalibrated_ms"]} for r in rows], ratio)
    summary["uncalibrated"] = {k: v for k, v in uncal.items() if k not in ("count", "speed_ratio", "max_spread")}
    return {
        "assignments": rows, "summary": summary, "kernels": kernel_rows,
        "calibration": None if mc.calibration is None else mc.calibration.as_meta(),
        "in_context": factors, "poison_factor": poison_factor, "rounds": max(2, rounds), "per_round": per_round,
        "reference": {"kernel": list(reference.KERNEL), "now_ms": timed.reference_ms,
                      "now_samples_ms": timed.reference_samples, "then": reference.stored(profile.meta),
                      "speed_ratio": ratio},
        "load_1m": timed.load_1m,
    }


__all__ = ["Timed", "calibration_plans", "calibration_seed", "choice_counts", "compile_assignment", "kernel_times",
           "priced_choices", "random_assignments", "time_compiled", "validate_assignments", "with_capacity"]
