"""Benchmark figures of the tool itself: ``python -m dse.benchmarks [SECTION ...]``.

Each section is a function registered in :data:`SECTIONS` (``@section("name")``) that returns lines of
text; with no argument every section runs. Figures are measured side by side in one run (the machine
may be shared, so ratios and medians, never single timings).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

import models
from dse.checkpoints import build_dense
from dse.config import Config, ProfileConfig
from dse.cost.model import CostModel, default_profile_path, read_profile
from dse.cost.sources import model_cost, synthetic_costs
from dse.deploy.holdout import random_assignments, validate_assignments
from dse.profiling.inventory import build_inventory
from dse.profiling.profiler import plan
from dse.profiling.store import Profile
from dse.search.driver import (
    OBJECTIVES_A,
    Objective,
    open_study,
    quiet_optuna,
    run_stage_a,
    stored_trials,
)
from dse.search.space import SearchSpace
from dse.search.trial_store import TrialStore
from models.assignment import Assignment, layer_kinds

SectionFn = Callable[[], list[str]]
SECTIONS: dict[str, SectionFn] = {}


def section(name: str) -> Callable[[SectionFn], SectionFn]:
    """Register ``fn() -> list of lines`` as benchmark section ``name``."""

    def deco(fn: SectionFn) -> SectionFn:
        SECTIONS[name] = fn
        return fn

    return deco


def median_seconds(fn: Callable[[], object], *, repeat: int = 7, min_time_s: float = 0.2) -> float:
    """Median seconds per call of ``fn``: ``repeat`` rounds, each of enough calls to last ``min_time_s``."""
    fn()  # warm-up
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - t0 >= min_time_s / 4 or calls >= 1 << 20:
            break
        calls *= 2
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls)
    rounds.sort()
    return rounds[len(rounds) // 2]


def _synthetic_profile(inventory) -> object:
    """Rows for every shape of ``inventory`` on both backends (latency from a roofline-like law), for
    timing the cost model where no profile of this machine is stored."""
    rows = []
    for spec in plan(inventory):
        work = spec.b * spec.m * spec.k * spec.n
        lat = 0.01 + work / 50e6 + 4 * spec.b * spec.m * (spec.k + spec.n) / 5e9
        rows.append({"primitive": spec.primitive, "backend": spec.backend, "batch": spec.b, "m": spec.m,
                     "k": spec.k, "n": spec.n, "dtype": spec.dtype, "latency_ms": lat, "energy_mj": work * 4.6e-9,
                     "energy_source": "model"})
    return Profile.from_rows(rows, {})


@section("cost")
def cost_section(model_name: str = "deit_tiny_patch16_224", batch: int = 8) -> list[str]:
    """Precompute and per-assignment prediction time of the cost model for a 12-block ViT."""
    model = models.create(model_name, num_classes=10)
    inventory = build_inventory(model, batch=batch, name=model_name)
    path = default_profile_path(ProfileConfig())
    try:
        profile, source = read_profile(path), str(path)
        CostModel(profile).for_model(inventory).predict(Assignment.uniform(model, "hamming", "moe"))
    except Exception as exc:  # no (complete) profile of this machine: time the same code on synthetic rows
        profile, source = _synthetic_profile(inventory), f"synthetic rows ({type(exc).__name__})"
    t0 = time.perf_counter()
    mc = CostModel(profile).for_model(inventory)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    kinds = [(name, kind) for name, kind in zip(mc.layers, mc.kinds)]
    plans = [Assignment(linear={n: str(rng.choice(["mult", "shift", "moe"])) for n, k in kinds if k == "linear"},
                        attention={n: str(rng.choice(["msa", "hamming"])) for n, k in kinds if k == "attention"})
             for _ in range(64)]
    it = iter(range(1 << 62))
    one = median_seconds(lambda: mc.predict(plans[next(it) % len(plans)]))
    idx = np.stack([[int(rng.integers(0, 3 if k == "linear" else 2)) for _, k in kinds] for _ in range(4096)])
    vec = median_seconds(lambda: mc.predict_indices(idx)) / len(idx)
    table_s = median_seconds(lambda: mc.per_layer(plans[0]), repeat=3)
    verdict = "OK" if one < 1e-3 else "TOO SLOW"
    return [
        f"model {model_name}, batch {batch}: {len(mc.layers)} decision layers, {len(mc.fixed_items)} fixed items; "
        f"profile: {source}",
        f"CostModel.for_model (precompute):      {build_s * 1e3:9.1f} ms once",
        f"ModelCost.predict(one assignment):     {one * 1e6:9.1f} us   (limit 1000 us: {verdict})",
        f"ModelCost.predict_indices (vectorised): {vec * 1e6:9.3f} us per assignment ({len(idx)} at once)",
        f"ModelCost.per_layer (table):           {table_s * 1e3:9.2f} ms",
    ]


# Conv kernels of kernels.conv_kernels, by PrimFunc name prefix (TOPI's fallback keeps "conv2d" in its name)
_CONV_FUNCS = ("dse_im2col", "dse_conv_", "dse_depthwise", "shiftadd_matmul", "conv2d")


@section("convs")
def convs_section(model_name: str = "pvt_v2_b0", batch: int = 8, img_size: int = 224) -> list[str]:
    """A conv-heavy model dense: PyTorch eager (``inference_mode``, all cores) against the same model compiled
    by the exporter's path (``graph.to_relax`` of the export form, ``compile_relax``: what ``dse bench``'s
    "dense (TVM)" contestant runs), timed interleaved; then where the compiled forward's time goes, from the
    VM's instrument hook, with the conv kernels (:mod:`kernels.conv_kernels`) and the GEMMs summed apart."""
    import torch

    from dse.deploy import graph
    from dse.deploy.artifact import Artifact
    from dse.deploy.bench import interleaved
    from dse.hardware.threads import use_all_cores
    from kernels.instrument import time_calls
    from kernels.relax_pipeline import compile_relax_recorded

    use_all_cores()  # before the first parallel loop of TVM's pool
    torch.manual_seed(0)
    model = models.create(model_name, num_classes=10).eval()
    x = torch.randn(batch, 3, img_size, img_size)
    t0 = time.perf_counter()
    g = graph.to_relax(graph.export_form(model), x, "cpu")
    compiled = compile_relax_recorded(g.mod, "cpu")
    compile_s = time.perf_counter() - t0
    art = Artifact.in_memory(compiled.executable, [g.params[n] for n in g.param_names], tuple(x.shape), "float32")
    inp = art.device_input(x.numpy())
    with torch.inference_mode():
        err = float(np.abs(art.run(x.numpy()) - model(x).numpy()).max())

    def eager() -> None:
        with torch.inference_mode():
            model(x)

    stats = interleaved({"eager": eager, "tvm": lambda: art._call(inp).numpy()}, repeat=15, warmup=2)
    calls = time_calls(art.vm, lambda: art._call(inp).numpy(), 5)
    total = sum(t.per_run_ms for t in calls.values())
    lines = [f"{model_name} dense, batch {batch}, {img_size} px, {torch.get_num_threads()} torch threads; compiled by "
             f"the {compiled.pipeline} pipeline in {compile_s:.0f} s; max |logit error| {err:.1e}",
             f"PyTorch eager:  median {stats['eager'].median_ms:8.1f} ms (p90 {stats['eager'].p90_ms:.1f})",
             f"TVM compiled:   median {stats['tvm'].median_ms:8.1f} ms (p90 {stats['tvm'].p90_ms:.1f})",
             f"inside the compiled forward (sum of calls {total:.1f} ms):"]
    for prefix in _CONV_FUNCS:
        group = [t for t in calls.values() if prefix in t.name]
        if group:
            share = sum(t.per_run_ms for t in group)
            lines.append(f"  {prefix + '*':18s} {share:8.2f} ms  ({len(group)} functions)")
    lines.append("  slowest conv kernels:")
    convs = sorted((t for t in calls.values() if any(p in t.name for p in _CONV_FUNCS[:3] + _CONV_FUNCS[4:])),
                   key=lambda t: -t.per_run_ms)
    lines += [f"    {t.per_run_ms:8.2f} ms  x{t.calls_per_run:.0f}  {t.name}" for t in convs[:8]]
    return lines


