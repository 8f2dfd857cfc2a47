"""``dse profile``: the plan, the PyTorch timer, reruns that measure only what is missing, --force,
energy labelling, concurrent processes, and --target cuda without a GPU (through the real CLI)."""

from __future__ import annotations

import math
import time

import pytest

import kernels
import models
from dse.cli import main
from dse.hardware.energy import AnalyticalEnergyModel
from dse.profiling import nonprim, reference
from dse.profiling.inventory import build_inventory
from dse.profiling.profiler import (
    COLD_SAMPLES_PER_REPEAT,
    COLD_WEIGHT_PRIMITIVES,
    Measurer,
    RowSpec,
    Settings,
    _satisfied,
    plan,
    profile_model,
    summary_rows,
    time_callable,
)
from dse.profiling.store import ProfileStore, load_profile, row_key
from tests.conftest import run_dse

# 4 patches + cls; mlp_ratio 1 makes fc1, fc2 and proj one shape: two Linear shapes in all
TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 1.0}
TINY_SET = ["--set", "model.kwargs={img_size: 16, patch_size: 8, embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 1.0}",
            "--set", "data.img_size=16", "--set", "profile.repeat=2", "--set", "profile.min_repeat_ms=1", "--batch", "2"]


@pytest.fixture(scope="module")
def tiny_inventory(unfused):
    """Attention as its two products and softmax on both backends (``fused_attn`` off): a row of each kind."""
    return build_inventory(unfused(models.create("vit_digits", **TINY)), batch=2, name="tiny")


def fast(**kw) -> Settings:
    return Settings(**{"repeat": 2, "min_repeat_ms": 1.0, "nonprim": False, **kw})


def test_plan_covers_every_primitive_and_baseline(tiny_inventory):
    specs = plan(tiny_inventory)
    keys = {s.key for s in specs}
    assert len(keys) == len(specs)
    T, C = 2 * 5, 16
    assert len({s.shape for s in specs if s.primitive == "matshift"}) == 2
    for shape in [(1, T, C, 3 * C), (1, T, C, C)]:
        for prim, dtype in (("matmul", "float32"), ("matshift", "int32"), ("matshift_decode", "float32")):
            assert (prim, "tvm", *shape, dtype) in keys
        assert ("matmul", "torch", *shape, "float32") in keys
    BH, N, d = 4, 5, 8
    assert ("bmm", "tvm", BH, N, d, N, "float32") in keys and ("bmm", "torch", BH, N, d, N, "float32") in keys
    assert ("matadd", "tvm", BH, 32, N, d + 1, "float32") in keys
    for op in ("layernorm", "gelu", "softmax", "residual", "hash", "router", "dispatch", "embed", "head"):
        assert {s.backend for s in specs if s.primitive == op} == {"tvm", "torch"}
    assert not any(s.kind == "nonprim" for s in plan(tiny_inventory, include_nonprim=False))
    assert not any(s.primitive == "sdpa" for s in specs)  # eager PyTorch runs the products and softmax


def test_plan_times_fused_attention_as_sdpa_in_pytorch_only():
    """timm's fused attention: eager PyTorch runs one sdpa, the compiled model the products and the softmax."""
    specs = plan(build_inventory(models.create("vit_digits", **TINY), batch=2, name="tiny"))
    BH, N, d = 4, 5, 8
    by_prim = {p: {(s.backend, s.shape) for s in specs if s.primitive == p} for p in ("sdpa", "bmm", "softmax")}
    assert by_prim == {"sdpa": {("torch", (BH, N, d, N))},
                       "bmm": {("tvm", (BH, N, d, N)), ("tvm", (BH, N, N, d))},
                       "softmax": {("tvm", (BH, N, N, N))}}


def test_time_callable_times_what_it_runs():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.002)

    timing = time_callable(work, repeat=3, min_repeat_ms=10)
    assert timing.repeats == 3
    assert timing.median_ms >= 1.9  # never less than the sleep
    assert timing.number * timing.median_ms >= 9.0  # each repeat lasted ~min_repeat_ms
    assert len(calls) >= 1 + 3 * timing.number


