"""dse.cost.calibration: the in-context factors' fit against hand-made data with known factors, and the cost
model applying them — a calibrated prediction is each group's uncalibrated work times its factor."""

from __future__ import annotations

import numpy as np
import pytest

from dse.checkpoints import build_dense
from dse.config import load_config
from dse.cost import calibration
from dse.cost.model import CostModel, CostTable, read_profile
from dse.profiling.inventory import build_inventory
from dse.profiling.store import load_profile, merge_meta_entry
from models.assignment import Assignment
from tests.conftest import write_profile


def _synthetic(true: dict[str, float], models: int, seed: int) -> tuple[list[dict[str, float]], list[float]]:
    rng = np.random.default_rng(seed)
    comps = [{g: float(rng.uniform(0.1, 2.0)) for g in true} for _ in range(models)]
    return comps, [sum(true[g] * c[g] for g in true) for c in comps]


def test_fit_recovers_known_factors_and_reports_its_errors():
    true = {"fixed": 0.8, "mult": 1.1, "shift": 0.9, "moe": 1.3, "msa": 1.0, "hamming": 0.7}
    comps, measured = _synthetic(true, 12, seed=0)
    fitted = calibration.fit(comps, measured, model="m", batch=8, ridge=1e-9)
    assert fitted.factors == pytest.approx(true, rel=1e-4)
    assert fitted.error_after == pytest.approx(0, abs=1e-5) and fitted.loo_error == pytest.approx(0, abs=1e-4)
    # before: every model's uncalibrated sum against its measured time, by hand
    before = np.mean([abs(sum(c.values()) - m) / m for c, m in zip(comps, measured)])
    assert fitted.error_before == pytest.approx(before)
    assert fitted.models == 12 and (fitted.model, fitted.batch) == ("m", 8)


def test_ridge_pulls_undetermined_groups_to_one_and_absent_groups_stay_out():
    # mult and shift always in the same proportion: only their weighted sum is determined
    comps = [{"fixed": 1.0 + i, "mult": 2.0 * (i + 1), "shift": 1.0 * (i + 1)} for i in range(5)]
    measured = [1.2 * c["fixed"] + 0.9 * (c["mult"] + c["shift"]) for c in comps]
    fitted = calibration.fit(comps, measured, model="m", batch=1)
    assert set(fitted.factors) == {"fixed", "mult", "shift"}  # moe, msa, hamming: never exercised
    assert fitted.factor("hamming") == 1.0
    assert fitted.error_after < 0.01 < fitted.error_before
    assert fitted.factors["mult"] == pytest.approx(fitted.factors["shift"], abs=0.05)  # the ridge splits it evenly


def test_fit_refuses_mismatched_or_unknown_input():
    with pytest.raises(ValueError, match="one measured time per model"):
        calibration.fit([{"mult": 1.0}], [1.0, 2.0], model="m", batch=1)
    with pytest.raises(ValueError, match="unknown calibration group"):
        calibration.fit([{"gemm": 1.0}], [1.0], model="m", batch=1)


def test_meta_round_trip_keeps_other_models(tmp_path):
    cfg = load_config(None, ["profile.batch=2"])
    path = write_profile(tmp_path, cfg=cfg)
    comps, measured = _synthetic({"fixed": 1.1, "mult": 0.9}, 4, seed=1)
    a = calibration.fit(comps, measured, model="a", batch=2)
    b = calibration.fit(comps, measured, model="b", batch=8)
    merge_meta_entry(path, calibration.META_KEY, calibration.key("a", 2), a.as_meta())
    merge_meta_entry(path, calibration.META_KEY, calibration.key("b", 8), b.as_meta())
    meta = load_profile(path).meta
    assert calibration.stored(meta, "a", 2).factors == pytest.approx(a.factors, abs=1e-4)
    assert calibration.stored(meta, "b", 8).models == 4
    assert calibration.stored(meta, "a", 8) is None and meta["device"]  # other keys kept


def test_cost_model_applies_factors_per_group(tmp_path):
    cfg = load_config(None, ["profile.batch=2"])
    path = write_profile(tmp_path, cfg=cfg)
    model = build_dense(cfg)
    inventory = build_inventory(model, batch=2, nbits=cfg.finetune.nbits, name=cfg.model.name)
    factors = {"fixed": 0.5, "mult": 1.2, "shift": 0.8, "moe": 1.5, "msa": 0.9, "hamming": 2.0}
    fitted = calibration.Calibration(cfg.model.name, 2, factors, 6, 0.1, 0.01, 0.02)
    merge_meta_entry(path, calibration.META_KEY, calibration.key(cfg.model.name, 2), fitted.as_meta())
    profile = read_profile(path)
    raw = CostModel(CostTable(profile), calibrated=False).for_model(inventory)
    cal = CostModel(CostTable(profile)).for_model(inventory)
    assert raw.calibration is None and cal.calibration.factors == factors
    layers = raw.layers
    mixed = Assignment(attention={n: "hamming" for n in layers if n.endswith("attn")},
                       linear={n: c for n, c in zip([n for n in layers if not n.endswith("attn")],
                                                    ["mult", "shift", "moe"] * len(layers))})
    for plan in (Assignment(), Assignment.uniform(model, "hamming", "shift"), mixed):
        comp = raw.components(plan)
        assert raw.predict(plan).latency_ms == pytest.approx(sum(comp.values()))
        assert cal.predict(plan).latency_ms == pytest.approx(sum(factors[g] * v for g, v in comp.items()))
        assert cal.predict(plan).energy_mj == pytest.approx(raw.predict(plan).energy_mj)  # latency only
        assert sum(r.estimate.latency_ms for r in cal.per_layer(plan)) == pytest.approx(cal.predict(plan).latency_ms)
    # a static MoE capacity moves the moe group by the calibrated difference
    name = next(n for n, c in mixed.linear.items() if c == "moe")
    capped = Assignment(attention=mixed.attention, linear=mixed.linear, capacity={name: 0.9})
    shift = raw.components(capped)["moe"] - raw.components(mixed)["moe"]
    assert cal.predict(capped).latency_ms - cal.predict(mixed).latency_ms == pytest.approx(1.5 * shift)
    # the torch backend (eager PyTorch) is never calibrated: its framework row already is the whole forward
    assert CostModel(CostTable(profile), backend="torch").for_model(inventory).calibration is None