@section("validate")
def validate_section(count: int | None = None) -> list[str]:
    """One prediction of the embedded model and the wall time of ``dse cost --validate``'s held-out assignments
    (compile, interleaved timing, kernels inside the models) with the default settings."""
    cfg = Config()
    model = build_dense(cfg)
    inventory = build_inventory(model, batch=cfg.profile.batch, nbits=cfg.finetune.nbits, name=cfg.model.name)
    path = default_profile_path(cfg.profile)
    try:
        profile, source = read_profile(path), str(path)
        model_cost(profile, cfg.cost, inventory, "tvm").predict(Assignment.uniform(model, "hamming", "moe"))
    except Exception as exc:  # no (complete) profile of this machine: the same code on synthetic rows
        profile, source = _synthetic_profile(inventory), f"synthetic rows ({type(exc).__name__})"
    mc = model_cost(profile, cfg.cost, inventory, "tvm")
    plans = random_assignments(mc, 16, seed=0)
    it = iter(range(1 << 62))
    one = median_seconds(lambda: mc.predict(plans[next(it) % len(plans)]))
    count = cfg.cost.validate_assignments if count is None else count
    t0 = time.perf_counter()
    res = validate_assignments(cfg, profile, model, inventory, count=count, seed=cfg.seed,
                               rounds=cfg.cost.validate_rounds, per_round=cfg.cost.validate_runs)
    wall = time.perf_counter() - t0
    compile_s = sum(r["compile_s"] for r in res["assignments"])
    return [
        f"model {cfg.model.name}, batch {cfg.profile.batch}; profile: {source}",
        f"ModelCost.predict(one assignment): {one * 1e6:9.1f} us   (limit 1000 us: {'OK' if one < 1e-3 else 'TOO SLOW'})",
        f"held-out assignments ({count}): {wall:.1f} s wall, of which compiling {compile_s:.1f} s; "
        f"mean |error| {100 * res['summary'].get('mean_abs_error', float('nan')):.1f}%, at the profile's host speed "
        f"{100 * res['summary'].get('corrected_mean_abs_error', float('nan')):.1f}% "
        f"({'calibrated' if res['calibration'] else 'uncalibrated'}; load {res['load_1m']})",
    ]