def test_trials_make_untuned_kernel_rows_missing():
    kernel = RowSpec("matmul", "tvm", 1, 8, 4, 2, "float32", "kernel")
    torch_row = RowSpec("matmul", "torch", 1, 8, 4, 2, "float32", "kernel")
    assert not _satisfied(None, kernel, 0)
    assert _satisfied({"tuned_trials": 0}, kernel, 0)
    assert not _satisfied({"tuned_trials": 0}, kernel, 32)  # --trials 32 tunes it now
    assert _satisfied({"tuned_trials": 64}, kernel, 32)
    assert _satisfied({"tuned_trials": 0}, torch_row, 32)  # nothing to tune in PyTorch


def _count_builds(monkeypatch) -> dict[str, int]:
    counts = {"kernels": 0, "ops": 0, "reference": 0}
    real_build, real_op = kernels.build, nonprim.build_op

    def build(*a, **kw):
        counts["reference" if tuple(a[:5]) == reference.KERNEL else "kernels"] += 1
        return real_build(*a, **kw)

    def build_op(*a, **kw):
        counts["ops"] += 1
        return real_op(*a, **kw)

    class Prepacked(kernels.PrepackedKernel):  # CPU matmul/matshift_decode rows: the exporter's pre-packed GEMM
        def __init__(self, *a, **kw):
            counts["kernels"] += 1
            super().__init__(*a, **kw)

    monkeypatch.setattr(kernels, "build", build)
    monkeypatch.setattr(kernels, "PrepackedKernel", Prepacked)
    monkeypatch.setattr(nonprim, "build_op", build_op)
    return counts


def test_rerun_measures_only_missing_rows_and_force_measures_all(tmp_path, monkeypatch, tiny_inventory):
    counts = _count_builds(monkeypatch)
    settings = fast()
    specs = plan(tiny_inventory, include_nonprim=False)
    tvm_rows = [s for s in specs if s.backend == "tvm"]
    first = profile_model(tiny_inventory, settings, tmp_path, progress=False)
    assert first.measured == len(specs) and first.present == 0 and not first.failed
    assert counts["kernels"] == len(tvm_rows)
    prof = load_profile(first.path)
    # the host-speed reference, timed before and after the rows, is stored with the profile
    assert counts["reference"] == 2
    ref = reference.stored(prof.meta)
    assert ref is not None and len(ref["samples_ms"]) == 2
    assert ref["latency_ms"] == pytest.approx(min(ref["samples_ms"])) and ref["latency_ms"] > 0  # the fastest
    assert {row_key(r) for r in prof.frame.to_dict("records")} == {s.key for s in specs}
    # every row labelled; analytical energy equals the model's estimate for the kernel's shape
    model = AnalyticalEnergyModel()
    for r in prof.frame.to_dict("records"):
        cold = r["primitive"] in COLD_WEIGHT_PRIMITIVES  # single-call samples, weights evicted to L3 first
        assert r["energy_source"] == "model" and r["latency_ms"] > 0
        assert r["repeats"] == (2 * COLD_SAMPLES_PER_REPEAT if cold else 2)
        prim = "bmm" if (r["backend"] == "torch" and r["primitive"] == "matadd") else r["primitive"]
        dtype = r["dtype"] if r["backend"] == "tvm" else None
        assert r["energy_mj"] == pytest.approx(model.estimate(prim, r["batch"], r["m"], r["k"], r["n"], dtype).energy_mj)

    # the summary puts each TVM row next to the PyTorch row of the same shape
    rows = {row_key(r): r for r in prof.frame.to_dict("records")}
    for line in summary_rows(first):
        b, m, k, n = (int(v) for v in line["shape"].split("x"))
        base = "matmul" if line["primitive"].startswith("mat") and line["primitive"] != "matadd" else line["primitive"]
        want = rows[(line["primitive"], "tvm", b, m, k, n, kernels.get(line["primitive"]).default_dtype)]["latency_ms"]
        assert line["tvm/torch"] == pytest.approx(want / rows[(base, "torch", b, m, k, n, "float32")]["latency_ms"])

    # drop one TVM row and one PyTorch row: a rerun measures exactly those two
    store = ProfileStore(tmp_path, prof.meta["device"], prof.target, prof.meta["target_slug"], prof.meta["versions"])
    drop = {tvm_rows[0].key, next(s for s in specs if s.backend == "torch").key}
    kept = [r for r in prof.frame.to_dict("records") if row_key(r) not in drop]
    from dse.profiling.store import format_rows

    store.path.write_text(format_rows(kept))
    counts["kernels"] = 0
    second = profile_model(tiny_inventory, settings, tmp_path, progress=False)
    assert (second.measured, second.present) == (2, len(specs) - 2)
    assert counts["kernels"] == 1
    unchanged = {row_key(r): r["measured_at"] for r in load_profile(first.path).frame.to_dict("records")}
    assert all(unchanged[row_key(r)] == r["measured_at"] for r in kept)

    counts["kernels"] = counts["reference"] = 0
    before = reference.stored(load_profile(first.path).meta)
    third = profile_model(tiny_inventory, settings, tmp_path, progress=False)
    assert third.measured == 0 and counts["kernels"] == 0
    assert counts["reference"] == 0 and reference.stored(load_profile(first.path).meta) == before  # nothing timed

    forced = profile_model(tiny_inventory, settings, tmp_path, force=True, progress=False)
    assert forced.measured == len(specs) and counts["kernels"] == len(tvm_rows)
    assert len(load_profile(first.path)) == len(specs)


