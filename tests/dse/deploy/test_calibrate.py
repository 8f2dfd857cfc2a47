"""dse.deploy.calibrate: a tiny model's calibration models compiled whole and timed on a formula profile; the fit,
what is stored and what the cost model then predicts, checked against the rows and the cost model's own parts."""

from __future__ import annotations

import numpy as np
import pytest

from dse.checkpoints import build_dense
from dse.config import load_config
from dse.cost import calibration
from dse.cost.model import CostModel, CostTable, read_profile
from dse.deploy.calibrate import calibrate_profile, ensure_calibration
from dse.deploy.holdout import calibration_plans, calibration_seed, choice_counts, random_assignments
from dse.profiling import reference
from dse.profiling.inventory import build_inventory
from dse.profiling.store import merge_meta_entry
from models.assignment import Assignment
from tests.conftest import write_profile

TINY = ["model.kwargs={img_size: 16, patch_size: 8, embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 1.0}",
        "data.img_size=16", "profile.batch=2", "finetune.nbits=8", "profile.calibration_models=3"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    cfg = load_config(None, TINY)
    path = write_profile(tmp_path_factory.mktemp("profiles"), cfg=cfg, batch=2)
    merge_meta_entry(path, reference.META_KEY, "latency_ms", 0.25)  # a stored reference time of our own
    merge_meta_entry(path, reference.META_KEY, "primitive", reference.KERNEL[0])
    merge_meta_entry(path, reference.META_KEY, "shape", list(reference.KERNEL[1:]))
    model = build_dense(cfg)
    inventory = build_inventory(model, batch=2, nbits=cfg.finetune.nbits, name=cfg.model.name)
    fitted, rows = calibrate_profile(cfg, path, model, inventory, rounds=2, per_round=3)
    return cfg, path, model, inventory, fitted, rows


def test_the_corner_designs_come_first_and_held_out_assignments_avoid_them(calibrated):
    cfg, path, model, inventory, _, rows = calibrated
    raw = CostModel(CostTable(read_profile(path)), calibrated=False).for_model(inventory)
    plans = calibration_plans(raw, 3, calibration_seed(cfg))
    assert [choice_counts(p) for p in plans] == [{k: r[k] for k in ("msa", "hamming", "mult", "shift", "moe")}
                                                 for r in rows]
    assert plans[0].to_dict() == Assignment.uniform(model).to_dict()
    assert set(plans[1].linear.values()) == {"shift"} and set(plans[2].attention.values()) == {"hamming"}
    taken = {raw.choice_names(p) for p in calibration_plans(raw, 8, calibration_seed(cfg))}
    held = random_assignments(raw, 20, seed=cfg.seed, exclude=taken)
    assert not taken & {raw.choice_names(p) for p in held}


def test_fit_and_rows_agree_with_the_cost_models_parts(calibrated):
    cfg, path, _, inventory, fitted, rows = calibrated
    raw = CostModel(CostTable(read_profile(path)), calibrated=False).for_model(inventory)
    plans = calibration_plans(raw, 3, calibration_seed(cfg))
    assert fitted.models == 3 and len(rows) == 3
    for plan, r in zip(plans, rows):
        comp = raw.components(plan)
        assert r["uncalibrated_ms"] == pytest.approx(sum(comp.values()))
        assert r["calibrated_ms"] == pytest.approx(sum(fitted.factor(g) * v for g, v in comp.items()))
        assert r["measured_ms"] > 0
        assert r["calibrated_error"] == pytest.approx(r["calibrated_ms"] / r["measured_ms"] - 1)
    # the fit's own figures, recomputed from the rows
    assert fitted.error_before == pytest.approx(np.mean([abs(r["uncalibrated_error"]) for r in rows]))
    assert fitted.error_after == pytest.approx(np.mean([abs(r["calibrated_error"]) for r in rows]))
    assert fitted.error_after <= fitted.error_before
    lo, hi = calibration.FACTOR_RANGE
    assert all(lo <= f <= hi for f in fitted.factors.values())
    assert fitted.speed_ratio > 0


def test_the_stored_calibration_prices_the_model_from_then_on(calibrated):
    cfg, path, model, inventory, fitted, _ = calibrated
    profile = read_profile(path)
    stored = calibration.stored(profile.meta, cfg.model.name, 2)
    assert stored.factors == pytest.approx(fitted.factors, abs=1e-4)
    raw = CostModel(CostTable(profile), calibrated=False).for_model(inventory)
    cal = CostModel(CostTable(profile)).for_model(inventory)
    plan = Assignment.uniform(model, "hamming", "shift")
    assert cal.predict(plan).latency_ms == pytest.approx(
        sum(stored.factor(g) * v for g, v in raw.components(plan).items()))
    # the profile stage reuses it while the rows stay, and fits none when switched off
    again = ensure_calibration(cfg, path, inventory, refit=False)
    assert not again.fresh and again.models == [] and again.fitted.factors == stored.factors
    off = load_config(None, [*TINY[:-1], "profile.calibration_models=0"])
    assert ensure_calibration(off, path, inventory, refit=True).fitted is None