@section("search")
def search_section(trials: int = 2000, model: str = "vit_digits", population: int = 100) -> list[str]:
    """Stage-A trials/s of ``dse search``: throughput on the embedded model's space (synthetic costs and sensitivities, SQLite in a
    temporary folder), and the batch writer against Optuna's add_trials on the same 50 trials."""
    kinds = layer_kinds(models.create(model))
    space = SearchSpace.build(kinds)
    costs = synthetic_costs(kinds)
    rng = np.random.default_rng(1)
    table = {
        n: (
            {"msa": 0.0, "hamming": float(rng.uniform(0, 0.2))}
            if k == "attention"
            else {"mult": 0.0, "shift": (d := float(rng.uniform(0, 0.3))), "moe": 0.6 * d}
        )
        for n, k in kinds.items()
    }
    objective = Objective(space, costs, table)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/study.db"
        res = run_stage_a(space, objective, url, "bench", trials=trials, population=population)
        lines.append(
            f"stage A ({model}, {len(space)} parameters, NSGA-II population {population}, SQLite): "
            f"{res.evaluated} trials in {res.seconds:.1f} s = {res.rate:.0f} trials/s"
        )
        sample = stored_trials(url, "bench")[:50]
        with quiet_optuna():
            for label in ("bulk", "add_trials"):
                name = f"copy-{label}"
                storage, study = open_study(url, name, ["minimize"] * 3, OBJECTIVES_A, space)
                t0 = time.perf_counter()
                if label == "bulk":
                    TrialStore(storage, name).write(sample)
                else:
                    study.add_trials(sample)
                dt = time.perf_counter() - t0
                lines.append(f"persist 50 trials with {label:10s}: {dt:.2f} s = {50 / dt:.0f} trials/s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dse.benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"sections to run (default: all of {', '.join(SECTIONS)})")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    for name in args.sections or list(SECTIONS):
        print(f"== {name}")
        for line in SECTIONS[name]():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