def test_nonprim_rows_measured_once(tmp_path, monkeypatch, unfused):
    inv = build_inventory(unfused(models.create("vit_digits", **TINY)), batch=1, name="tiny")
    inv.items = [it for it in inv.items if it.op in ("layernorm", "softmax")]  # two ops keep it quick
    counts = _count_builds(monkeypatch)
    run = profile_model(inv, fast(nonprim=True), tmp_path, progress=False)
    ops = {(r["primitive"], r["backend"]) for r in run.rows}
    assert ops == {("layernorm", "tvm"), ("layernorm", "torch"), ("softmax", "tvm"), ("softmax", "torch")}
    assert counts["ops"] == 2
    for r in run.rows:  # analytical energy of the op's counted work
        assert r["energy_mj"] == pytest.approx(nonprim.estimate_energy_mj(r["primitive"], (r["batch"], r["m"], r["k"],
                                                                                               r["n"])))
    assert profile_model(inv, fast(nonprim=True), tmp_path, progress=False).measured == 0
    assert counts["ops"] == 2


def test_cached_target_resolution_is_checked_before_measuring(tmp_path, monkeypatch):
    import json as _json

    from dse.hardware.device import describe_device
    from dse.profiling import profiler as prof_mod

    inv = build_inventory(models.create("vit_digits", **TINY), batch=1, name="tiny")
    inv.items = [it for it in inv.items if it.name == "blocks.0.attn.proj"]
    real = profile_model(inv, fast(), tmp_path, progress=False)
    device = describe_device("cpu")
    cache = tmp_path / device.slug / ".targets.json"
    data = _json.loads(cache.read_text())
    assert [v["slug"] for v in data.values()] == [real.target_slug]
    # a rerun with nothing to measure answers from the cache (no TVM target resolution)
    calls = []
    monkeypatch.setattr(kernels, "resolve_target", lambda *a, **k: calls.append(a) or pytest.fail("resolved"))
    again = profile_model(inv, fast(), tmp_path, progress=False)
    assert again.measured == 0 and again.path == real.path and not calls
    monkeypatch.undo()
    # a stale cache entry never decides where new measurements go
    cache.write_text(_json.dumps({k: {**v, "slug": "llvm-stale-1c"} for k, v in data.items()}))
    counts = _count_builds(monkeypatch)
    inv.items = [it for it in build_inventory(models.create("vit_digits", **TINY), batch=1).items
                 if it.name == "blocks.0.attn.qkv"]
    fresh = profile_model(inv, fast(), tmp_path, progress=False)
    assert fresh.path == real.path and fresh.measured == 4 and counts["kernels"] == 3
    assert prof_mod._resolve_target("cpu", tmp_path, device, use_cache=True)[1] == real.target_slug


