"""dse.deploy.holdout: held-out assignments of a tiny model compiled whole and timed; the structure and the
figures checked against the per-assignment table, the cost model and the formula profile, not against speed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dse.checkpoints import build_dense
from dse.config import load_config
from dse.cost.model import CostTable, read_profile
from dse.cost.sources import model_cost
from dse.deploy.holdout import priced_choices, random_assignments, validate_assignments
from dse.profiling import reference
from dse.profiling.inventory import build_inventory
from models.assignment import Assignment
from tests.conftest import write_profile

TINY = ["model.kwargs={img_size: 16, patch_size: 8, embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 1.0}",
        "data.img_size=16", "profile.batch=2", "finetune.nbits=8"]
SECONDS_PER_MAC, OVERHEAD_MS = 2e-9, 0.002  # write_profile's formula


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config(None, TINY)
    root = tmp_path_factory.mktemp("profiles")
    path = write_profile(root, cfg=cfg, batch=2, seconds_per_mac=SECONDS_PER_MAC, overhead_ms=OVERHEAD_MS)
    profile = read_profile(path)
    model = build_dense(cfg)
    inventory = build_inventory(model, batch=2, nbits=cfg.finetune.nbits, name=cfg.model.name)
    return cfg, profile, model, inventory


def test_random_assignments_are_distinct_priced_and_seeded(setup):
    cfg, profile, _, inventory = setup
    mc = model_cost(CostTable(profile), cfg.cost, inventory, "tvm")
    allowed = priced_choices(mc)
    plans = random_assignments(mc, 6, seed=3)
    assert len({str(p.to_dict()) for p in plans}) == 6
    for p in plans:
        assert all(c in allowed[n] for n, c in {**p.attention, **p.linear}.items())
        assert set(p.capacity) == {n for n, c in p.linear.items() if c == "moe"}
        assert all(v == pytest.approx(mc.equilibrium_share(n), abs=1e-4) for n, v in p.capacity.items())
    assert [p.to_dict() for p in random_assignments(mc, 6, seed=3)] == [p.to_dict() for p in plans]


@pytest.fixture(scope="module")
def result(setup):
    cfg, profile, model, inventory = setup
    profile.meta[reference.META_KEY] = reference.record([0.25])  # a stored reference time of our own
    return validate_assignments(cfg, profile, model, inventory, count=2, seed=1, rounds=2, per_round=3,
                                kernel_runs=2)


def test_per_assignment_table_and_figures(setup, result):
    cfg, profile, _, inventory = setup
    rows = result["assignments"]
    assert len(rows) == 2 and result["rounds"] == 2
    mc = model_cost(CostTable(profile), cfg.cost, inventory, "tvm")
    ratio = result["reference"]["now_ms"] / 0.25
    assert result["reference"]["speed_ratio"] == pytest.approx(ratio)
    probes = result["reference"]["now_samples_ms"]  # before every block (rounds x models) and after the last
    assert len(probes) == 2 * len(rows) + 1 and result["reference"]["now_ms"] == pytest.approx(np.median(probes))
    for i, r in enumerate(rows):
        # each round's block at the profile's speed: times then / the reference around that block
        around = [min(probes[k], probes[k + 1]) for k in (rnd * len(rows) + i for rnd in range(2))]
        at_speed = np.median([m * 0.25 / ref for m, ref in zip(r["round_medians_ms"], around)])
        assert r["at_speed_ms"] == pytest.approx(at_speed)
        assert r["corrected_error"] == pytest.approx(r["predicted_ms"] / at_speed - 1)
    for r in rows:
        plan = Assignment.from_dict(r["plan"])
        assert r["predicted_ms"] == pytest.approx(mc.predict(plan).latency_ms)
        assert r["measured_ms"] > 0 and len(r["round_medians_ms"]) == 2
        assert r["spread"] == pytest.approx((max(r["round_medians_ms"]) - min(r["round_medians_ms"])) / r["measured_ms"])
        assert r["rel_error"] == pytest.approx(r["predicted_ms"] / r["measured_ms"] - 1)
        counts = {**dict.fromkeys(("msa", "hamming", "mult", "shift", "moe"), 0), **plan.counts()}
        assert {k: r[k] for k in counts} == counts
    s = result["summary"]
    errors = [r["rel_error"] for r in rows]
    assert s["within_10"] == pytest.approx(np.mean([abs(e) <= 0.10 for e in errors]))
    assert s["within_5"] == pytest.approx(np.mean([abs(e) <= 0.05 for e in errors]))
    assert s["mean_abs_error"] == pytest.approx(np.mean(np.abs(errors)))
    assert s["worst_error"] == pytest.approx(max(errors, key=abs))
    corrected = [r["corrected_error"] for r in rows]
    assert s["corrected_mean_abs_error"] == pytest.approx(np.mean(np.abs(corrected)))
    # two items: tau is +1 when both order them alike, -1 otherwise
    a, b = rows
    same = np.sign(a["predicted_ms"] - b["predicted_ms"]) * np.sign(a["measured_ms"] - b["measured_ms"])
    assert s["kendall_tau"] == pytest.approx(same)


def test_kernels_inside_the_models_against_their_rows(result):
    kernels = result["kernels"]
    assert kernels and {k["primitive"] for k in kernels} <= {"matmul", "bmm", "matshift", "matshift_decode", "matadd"}
    for k in kernels:
        assert k["calls"] >= 1 and k["in_model_ms"] > 0 and 1 <= k["models"] <= 2
        if k["source"] == "measured":  # the formula the profile was written with
            want = OVERHEAD_MS + k["b"] * k["m"] * k["k"] * k["n"] * SECONDS_PER_MAC * 1e3
            assert k["profile_ms"] == pytest.approx(want)
        assert k["ratio"] == pytest.approx(k["in_model_ms"] / k["profile_ms"])
    for prim, f in result["in_context"].items():
        mine = [k for k in kernels if k["primitive"] == prim]
        want = sum(k["in_model_ms"] * k["calls"] for k in mine) / sum(k["profile_ms"] * k["calls"] for k in mine)
        assert f["factor"] == pytest.approx(want) and f["kernels"] == len(mine)
    for r in result["assignments"]:
        assert r["in_model_kernels_ms"] > 0 and math.isfinite(r["in_model_other_ms"])


def test_cli_assignments_needs_validate():
    from tests.conftest import run_dse

    res = run_dse("cost", "--assignments", "2")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--validate" in res.stderr and "Traceback" not in res.stderr
