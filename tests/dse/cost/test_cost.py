"""Cost model: lookup, regression, MoE arithmetic, whole-model tables, profile identity.

Profiles here are synthetic: their latencies follow a known law, so every expectation is computed
independently from that law (or from the rows themselves).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import kernels
from dse.cost.model import (
    AttentionWork,
    Call,
    CostModel,
    CostTable,
    Estimate,
    LinearWork,
    ModelWork,
    check_profile,
    fastest_shift_primitive,
    moe_expected,
)
from dse.cost.regression import error_summary, fit_law
from dse.errors import AssignmentError, ProfileError
from dse.profiling.store import Profile
from models.assignment import Assignment
from models.moe import equilibrium_share


def _bytes(prim: str, b: int, m: int, k: int, n: int) -> float:
    c = kernels.op_counts(prim, b, m, k, n)
    return float(c.bytes_read + c.bytes_written)


def _law(prim: str, b: int, m: int, k: int, n: int, a: float, per_mac: float, per_byte: float) -> float:
    """The synthetic ground truth: latency_ms = a + per_mac·b·m·k·n + per_byte·bytes."""
    return a + per_mac * b * m * k * n + per_byte * _bytes(prim, b, m, k, n)


# per primitive: (fixed ms, ms per MAC, ms per byte); shift kernels are slower than matmul here
LAWS = {
    "matmul": (0.01, 2e-8, 1e-7),
    "matshift": (0.02, 6e-8, 1e-7),
    "matshift_decode": (0.015, 3e-8, 1e-7),
    "bmm": (0.01, 3e-8, 1e-7),
    "matadd": (0.01, 1e-8, 1e-7),
}
ENERGY_PER_MAC = 4.6e-9  # mJ per MAC, the analytical model's kind of law


def _row(prim, b, m, k, n, backend="tvm", noise=0.0, rng=None, **extra):
    a, pm, pb = LAWS.get(prim, (0.005, 0.0, 2e-7))
    lat = _law(prim, b, m, k, n, a, pm, pb) if prim in LAWS else a + pb * 4 * (b * m * k + b * m * n)
    if noise:
        lat *= 1 + noise * rng.standard_normal()
    return {"primitive": prim, "batch": b, "m": m, "k": k, "n": n, "dtype": "", "latency_ms": lat,
            "latency_ms_p90": lat, "repeats": 7, "energy_mj": ENERGY_PER_MAC * b * m * k * n + 1e-6,
            "energy_source": "model", "target": "{}", "tuned_trials": 0, "backend": backend,
            "schedule": "default", **extra}


def _random_shapes(rng, count, lo=16, hi=1024):
    return [(1, int(rng.integers(lo, hi)), int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
            for _ in range(count)]


def _profile(rng, prims=("matmul", "matshift", "matshift_decode"), count=24, extra_rows=(), noise=0.0):
    rows = [_row(p, *s, noise=noise, rng=rng) for p in prims for s in _random_shapes(rng, count)]
    return Profile.from_rows(rows + list(extra_rows), {})


# ---- regression ----------------------------------------------------------------------------------


def test_regression_recovers_a_synthetic_cost_law():
    rng = np.random.default_rng(1)
    a, pm, pb = 0.05, 2e-8, 3e-7
    shapes = np.array(_random_shapes(rng, 40))
    truth = np.array([_law("matmul", *s, a, pm, pb) for s in shapes])
    noisy = truth * (1 + 0.03 * rng.standard_normal(len(truth)))  # 3% measurement noise
    law = fit_law("matmul", shapes, noisy)
    held = np.array(_random_shapes(rng, 30))
    pred = law.predict_many(held)
    ref = np.array([_law("matmul", *s, a, pm, pb) for s in held])
    summary = error_summary(pred, ref)
    assert summary["within_10"] == 1.0
    assert summary["rmspe"] < 0.03
    # the fit's own leave-one-out error reflects the injected noise (~3%), not a perfect fit
    assert 0.01 < law.loo_rmspe < 0.06
    coef = dict(zip(law.columns, law.coef))
    assert coef["const"] == pytest.approx(a, rel=0.25)
    assert coef["macs"] == pytest.approx(pm, rel=0.25)


def _pad16x32(prim, b, m, k, n):
    return b, -(-m // 16) * 16, k, -(-n // 32) * 32, 0


def test_regression_counts_the_padded_work_a_kernel_computes():
    """A kernel that computes whole 16x32 tiles costs its padded work; the law sees that only through ``pad``."""
    rng = np.random.default_rng(4)
    a, pm = 0.005, 2e-8
    shapes = np.array(_random_shapes(rng, 40, 8, 160))
    truth = [a + pm * math.prod(_pad16x32("bmm", *s)[:4]) for s in shapes]
    padded = fit_law("bmm", shapes, truth, pad=_pad16x32)
    plain = fit_law("bmm", shapes, truth)
    held = np.array(_random_shapes(rng, 30, 8, 160))
    ref = [a + pm * math.prod(_pad16x32("bmm", *s)[:4]) for s in held]
    assert error_summary(padded.predict_many(held), ref)["rmspe"] < 0.01
    assert error_summary(plain.predict_many(held), ref)["rmspe"] > 0.05
    assert padded.predict(1, 17, 50, 33) == pytest.approx(a + pm * 32 * 50 * 64, rel=0.01)


def test_regression_recovers_a_per_tile_step_cost():
    """Work that scales with tile steps (one per row, k and 16-column tile) as well as MACs is recovered."""
    rng = np.random.default_rng(6)

    def pad(prim, b, m, k, n):
        return b, m, k, n, b * m * k * -(-n // 16)

    def truth(s):
        return 0.004 + 1e-8 * math.prod(s) + 5e-8 * pad("bmm", *s)[4]

    shapes = np.array(_random_shapes(rng, 40, 8, 160))
    law = fit_law("bmm", shapes, [truth(s) for s in shapes], pad=pad)
    assert "steps" in law.columns
    held = np.array(_random_shapes(rng, 30, 8, 160))
    assert error_summary(law.predict_many(held), [truth(s) for s in held])["rmspe"] < 0.01


def test_cost_table_pads_tvm_work_for_its_cpu_target():
    rng = np.random.default_rng(5)
    rows = [_row("bmm", *s, backend=bk) for bk in ("tvm", "torch") for s in _random_shapes(rng, 8)]
    cpu = CostTable(Profile.from_rows(rows, {"target": kernels.targets.cpu_target_dict()}))
    assert cpu.law("tvm", "bmm").pad is not None and cpu.law("torch", "bmm").pad is None
    unknown = CostTable(Profile.from_rows(rows, {}))
    assert unknown.law("tvm", "bmm").pad is None


def test_regression_flags_extrapolation():
    rng = np.random.default_rng(2)
    shapes = np.array(_random_shapes(rng, 10, 64, 128))
    law = fit_law("matmul", shapes, [_law("matmul", *s, *LAWS["matmul"]) for s in shapes])
    macs = shapes.prod(axis=1)
    assert not law.extrapolated(1, 96, 96, 96)
    big = int(math.ceil((2.2 * macs.max()) ** (1 / 3)))
    assert law.extrapolated(1, big, big, big)
    assert law.extrapolated(1, 8, 8, 8)  # below half the smallest


def test_regression_with_few_rows_is_still_monotone():
    law = fit_law("matmul", np.array([[1, 64, 64, 64], [1, 128, 128, 128]]), [0.1, 0.6])
    assert law.columns == ("const", "macs")
    assert law.predict(1, 64, 64, 64) == pytest.approx(0.1, rel=1e-6)
    assert law.predict(1, 256, 256, 256) > law.predict(1, 128, 128, 128)
    one = fit_law("matmul", np.array([[1, 64, 64, 64]]), [0.1])
    assert one.predict(1, 64, 64, 128) == pytest.approx(0.2)  # proportional to work
    assert one.loo_rmspe is None


def test_error_summary_matches_hand_computation():
    s = error_summary([1.05, 0.8, 1.12], [1.0, 1.0, 1.0])
    assert s["within_10"] == pytest.approx(1 / 3)
    assert s["within_15"] == pytest.approx(2 / 3)
    assert s["rmspe"] == pytest.approx(math.sqrt((0.05**2 + 0.2**2 + 0.12**2) / 3))


# ---- lookup ------------------------------------------------------------------------------------------


def test_exact_lookup_returns_the_measured_row():
    rng = np.random.default_rng(3)
    special = _row("matmul", 1, 197, 192, 768)
    special["latency_ms"], special["energy_mj"] = 123.456, 7.5  # far off the law on purpose
    table = CostTable(_profile(rng, extra_rows=[special]))
    est = table.estimate("tvm", Call("matmul", 1, 197, 192, 768))
    assert (est.latency_ms, est.energy_mj, est.source, est.fit_error) == (123.456, 7.5, "measured", None)
    # count multiplies
    assert table.estimate("tvm", Call("matmul", 1, 197, 192, 768, count=2)).latency_ms == pytest.approx(246.912)
    # an unmeasured shape is predicted, with its law's error attached
    est2 = table.estimate("tvm", Call("matmul", 1, 200, 192, 768))
    assert est2.source == "regression" and est2.fit_error is not None


def test_lookup_keeps_the_fastest_duplicate_and_separates_backends():
    rows = [_row("matmul", 1, 64, 64, 64), _row("matmul", 1, 64, 64, 64), _row("matmul", 1, 64, 64, 64, "torch")]
    rows[0]["latency_ms"], rows[1]["latency_ms"], rows[2]["latency_ms"] = 2.0, 1.5, 0.3
    table = CostTable(Profile.from_rows(rows, {}))
    assert table.lookup("tvm", "matmul", 1, 64, 64, 64) == (1.5, rows[1]["energy_mj"])
    assert table.lookup("torch", "matmul", 1, 64, 64, 64)[0] == 0.3


def test_unpriceable_primitive_is_a_profile_error():
    table = CostTable(_profile(np.random.default_rng(4), prims=("matmul",), count=5))
    with pytest.raises(ProfileError, match="no tvm rows for 'matadd'"):
        table.estimate("tvm", Call("matadd", 8, 32, 16, 17))


# ---- MoE -------------------------------------------------------------------------------------------


def test_equilibrium_share_balances_cost_times_tokens():
    s = equilibrium_share({"mult": 1.0, "shift": 3.0})
    assert s == pytest.approx(0.75)
    assert 1.0 * s == pytest.approx(3.0 * (1 - s))  # c_mult·n_mult = c_shift·n_shift


def test_moe_cost_interpolates_between_the_experts():
    mult, shift, over = Estimate(2.0, 20.0), Estimate(6.0, 10.0), Estimate(0.5, 1.0)
    for s in (0.0, 0.3, 1.0):
        e = moe_expected(mult, shift, over, s)
        assert e.latency_ms == pytest.approx(s * 2.0 + (1 - s) * 6.0 + 0.5)
        assert e.energy_mj == pytest.approx(s * 20.0 + (1 - s) * 10.0 + 1.0)
    with pytest.raises(AssignmentError):
        moe_expected(mult, shift, over, 1.2)


def _work(batch=2, tokens=65, dim=48, heads=3, nbits=8):
    m = batch * tokens
    names = [f"blocks.0.{p}" for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    dims = [(dim, 3 * dim), (dim, dim), (dim, 4 * dim), (4 * dim, dim)]
    linears = tuple(LinearWork(nm, 1, m, k, n) for nm, (k, n) in zip(names, dims))
    d, bh = dim // heads, batch * heads
    attn = AttentionWork("blocks.0.attn", {
        "msa": (Call("bmm", bh, tokens, d, tokens), Call("softmax", bh, tokens, tokens, tokens),
                Call("bmm", bh, tokens, tokens, d)),
        "hamming": (Call("hash", bh, 2 * tokens, d, nbits), Call("matadd", bh, 2 * nbits, tokens, d + 1),
                    Call("matadd", bh, tokens, 2 * nbits, d + 1)),
    })
    moe = {lw.name: (Call("router", 1, m, lw.k, 2), Call("dispatch", 1, m, lw.k, lw.n)) for lw in linears}
    fixed = (("blocks.0.norm1", Call("layernorm", 1, m, dim, dim)), ("embed", Call("embed", batch, tokens, 48, dim)))
    return ModelWork(linears, (attn,), fixed, moe, batch=batch)


def _model_profile(work, rng, with_shapes=True, count=12):
    rows = []
    prims = ("matmul", "matshift", "matshift_decode", "bmm", "matadd", "softmax", "hash", "dispatch",
             "layernorm", "embed")
    for p in prims:
        rows += [_row(p, *s) for s in _random_shapes(rng, count, 8, 300)]
    if with_shapes:  # the model's own shapes, as the profiler measures them
        for lw in work.linears:
            rows += [_row(p, lw.b, lw.m, lw.k, lw.n) for p in ("matmul", "matshift", "matshift_decode")]
        for aw in work.attention:
            rows += [_row(c.primitive, *c.shape) for calls in aw.calls.values() for c in calls]
        rows += [_row(c.primitive, *c.shape) for calls in work.moe.values() for c in calls]
        rows += [_row(c.primitive, *c.shape) for _, c in work.fixed]
    return Profile.from_rows(rows, {})


def _assignment(work, linear="mult", attention="msa"):
    return Assignment(attention={a.name: attention for a in work.attention},
                      linear={lw.name: linear for lw in work.linears})


def test_whole_model_prediction_sums_the_measured_rows():
    work = _work()
    cm = CostModel(_model_profile(work, np.random.default_rng(5)))
    mc = cm.for_model(work)
    table = cm.table

    def row(p, *s):
        return table.lookup("tvm", p, *s)[0]

    fixed = sum(row(c.primitive, *c.shape) for _, c in work.fixed)
    dense = fixed + sum(row("matmul", lw.b, lw.m, lw.k, lw.n) for lw in work.linears)
    dense += sum(row(c.primitive, *c.shape) for c in work.attention[0].calls["msa"])
    assert mc.predict(_assignment(work)).latency_ms == pytest.approx(dense)
    # shift: the faster of the two shift kernels per layer (matshift_decode under LAWS)
    shift = fixed + sum(min(row("matshift", lw.b, lw.m, lw.k, lw.n), row("matshift_decode", lw.b, lw.m, lw.k, lw.n))
                        for lw in work.linears)
    shift += sum(row(c.primitive, *c.shape) for c in work.attention[0].calls["hamming"])
    assert mc.predict(_assignment(work, "shift", "hamming")).latency_ms == pytest.approx(shift)
    assert {r.detail for r in mc.per_layer(_assignment(work, "shift")) if r.kind == "linear"} == {"matshift_decode"}
    rows = mc.per_layer(_assignment(work, "shift", "hamming"))
    assert sum(r.estimate.latency_ms for r in rows) == pytest.approx(shift)
    assert all(r.estimate.source == "measured" for r in rows)


def test_moe_layers_price_at_the_equilibrium_or_the_given_capacity():
    work = _work()
    cm = CostModel(_model_profile(work, np.random.default_rng(6)))
    mc = cm.for_model(work)
    lw = work.linears[2]
    c = mc.moe_expert_costs(lw.name)
    mult = cm.table.lookup("tvm", "matmul", lw.b, lw.m, lw.k, lw.n)[0]
    shift = min(cm.table.lookup("tvm", p, lw.b, lw.m, lw.k, lw.n)[0] for p in ("matshift", "matshift_decode"))
    assert c == pytest.approx({"mult": mult / lw.m, "shift": shift / lw.m})
    share = shift / (mult + shift)
    assert mc.equilibrium_share(lw.name) == pytest.approx(share)
    over = sum(cm.table.lookup("tvm", cl.primitive, *cl.shape)[0] for cl in work.moe[lw.name])
    base = mc.predict(_assignment(work))
    a = _assignment(work)
    a.linear[lw.name] = "moe"
    expect = base.latency_ms - mult + share * mult + (1 - share) * shift + over
    assert mc.predict(a).latency_ms == pytest.approx(expect)
    a.capacity[lw.name] = 0.25
    assert mc.predict(a).latency_ms == pytest.approx(base.latency_ms - mult + 0.25 * mult + 0.75 * shift + over)
    # the models.costs protocol
    from models.costs import ExpertCostModel, expert_costs

    assert isinstance(mc, ExpertCostModel)
    assert expert_costs(mc, lw.name) == pytest.approx(c)


def test_energy_and_mix_metrics():
    work = _work()
    prof = _model_profile(work, np.random.default_rng(7))
    lw = work.linears[0]
    lat = CostModel(prof, metric="latency").for_model(work).moe_expert_costs(lw.name)
    en = CostModel(prof, metric="energy").for_model(work).moe_expert_costs(lw.name)
    mix = CostModel(prof, metric="mix", mix_alpha=0.25).for_model(work).moe_expert_costs(lw.name)
    for e in ("mult", "shift"):
        ref = 0.25 * lat[e] / sum(lat.values()) + 0.75 * en[e] / sum(en.values())
        assert mix[e] == pytest.approx(ref)
    # energies in the synthetic profile are per MAC, equal for both experts
    assert en["mult"] == pytest.approx(en["shift"])


def test_unmeasured_layers_fall_back_to_regression_and_say_so():
    work = _work()
    mc = CostModel(_model_profile(work, np.random.default_rng(8), with_shapes=False, count=20)).for_model(work)
    rows = mc.per_layer(_assignment(work))
    assert {r.estimate.source for r in rows} == {"regression"}
    truth = sum(_law("matmul", lw.b, lw.m, lw.k, lw.n, *LAWS["matmul"]) for lw in work.linears)
    pred = sum(r.estimate.latency_ms for r in rows if r.kind == "linear")
    assert pred == pytest.approx(truth, rel=0.02)


def test_torch_backend_prices_the_pytorch_model():
    work = _work()
    rng = np.random.default_rng(9)
    rows = []
    for p in ("matmul", "bmm", "softmax", "layernorm", "embed"):
        rows += [_row(p, *s, backend="torch") for s in _random_shapes(rng, 8, 8, 300)]
    mc = CostModel(Profile.from_rows(rows, {}), backend="torch").for_model(work)
    dense = mc.predict(_assignment(work)).latency_ms
    assert math.isfinite(dense)
    # a PyTorch shift Linear is a float GEMM with power-of-two weights: priced as the torch matmul
    assert mc.predict(_assignment(work, "shift")).latency_ms == pytest.approx(dense)
    with pytest.raises(ProfileError, match="cannot price 'hamming'"):  # no torch matadd/hash rows
        mc.predict(_assignment(work, "mult", "hamming"))


def test_shift_choice_counts_the_requant_of_matshift():
    lw = (1, 128, 64, 64)
    rows = [_row("matshift", *lw), _row("matshift_decode", *lw), _row("requant", *lw)]
    rows[0]["latency_ms"], rows[1]["latency_ms"] = 1.0, 1.5
    for requant_ms, expect in ((0.2, "matshift"), (0.8, "matshift_decode")):
        rows[2]["latency_ms"] = requant_ms
        assert fastest_shift_primitive(Profile.from_rows(rows, {}), *lw) == expect
    work = ModelWork((LinearWork("fc", *lw),), (), requant={"fc": (Call("requant", *lw),)})
    mc = CostModel(Profile.from_rows([*rows, _row("matmul", *lw)], {})).for_model(work)
    assert mc.predict(Assignment(linear={"fc": "shift"})).latency_ms == pytest.approx(1.5)  # 1.0 + 0.8 > 1.5


def test_shift_choice_counts_the_input_rounding_of_matshift_decode():
    """The exporter puts matshift_decode's float input on the fixed-point grid (a ``quantize`` pass), so the
    decode path costs kernel + quantize, and that can make the integer kernel the faster choice."""
    lw = (1, 128, 64, 64)
    rows = [_row("matshift", *lw), _row("matshift_decode", *lw), _row("requant", *lw), _row("quantize", 1, 128, 64, 64)]
    rows[0]["latency_ms"], rows[1]["latency_ms"], rows[2]["latency_ms"] = 1.0, 0.8, 0.4
    for quantize_ms, expect in ((0.1, "matshift_decode"), (0.7, "matshift")):
        rows[3]["latency_ms"] = quantize_ms
        assert fastest_shift_primitive(Profile.from_rows(rows, {}), *lw) == expect
    extra = (Call("requant", *lw), Call("quantize", 1, 128, 64, 64))
    work = ModelWork((LinearWork("fc", *lw),), (), requant={"fc": extra})
    rows[3]["latency_ms"] = 0.1
    mc = CostModel(Profile.from_rows([*rows, _row("matmul", *lw)], {})).for_model(work)
    assert mc.predict(Assignment(linear={"fc": "shift"})).latency_ms == pytest.approx(0.9)  # 0.8 + 0.1 < 1.4


def test_matshift_decode_without_quantize_rows_is_priced_partial_and_says_so(caplog):
    """A profile from before ``quantize`` was an op prices matshift_decode as its kernel alone: that understates
    it, so the estimate is marked ``partial`` with a note and a warning is logged — never silently smaller."""
    lw = (1, 128, 64, 64)
    rows = [_row("matshift_decode", *lw), _row("matmul", *lw)]
    rows[0]["latency_ms"] = 0.8
    work = ModelWork((LinearWork("fc", *lw),), (), requant={"fc": (Call("quantize", 1, 128, 64, 64),)})
    with caplog.at_level("WARNING", logger="dse.cost.model"):
        mc = CostModel(Profile.from_rows(rows, {})).for_model(work)
    (row,) = mc.per_layer(Assignment(linear={"fc": "shift"}))
    assert row.estimate.latency_ms == pytest.approx(0.8)  # the kernel's own row, nothing added
    assert row.estimate.source == "partial" and "no 'quantize' rows" in row.estimate.notes[0]
    assert (row.estimate + Estimate(1.0, 1.0)).source == "partial"  # a sum with it stays partial
    assert row.as_dict()["notes"] == list(row.estimate.notes)
    assert "no tvm rows for 'quantize'" in caplog.text
    with_quantize = CostModel(Profile.from_rows([*rows, _row("quantize", 1, 128, 64, 64)], {})).for_model(work)
    (full,) = with_quantize.per_layer(Assignment(linear={"fc": "shift"}))
    assert full.estimate.source == "measured" and full.estimate.notes == ()


def test_vectorised_prediction_matches_and_is_fast():
    work = _work()
    mc = CostModel(_model_profile(work, np.random.default_rng(10))).for_model(work)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, 3, len(work.linears)) for _ in range(5)])
    idx = np.concatenate([idx, rng.integers(0, 2, (5, len(work.attention)))], axis=1)
    lat, _ = mc.predict_indices(idx)
    for t in range(5):
        a = Assignment(linear={lw.name: ("mult", "shift", "moe")[idx[t, i]] for i, lw in enumerate(work.linears)},
                       attention={aw.name: ("msa", "hamming")[idx[t, len(work.linears) + j]]
                                  for j, aw in enumerate(work.attention)})
        assert mc.predict(a).latency_ms == pytest.approx(lat[t])
    a = _assignment(work, "moe", "hamming")
    t0 = time.perf_counter()
    for _ in range(200):
        mc.predict(a)
    assert (time.perf_counter() - t0) / 200 < 1e-3


def test_unknown_layer_is_an_assignment_error():
    work = _work()
    mc = CostModel(_model_profile(work, np.random.default_rng(11))).for_model(work)
    with pytest.raises(AssignmentError, match="unknown linear layer"):
        mc.predict(Assignment(linear={"blocks.9.mlp.fc1": "shift"}))
    with pytest.raises(AssignmentError, match="not a Linear"):
        mc.moe_expert_costs("blocks.0.attn")


# ---- profile identity --------------------------------------------------------------------------------


def _meta(device: str, target: dict) -> dict:
    return {"device": {"slug": device, "name": device}, "target": target}


def test_profile_from_another_device_is_refused_for_another_target():
    cpu_target = kernels.targets.cpu_target_dict()
    from dse.hardware.device import describe_device

    here = describe_device("cpu").slug
    ok = Profile.from_rows([_row("matmul", 1, 8, 8, 8)], _meta(here, cpu_target))
    check_profile(ok, "cpu")  # same device, same target: accepted
    other = Profile.from_rows([_row("matmul", 1, 8, 8, 8)], _meta("amd-epyc-9654", {**cpu_target,
                                                                                        "mcpu": "znver4"}))
    with pytest.raises(ProfileError, match="measured on amd-epyc-9654") as err:
        check_profile(other, "cpu")
    assert "\n" not in str(err.value)
    gpu = Profile.from_rows([_row("matmul", 1, 8, 8, 8)],
                                _meta("nvidia-h100-80gb-hbm3", {"kind": "cuda", "arch": "sm_90"}))
    check_profile(gpu, "cuda:sm_90", device_slug="nvidia-h100-80gb-hbm3")
    with pytest.raises(ProfileError, match="compiled for"):
        check_profile(gpu, "cuda:sm_80", device_slug="nvidia-a100-sxm4-80gb")
    with pytest.raises(ProfileError, match="no device/target metadata"):
        check_profile(Profile.from_rows([_row("matmul", 1, 8, 8, 8)], {}), "cpu")


# ---- a real (tiny) model's inventory ----------------------------------------------------------------


def _tiny_vit():
    import models

    return models.create("vit_digits", img_size=16, embed_dim=48, depth=1, num_heads=3)


def _plan_profile(inventory, meta=None):
    """A complete profile for ``inventory`` as `dse profile` would plan it (latency from the LAWS-like law)."""
    from dse.profiling.profiler import plan

    rows = []
    for spec in plan(inventory):
        row = _row(spec.primitive, *spec.shape, backend=spec.backend)
        row.update(dtype=spec.dtype, schedule="eager" if spec.backend == "torch" else "default",
                   measured_at="2026-01-01T00:00:00+00:00", target="llvm-test-2c", idle_power_w=None)
        if spec.backend == "torch":
            row["latency_ms"] *= 0.5  # distinguishable from the tvm rows
        rows.append(row)
    return rows


def test_inventory_work_is_partitioned_by_choice():
    from dse.profiling.inventory import build_inventory

    inv = build_inventory(_tiny_vit(), batch=2, nbits=8)
    work = ModelWork.from_inventory(inv)
    assert [lw.name for lw in work.linears] == [it.name for it in inv.linears()]
    counted = len(work.linears) + len(work.fixed) + sum(map(len, work.moe.values()))
    counted += sum(map(len, work.requant.values())) + len(work.framework)
    counted += sum(len(c) for aw in work.attention for c in (*aw.calls.values(), *aw.eager.values()))
    assert counted == len(inv.items)  # every work item lands in exactly one place
    assert [c.primitive for _, c in work.framework] == ["framework"]
    assert {c.primitive for calls in work.moe.values() for c in calls} == {"router", "dispatch"}
    assert {c.primitive for calls in work.requant.values() for c in calls} == {"requant", "quantize"}
    (aw,) = work.attention
    assert [c.primitive for c in aw.calls["msa"]] == ["bmm", "softmax", "bmm"]
    assert sorted(c.primitive for c in aw.calls["hamming"]) == ["hamming_mix", "hash", "hash", "matadd", "matadd"]
    assert {c: [x.primitive for x in v] for c, v in aw.eager.items()} == {"msa": ["sdpa"]}  # timm's fused_attn


def test_dense_torch_prediction_is_the_sum_of_its_rows():
    from dse.profiling.inventory import build_inventory

    model = _tiny_vit()
    inv = build_inventory(model, batch=2, nbits=8)
    rows = _plan_profile(inv)
    mc = CostModel(Profile.from_rows(rows, {}), backend="torch").for_model(inv)
    assert mc.predict(Assignment.uniform(model)).latency_ms == pytest.approx(_eager_dense_sum(inv, rows))
    assert {r.estimate.source for r in mc.per_layer(Assignment.uniform(model))} == {"measured"}


def _eager_dense_sum(inventory, rows):
    """The dense model in eager PyTorch, summed by hand from the torch rows: matmul Linears, and the items of
    the msa choice and of no choice that eager PyTorch runs (a fused attention's sdpa, not its products)."""
    by_key = {(r["primitive"], r["backend"], r["batch"], r["m"], r["k"], r["n"]): r["latency_ms"] for r in rows}
    expect = 0.0
    for it in inventory.items:
        if it.kind == "linear":
            expect += by_key[("matmul", "torch", *it.shape)]
        elif it.choice in (None, "msa") and it.backend in (None, "torch"):
            expect += by_key[(it.primitives[0], "torch", *it.shape)]
    return expect


def test_fused_attention_is_priced_as_its_sdpa_row_on_the_torch_backend_only(unfused, caplog):
    """timm's fused attention: eager msa = the sdpa row (plus the work every choice shares); the compiled model
    keeps bmm + softmax + bmm. A profile from before sdpa rows prices eager msa as those three ops, said once."""
    import models
    from dse.profiling.inventory import build_inventory

    def vit():
        return models.create("vit_digits", img_size=16, embed_dim=48, depth=2, num_heads=3)

    def attention_ms(rows, backend, inventory):
        mc = CostModel(Profile.from_rows(rows, {}), backend=backend).for_model(inventory)
        return mc, sum(r.estimate.latency_ms for r in mc.per_layer(dense) if r.kind == "attention")

    def rows_ms(rows, backend, items):
        by_key = {(r["primitive"], r["backend"], r["batch"], r["m"], r["k"], r["n"]): r["latency_ms"] for r in rows}
        return sum(by_key[(it.primitives[0], backend, *it.shape)] for it in items)

    model = vit()
    dense = Assignment.uniform(model)
    inv = build_inventory(model, batch=2, nbits=8)
    rows = _plan_profile(inv)
    msa = [it for it in inv.items if it.choice == "msa"]
    sdpa, unfused_ops = [it for it in msa if it.backend == "torch"], [it for it in msa if it.backend == "tvm"]
    assert [it.op for it in sdpa] == ["sdpa"] * 2
    assert sorted(it.op for it in unfused_ops) == ["context", "context", "scores", "scores", "softmax", "softmax"]
    torch_cost, eager_ms = attention_ms(rows, "torch", inv)
    assert eager_ms == pytest.approx(rows_ms(rows, "torch", sdpa))
    shared = sum(r.estimate.latency_ms for r in torch_cost.per_layer(dense) if r.kind != "attention")
    assert torch_cost.predict(dense).latency_ms == pytest.approx(rows_ms(rows, "torch", sdpa) + shared)
    assert attention_ms(rows, "tvm", inv)[1] == pytest.approx(rows_ms(rows, "tvm", unfused_ops))
    # an old profile, planned when every attention ran unfused: no sdpa row
    old = _plan_profile(build_inventory(unfused(vit()), batch=2, nbits=8))
    assert not [r for r in old if r["primitive"] == "sdpa"]
    with caplog.at_level("INFO", logger="dse.cost.model"):
        assert attention_ms(old, "torch", inv)[1] == pytest.approx(rows_ms(old, "torch", unfused_ops))
    said = [r.getMessage() for r in caplog.records if "sdpa" in r.getMessage()]
    assert len(said) == 1 and "unfused" in said[0]  # once for the model, not per attention


def test_eager_framework_time_is_added_on_the_torch_backend_only():
    from dse.profiling.inventory import build_inventory

    model = _tiny_vit()
    inv = build_inventory(model, batch=2, nbits=8)
    rows = _plan_profile(inv)
    (fw,) = [r for r in rows if r["primitive"] == "framework"]
    assert fw["backend"] == "torch"  # planned for eager PyTorch alone
    dense = Assignment.uniform(model)
    torch_cost = CostModel(Profile.from_rows(rows, {}), backend="torch").for_model(inv)
    without = [r for r in rows if r is not fw]
    torch_without = CostModel(Profile.from_rows(without, {}), backend="torch").for_model(inv)
    assert torch_cost.predict(dense).latency_ms - torch_without.predict(dense).latency_ms == \
        pytest.approx(fw["latency_ms"])
    assert "framework" in [r.layer for r in torch_cost.per_layer(dense)]
    tvm_cost = CostModel(Profile.from_rows(rows, {}), backend="tvm").for_model(inv)
    assert "framework" not in [r.layer for r in tvm_cost.per_layer(dense)]
    # interpreter time has no energy figure: the eager model's energy is unknown, not the sum of its ops
    unknown = [{**r, "energy_mj": math.nan, "energy_source": ""} if r is fw else r for r in rows]
    torch_unknown = CostModel(Profile.from_rows(unknown, {}), backend="torch").for_model(inv)
    assert math.isnan(torch_unknown.predict(dense).energy_mj)
    assert torch_unknown.predict(dense).latency_ms == pytest.approx(torch_cost.predict(dense).latency_ms)
    assert math.isfinite(tvm_cost.predict(dense).energy_mj)  # the compiled model has no framework row



def test_side_by_side_holdout_separates_the_laws_error_from_drift(monkeypatch):
    """A profile taken when the machine ran at half speed: against it every held-out shape is predicted
    2x too slow (drift 0.5); with the primitive's rows re-measured and its law refitted first, the
    prediction is the law itself."""
    import dse.cost.validate as cv
    from dse.profiling.inventory import build_inventory
    from dse.profiling.profiler import Measurer, Settings

    inv = build_inventory(_tiny_vit(), batch=2, nbits=8)
    rng = np.random.default_rng(3)
    rows = []
    for prim in ("matmul", "bmm", "matadd"):
        ref = cv.reference_shapes(None, "torch", prim, inv)
        for shape in dict.fromkeys(ref + cv.holdout_shapes(ref, set(ref), 8, rng)):
            row = _row(prim, *shape, backend="torch")
            rows.append({**row, "latency_ms": 2 * row["latency_ms"]})  # profiled at half speed

    def measure(self, spec):  # the machine now: the law itself
        return {**_row(spec.primitive, *spec.shape, backend=spec.backend), "measured_at": "now"}

    monkeypatch.setattr(Measurer, "measure", measure)
    results = cv.validate_shapes(Profile.from_rows(rows, {}), Settings(energy=("model",)), inv, count=4,
                                 backends=("torch",), side_by_side=True)
    assert {r.primitive for r in results} == {"matmul", "bmm", "matadd"} and len(results) == 12
    for r in results:
        truth = _row(r.primitive, r.b, r.m, r.k, r.n)["latency_ms"]
        assert r.measured_ms == pytest.approx(truth) and r.drift == pytest.approx(0.5)
        assert r.rel_error == pytest.approx(1.0, abs=0.02) and abs(r.side_by_side_error) < 0.02
    summary = cv.summarize_shapes(results)["all"]
    assert summary["within_15"] == 0.0 and summary["side_by_side_within_10"] == 1.0
    assert summary["drift_corrected_within_10"] == 1.0


def test_dense_validation_times_the_model_in_bursts_spread_over_the_check(monkeypatch):
    """The measured latency is the median of every burst's runs (one burst first, then one after each
    side-by-side re-measurement of the rows); each round's error pairs its fresh rows with its own burst."""
    import dse.cost.validate as cv
    from dse.profiling.inventory import build_inventory
    from dse.profiling.profiler import Settings

    model = _tiny_vit()
    inv = build_inventory(model, batch=2, nbits=8)
    profile = Profile.from_rows(_plan_profile(inv), {})
    bursts = iter([[5.0, 1.0, 3.0], [10.0, 12.0], [2.0, 2.5, 40.0], [7.0]])
    calls = []

    def fake_time_model(m, batch, input_size, **kw):
        calls.append(kw)
        return next(bursts)

    monkeypatch.setattr(cv, "time_model", fake_time_model)
    settings = Settings(repeat=2, min_repeat_ms=1.0, energy=("model",), torch_threads=1)
    out = cv.validate_dense_model(profile, model, inv, threads=1, min_runs=30, min_seconds=3.0,
                                  settings=settings, rounds=3)
    every = [5.0, 1.0, 3.0, 10.0, 12.0, 2.0, 2.5, 40.0, 7.0]
    assert out["bursts"] == 4 and out["runs"] == len(every) and out["measured_ms"] == np.median(every)
    assert [c["min_runs"] for c in calls] == [7] * 4 and all(c["min_seconds"] == 0.75 for c in calls)
    predicted = CostModel(profile, backend="torch").for_model(inv).predict(Assignment.uniform(model)).latency_ms
    assert out["predicted_ms"] == pytest.approx(predicted)
    assert out["rel_error"] == pytest.approx((predicted - np.median(every)) / np.median(every))
    assert out["side_by_side_measured_ms"] == np.median([11.0, 2.5, 7.0])  # the rounds' burst medians
    monkeypatch.setattr(cv, "time_model", lambda *a, **kw: [4.0, 6.0])
    one = cv.validate_dense_model(profile, model, inv, min_runs=30, min_seconds=3.0)  # no side by side
    assert one["bursts"] == 1 and one["measured_ms"] == 5.0 and "side_by_side_error" not in one


# ---- the command line -------------------------------------------------------------------------------


def _write_profile(tmp_path, rows, device, target_slug):
    import yaml

    from dse.profiling.store import format_rows

    path = tmp_path / "p" / device / f"{target_slug}.csv"
    path.parent.mkdir(parents=True)
    path.write_text(format_rows(rows))
    meta = {"format": 1, "device": {"kind": "cpu", "name": device, "slug": device},
            "target": kernels.targets.cpu_target_dict(), "target_slug": target_slug, "versions": {}}
    path.with_suffix(".yaml").write_text(yaml.safe_dump(meta))
    return path


def test_cli_prices_for_any_devices_profile_and_validates_only_here(tmp_path):
    import json

    from dse.hardware.device import describe_device
    from dse.profiling.inventory import build_inventory
    from tests.conftest import run_dse

    inv = build_inventory(_tiny_vit(), batch=2, nbits=8)
    rows = _plan_profile(inv)
    here = describe_device("cpu").slug
    import tvm  # noqa: F401  the host CPU's LLVM name needs TVM loaded; an earlier call may have cached a guess

    kernels.targets.host_cpu_name.cache_clear()
    slug = kernels.target_slug(kernels.resolve_target("cpu"))
    good = _write_profile(tmp_path / "a", rows, here, slug)
    plan = tmp_path / "plan.yaml"
    Assignment(linear={"blocks.0.mlp.fc1": "moe"}, attention={"blocks.0.attn": "hamming"}).to_yaml(plan)
    common = ["--set", "model.kwargs={embed_dim: 48, depth: 1, num_heads: 3}", "--set", "data.img_size=16",
              "--batch", "2", "--set", "finetune.nbits=8"]
    res = run_dse("cost", "--profile", str(good), "--assignment", str(plan), "--json", *common)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["latency_ms"] == pytest.approx(sum(r["latency_ms"] for r in out["layers"] + out["fixed"]))
    assert out["moe"]["blocks.0.mlp.fc1"]["equilibrium_share"] > 0
    # Another device's profile prices the model for that device, named in the answer.
    foreign = _write_profile(tmp_path / "b", [dict(r, latency_ms=2 * r["latency_ms"]) for r in rows],
                             "amd-epyc-9654", "llvm-znver4-2c")
    res = run_dse("cost", "--profile", str(foreign), "--assignment", str(plan), "--json", *common)
    assert res.returncode == 0, res.stderr
    theirs = json.loads(res.stdout)
    assert (theirs["device"], theirs["target"]) == ("amd-epyc-9654", "llvm-znver4-2c")
    assert theirs["latency_ms"] == pytest.approx(2 * out["latency_ms"])  # every row measured, each twice as slow
    # Both devices at once: one column each, the same totals as alone.
    res = run_dse("cost", "--profile", str(good), "--profile", str(foreign), "--assignment", str(plan), *common)
    assert res.returncode == 0, res.stderr
    assert f"{here}/{slug} ms" in res.stdout and "amd-epyc-9654/llvm-znver4-2c ms" in res.stdout
    res = run_dse("cost", "--profile", str(good), "--profile", str(foreign), "--json", *common)
    both = json.loads(res.stdout)["devices"]
    assert [d["device"] for d in both] == [here, "amd-epyc-9654"]
    assert both[1]["latency_ms"] == pytest.approx(2 * both[0]["latency_ms"])
    # A --target the profile was not measured for is refused; validation measures here, so it needs this
    # machine's profile.
    res = run_dse("cost", "--profile", str(foreign), "--target", "cpu", *common)
    assert res.returncode == 2 and "llvm-znver4-2c" in res.stderr.strip().splitlines()[-1]
    res = run_dse("cost", "--validate", "--profile", str(foreign), *common)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "amd-epyc-9654" in lines[-1] and "Traceback" not in res.stderr


# ---- validation helpers -----------------------------------------------------------------------------


def test_holdout_shapes_are_new_and_around_the_reference():
    from dse.cost.validate import holdout_shapes

    ref = [(1, 520, 96, 288), (1, 520, 384, 96), (24, 65, 32, 65)]
    exclude = set(ref) | {(1, 520, 96, 96)}
    shapes = holdout_shapes(ref, exclude, 15, np.random.default_rng(0))
    assert len(shapes) == len(set(shapes)) == 15
    assert not set(shapes) & exclude
    for b, m, k, n in shapes:
        assert b in (1, 24)
        assert 0.75 * 65 - 1 <= m <= 1.25 * 520 + 1 and 0.75 * 32 - 1 <= k <= 1.25 * 384 + 1
        assert 0.75 * 65 - 1 <= n <= 1.25 * 288 + 1


def test_validation_summary_figures():
    from dse.cost.validate import HoldoutResult, summarize_shapes

    rs = [HoldoutResult("matmul", "tvm", 1, 8, 8, 8, measured_ms=1.0, predicted_ms=p, law_loo_rmspe=0.1,
                        extrapolated=False, load_1m=None, drift=d) for p, d in ((1.05, 1.0), (0.5, 2.0))]
    s = summarize_shapes(rs)
    assert s["all"]["within_10"] == 0.5 and s["all"]["drift_corrected_within_10"] == 1.0
    assert s["tvm/matmul"]["rmspe"] == pytest.approx(math.sqrt((0.05**2 + 0.5**2) / 2))


def test_moe_expert_provenance_on_the_committed_profile_turns_regression_without_the_row(tmp_path):
    """The committed Xeon profile measures blocks.0.attn.qkv's Mult GEMM (520x96x288); without that row the
    Mult cost comes from the matmul law, and the provenance names the law and its leave-one-out error."""
    import shutil

    from dse.checkpoints import build_dense
    from dse.config import load_config
    from dse.cost import provenance
    from dse.cost.sources import cost_model_for
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "default.yaml", [])
    src = ROOT / "profiles" / "intel-xeon-processor" / "llvm-rocketlake-2c.csv"
    shutil.copy(src, tmp_path / src.name)
    shutil.copy(src.with_suffix(".yaml"), tmp_path / src.with_suffix(".yaml").name)
    dense = build_dense(cfg)
    layer = "blocks.0.attn.qkv"
    before = cost_model_for(cfg, dense, tmp_path / src.name).moe_expert_provenance(layer)
    assert (before["source"], before["experts"]["mult"]["source"]) == ("measured", "measured")
    assert (before["device"], before["target"]) == ("intel-xeon-processor", "llvm-rocketlake-2c")
    assert before["profile_date"] and "laws" not in before
    lines = (tmp_path / src.name).read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("matmul,tvm,1,520,96,288,")]
    assert len(kept) == len(lines) - 1
    (tmp_path / src.name).write_text("".join(kept))
    mc = cost_model_for(cfg, dense, tmp_path / src.name)
    after = mc.moe_expert_provenance(layer)
    assert after["experts"]["mult"]["source"] == "regression" and after["experts"]["shift"]["source"] == "measured"
    assert after["source"] == "mixed"
    (law,) = after["laws"]
    expect = mc.cost_model.table.law("tvm", "matmul", "latency")
    assert law["primitive"] == "matmul" and law["loo_rmspe"] == expect.loo_rmspe and law["rows"] == expect.rows
    assert "leave-one-out RMSPE" in provenance.describe(after) and "mult regression" in provenance.describe(after)
    with pytest.raises(Exception, match="cost.strict.*blocks.0.attn.qkv.*not measured"):
        provenance.check_strict({layer: after})
    provenance.check_strict({layer: before})  # measured: accepted
    # the whole-design source: every dense design that uses that GEMM is now partly regressed
    assert mc.source(Assignment.uniform(dense)) == "mixed"
    assert cost_model_for(cfg, dense, src).source(Assignment.uniform(dense)) == "measured"