class FakeRapl:
    """A meter stand-in: fixed energy per call, fixed idle power (what matters is the labelling)."""

    name = "rapl"

    def __init__(self):
        self.measured = 0

    def idle_power_w(self, duration_s=0.5, **kw):
        return 7.5

    def measure(self, fn, **kw):
        fn()
        self.measured += 1
        return type("Reading", (), {"energy_mj_per_call": 0.42})()

    def close(self):
        pass


def test_measured_energy_rows_are_labelled(tmp_path, monkeypatch):
    import dse.hardware.energy

    meter = FakeRapl()
    monkeypatch.setattr(dse.hardware.energy, "select_source", lambda *a, **k: meter)
    inv = build_inventory(models.create("vit_digits", **TINY), batch=1, name="tiny")
    inv.items = [it for it in inv.items if it.name == "blocks.0.attn.proj"]
    run = profile_model(inv, fast(), tmp_path, progress=False)
    assert meter.measured == len(run.rows) == 4  # three primitives + the PyTorch baseline
    for r in run.rows:
        assert (r["energy_source"], r["energy_mj"], r["idle_power_w"]) == ("rapl", 0.42, 7.5)


def test_cli_refuses_foreign_profile_and_reports_nothing_to_measure(tmp_path, capsys, tiny_inventory):
    out = tmp_path / "profiles"
    argv = ["profile", "--out", str(out), *TINY_SET, "--set", "profile.nonprim=false"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "measured" in first and "tvm/torch" in first
    # profiled without its non-primitive ops, the compiled model cannot be priced whole: no calibration, said
    assert "in-context calibration: none (" in first and "'embed'" in first
    assert main(argv) == 0
    assert "nothing to measure" in capsys.readouterr().out
    (meta,) = out.glob("*/*.yaml")
    meta.write_text(meta.read_text().replace("tvm: 0.27", "tvm: 0.26"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: profile") and "TVM version" in err and "--force" in err and "\n" not in err


@pytest.mark.skipif(kernels.cuda_available(), reason="this machine has a CUDA GPU")
def test_target_cuda_without_gpu_is_one_line_exit_1():
    proc = run_dse("profile", "--target", "cuda", timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: no CUDA device found") and "--compile-only" in lines[0]


def test_framework_row_times_the_models_empty_batch_forward(tmp_path):
    """The framework row is the model's own forward on no images, on the torch backend only."""
    import models
    from dse.profiling.inventory import build_inventory
    from dse.profiling.profiler import Settings, plan, profile_model

    model = models.create("vit_digits", img_size=16, embed_dim=48, depth=1, num_heads=3)
    inv = build_inventory(model, batch=2)
    calls = []
    inv.eager_probe = lambda: calls.append(1)  # the profiler must time exactly this callable
    specs = [s for s in plan(inv) if s.kind == "framework"]
    assert [(s.primitive, s.backend) for s in specs] == [("framework", "torch")]
    inv.items = [it for it in inv.items if it.kind == "framework"]  # measure only that row
    settings = Settings(target="cpu", repeat=3, min_repeat_ms=1.0, trials=0, energy=("model",), torch_threads=1)
    run = profile_model(inv, settings, tmp_path, progress=False)
    assert run.measured == 1 and not run.failed
    (row,) = run.rows
    assert row["primitive"] == "framework" and len(calls) > 3
    # interpreter time has no analytical energy: unknown (empty in the CSV), never a made-up 0 labelled "model"
    assert math.isnan(row["energy_mj"]) and row["energy_source"] == ""
    (stored,) = load_profile(run.path).frame.to_dict("records")  # through the CSV and pandas
    assert math.isnan(stored["energy_mj"]) and stored["energy_source"] == ""
    assert ",,," in run.path.read_text().splitlines()[1]  # energy_mj, energy_source, idle_power_w: all empty


def test_passes_remeasure_every_row_and_keep_the_median(tmp_path, monkeypatch, unfused):
    """--passes N: every row of the plan and every non-framework row others put in the profile gets N
    passes, a whole pass apart; a rerun measures only missing passes."""
    import numpy as np

    from dse.profiling.store import passes_of

    inv = build_inventory(unfused(models.create("vit_digits", **TINY)), batch=2, name="tiny")
    inv.items = [it for it in inv.items if it.op in ("layernorm", "scores")]  # four rows keep it quick
    specs = plan(inv)
    first = profile_model(inv, fast(nonprim=True), tmp_path, progress=False)
    assert first.measured == len(specs) == 4 and all(passes_of(r) == 1 for r in first.rows)
    store = ProfileStore(tmp_path, *(lambda p: (p.meta["device"], p.target, p.meta["target_slug"],
                                                p.meta["versions"]))(load_profile(first.path)))
    other = dict(first.rows[0], m=first.rows[0]["m"] + 1)  # a row another model (or calibration) put there
    store.add(other)
    order = []
    real = Measurer.measure
    monkeypatch.setattr(Measurer, "measure", lambda self, spec: order.append(spec.key) or real(self, spec))
    second = profile_model(inv, fast(nonprim=True, passes=3), tmp_path, progress=False)
    keys = [s.key for s in specs] + [row_key(other)]
    assert second.measured == 2 * 5 and sorted(order[:5]) == sorted(keys) == sorted(order[5:])  # pass by pass
    rows = {row_key(r): r for r in load_profile(first.path).frame.to_dict("records")}
    for key in keys:
        row = rows[key]
        assert passes_of(row) == 3 and len(row["pass_latencies_ms"]) == 3
        assert row["latency_ms"] == pytest.approx(float(np.median(row["pass_latencies_ms"])))
    order.clear()
    assert profile_model(inv, fast(nonprim=True, passes=3), tmp_path, progress=False).measured == 0 and not order
    forced = profile_model(inv, fast(nonprim=True, passes=2), tmp_path, force=True, progress=False)
    assert forced.measured == 2 * 4 and all(passes_of(r) == 2 for r in forced.rows)  # this model's rows only


def test_preempted_timings_are_told_from_a_kernels_own_spread(monkeypatch):
    from dse.profiling import profiler

    monkeypatch.setattr(profiler, "PREEMPTED_RATIO", 3.0)
    quiet = kernels.Timing.from_seconds([1.0e-3, 1.1e-3, 1.3e-3, 2.0e-3, 1.2e-3], 1)
    assert profiler.preempted(quiet) is None
    # the median (8 ms) is 8x the fastest sample: most samples lost the CPU
    loaded = kernels.Timing.from_seconds([1.0e-3, 8.0e-3, 8.0e-3, 16.0e-3, 8.0e-3], 1)
    assert "8.0x its fastest sample" in profiler.preempted(loaded)


def test_a_preempted_row_is_measured_again_and_keeps_its_fastest_attempt(monkeypatch, tiny_inventory):
    from dse.profiling import profiler

    monkeypatch.setattr(profiler, "PREEMPTED_RATIO", 3.0)
    attempts = iter([[1.0e-3, 8.0e-3, 8.0e-3], [1.0e-3, 1.1e-3, 1.2e-3]])

    def runnable(self, spec):
        return profiler._Runnable(kernels.Timing.from_seconds(next(attempts), 1), lambda: None, lambda: None,
                                  "default", 0)

    monkeypatch.setattr(Measurer, "_runnable", runnable)
    spec = next(s for s in plan(tiny_inventory, include_nonprim=False) if s.backend == "tvm")
    measurer = Measurer(fast(), kernels.resolve_target("cpu"), AnalyticalEnergyModel(), "slug")
    row = measurer.measure(spec)
    assert row["latency_ms"] == pytest.approx(1.1) and measurer.remeasured == 1


def test_rows_measured_under_load_are_not_reused(monkeypatch, tmp_path, tiny_inventory):
    """A row stored while the 1-min load exceeded the cores' share is measured again by the next run (and a
    row measured on a quiet host is reused as before)."""
    from dse.profiling import profiler

    monkeypatch.setattr(profiler, "load_1m", lambda: 99.0)
    first = profile_model(tiny_inventory, fast(), tmp_path, progress=False)
    assert profiler.load_warning(first.rows, first.cores) is not None
    monkeypatch.setattr(profiler, "load_1m", lambda: 0.25)
    second = profile_model(tiny_inventory, fast(), tmp_path, progress=False)
    assert second.busy_before == first.measured == second.measured > 0
    assert profiler.load_warning(second.rows, second.cores) is None
    assert profile_model(tiny_inventory, fast(), tmp_path, progress=False).measured == 0
