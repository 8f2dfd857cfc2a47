"""dse search: search space, bulk trial storage, stage A (resume, baselines), stage B, outputs, and
the CLI killed and rerun."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from dse.checkpoints import build_dense
from dse.cost.sources import CostTableFile, synthetic_costs
from dse.errors import ConfigError, ProfileError, StageError
from dse.search.driver import (
    Objective,
    _unseen_neighbour,
    choose,
    front_table,
    pareto,
    priced_choices,
    run_stage_a,
    stored_trials,
)
from dse.search.sensitivity import Sensitivity, risk_table
from dse.search.space import SearchSpace
from dse.search.trial_store import TrialStore, open_storage
from models.assignment import Assignment

KINDS = {
    f"blocks.{i}.{p}": ("attention" if p == "attn" else "linear")
    for i in range(3)
    for p in ("attn", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
}


# ---------------------------------------------------------------------------------------------------
# search space


def test_space_freeze_and_tie_map_params_to_layers():
    space = SearchSpace.build(KINDS, freeze=["blocks.0.*"], tie=["fc1", "attn.qkv"])
    names = [p.name for p in space.params]
    assert "tie:fc1" in names and "tie:attn.qkv" in names
    assert not any(n.startswith("blocks.0.") for n in names)
    tied = next(p for p in space.params if p.name == "tie:fc1")
    assert tied.layers == ("blocks.1.mlp.fc1", "blocks.2.mlp.fc1") and tied.choices == (
        "mult",
        "shift",
        "moe",
    )
    # every searchable layer is decided by exactly one parameter; frozen ones are pinned dense
    decided = [layer for p in space.params for layer in p.layers]
    assert sorted(decided + list(space.pinned)) == sorted(KINDS)
    assert all(space.pinned[n] == ("msa" if KINDS[n] == "attention" else "mult") for n in space.pinned)
    params = {p.name: p.choices[-1] for p in space.params}
    choice = space.choices(params)
    assert choice["blocks.2.mlp.fc1"] == choice["blocks.1.mlp.fc1"] == "moe"
    assert choice["blocks.0.mlp.fc1"] == "mult" and choice["blocks.0.attn"] == "msa"
    a = space.assignment(params)
    assert (
        isinstance(a, Assignment)
        and a.linear["blocks.1.attn.qkv"] == "moe"
        and a.attention["blocks.2.attn"] == "hamming"
    )


def test_space_rejects_typos_and_ambiguous_ties():
    with pytest.raises(ConfigError, match="matches no layer"):
        SearchSpace.build(KINDS, freeze=["block.0.*"])
    with pytest.raises(ConfigError, match="matches no searchable layer"):
        SearchSpace.build(KINDS, tie=["fc3"])
    with pytest.raises(ConfigError, match="two search.tie roles"):
        SearchSpace.build(KINDS, tie=["fc1", "mlp.fc1"])
    with pytest.raises(ConfigError, match="nothing to search"):
        SearchSpace.build(KINDS, freeze=["*"])


def test_space_drops_unpriced_choices_and_baselines_fall_back_to_dense():
    available = {n: (("msa",) if k == "attention" else ("mult", "shift")) for n, k in KINDS.items()}
    space = SearchSpace.build(KINDS, available=available)
    assert all(p.kind == "linear" and p.choices == ("mult", "shift") for p in space.params)
    assert all(space.pinned[n] == "msa" for n, k in KINDS.items() if k == "attention")
    base = space.baselines()
    assert set(base["recipe"].values()) == {"mult"}  # no moe priced: the recipe's Linears stay dense
    assert set(base["all-shift"].values()) == {"shift"}


def test_cost_table_file_predict_and_priced_choices(tmp_path):
    table = synthetic_costs(KINDS, seed=1)
    del table.layers["blocks.1.mlp.fc2"]["moe"]
    path = table.to_json(tmp_path / "c.json")
    costs = CostTableFile.from_json(path)
    raw = json.loads(path.read_text())
    plan = Assignment(attention={"blocks.0.attn": "hamming"}, linear={"blocks.2.mlp.fc1": "shift"})
    want_lat = (
        raw["fixed"][0]
        + sum(v["msa" if "msa" in v else "mult"][0] for v in raw["layers"].values())
        - raw["layers"]["blocks.0.attn"]["msa"][0]
        + raw["layers"]["blocks.0.attn"]["hamming"][0]
        - raw["layers"]["blocks.2.mlp.fc1"]["mult"][0]
        + raw["layers"]["blocks.2.mlp.fc1"]["shift"][0]
    )
    assert math.isclose(costs.predict(plan).latency_ms, want_lat, rel_tol=1e-12)
    avail = priced_choices(costs, KINDS)
    assert avail["blocks.1.mlp.fc2"] == ("mult", "shift") and avail["blocks.0.mlp.fc2"] == (
        "mult",
        "shift",
        "moe",
    )
    with pytest.raises(ProfileError):
        costs.predict(Assignment(linear={"blocks.1.mlp.fc2": "moe"}))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ProfileError, match="malformed"):
        CostTableFile.from_json(tmp_path / "bad.json")


def test_risk_table_clamps_and_scales_moe_by_shift_share():
    sens = Sensitivity(
        base_loss=1.0,
        base_acc=90.0,
        delta={"a": {"hamming": 0.2}, "l1": {"shift": 0.5}, "l2": {"shift": -0.1}},
    )
    table = risk_table(sens, {"a": "attention", "l1": "linear", "l2": "linear"}, {"l1": 0.3, "l2": 0.9}.get)
    assert table["a"] == {"msa": 0.0, "hamming": 0.2}
    assert table["l1"] == {"mult": 0.0, "shift": 0.5, "moe": pytest.approx(0.15)}
    assert table["l2"] == {"mult": 0.0, "shift": 0.0, "moe": 0.0}  # a loss decrease never rewards


# ---------------------------------------------------------------------------------------------------
# pareto arithmetic


def test_nondominated_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 6, size=(300, 3)).astype(float)  # many ties and duplicates
    mask = pareto.nondominated(pts)
    for i, p in enumerate(pts):
        dominated = any(np.all(q <= p) and np.any(q < p) for q in pts)
        assert mask[i] == (not dominated)
    dom = pareto.dominated_by(pts[0], pts)
    assert set(dom) == {j for j, q in enumerate(pts) if np.all(q <= pts[0]) and np.any(q < pts[0])}


def test_spread_starts_fastest_and_spreads():
    pts = np.array(
        [[0.0, 10.0, 0], [1.0, 9.0, 0], [5.0, 5.0, 0], [9.0, 1.0, 0], [10.0, 0.0, 0], [9.5, 0.5, 0]]
    )
    got = pareto.spread(pts, 3)
    assert got[0] == 0 and got[1] == 4 and got[2] == 2  # far end, then the middle
    assert len(set(pareto.spread(pts, 10))) == len(pts)


# ---------------------------------------------------------------------------------------------------
# bulk trial storage


def _trials(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    dists = {
        "a": CategoricalDistribution(("x", "y", "z")),
        "b": FloatDistribution(0.0, 1.0),
        "c": IntDistribution(1, 9),
    }
    out = []
    for i in range(n):
        values = [float(rng.normal()), float("inf") if i == 3 else float(rng.normal())]
        t = create_trial(
            params={"a": ("x", "y", "z")[i % 3], "b": float(rng.uniform()), "c": int(rng.integers(1, 10))},
            distributions=dists,
            values=values,
            user_attrs={"seq": i, "nested": {"k": [i, "s"]}},
            system_attrs={"NSGAIISampler:generation": i // 4},
        )
        out.append(t)
    return out


def _same(a, b) -> None:
    assert (a.params, a.distributions, a.values, a.user_attrs, a.system_attrs, a.state) == (
        b.params,
        b.distributions,
        b.values,
        b.user_attrs,
        b.system_attrs,
        b.state,
    )
    assert abs((a.datetime_start - b.datetime_start).total_seconds()) < 1e-3


def test_bulk_write_reads_back_through_optuna_and_vice_versa(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url)
    optuna.create_study(storage=storage, study_name="bulk", directions=["minimize", "minimize"])
    store = TrialStore(storage, "bulk")
    src = _trials(10)
    written = store.write(src[:6])
    written += store.write(src[6:])
    assert [t.number for t in written] == list(range(10))
    got = optuna.load_study(study_name="bulk", storage=url).trials  # Optuna's own reader
    assert [t.number for t in got] == list(range(10))
    for a, b in zip(src, got):
        _same(a, b)
    # The other direction: trials written by Optuna, read by the bulk reader (incrementally).
    ref = optuna.create_study(storage=storage, study_name="ref", directions=["minimize", "minimize"])
    ref.add_trials(src[:4])
    reader = TrialStore(storage, "ref")
    first = reader.read_new()
    ref.add_trials(src[4:7])
    second = reader.read_new()
    assert [t.number for t in first] == [0, 1, 2, 3] and [t.number for t in second] == [4, 5, 6]
    assert reader.read_new() == []
    for a, b in zip(src, first + second):
        _same(a, b)
    # A writer never reads its own trials back, and a baseline is stored once.
    assert store.read_new() == []
    tagged = [
        create_trial(
            params={"a": "x"},
            distributions={"a": src[0].distributions["a"]},
            values=[1.0, 2.0],
            user_attrs={"baseline": "recipe"},
        )
        for _ in range(2)
    ]
    assert len(store.write(tagged, unique_attr="baseline")) == 1
    assert len(store.write(tagged[:1], unique_attr="baseline")) == 0
    assert store.count() == 11
    assert store.register_worker() == 0 and TrialStore(storage, "bulk").register_worker() == 1


def test_bulk_write_refuses_unfinished_trials(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    optuna.create_study(storage=storage, study_name="s")
    running = create_trial(state=TrialState.RUNNING, params={}, distributions={})
    with pytest.raises(Exception, match="only finished trials"):
        TrialStore(storage, "s").write([running])


# ---------------------------------------------------------------------------------------------------
# stage A


def _synthetic_problem(seed: int = 0):
    space = SearchSpace.build(KINDS, freeze=["blocks.0.attn"], tie=["fc2"])
    costs = synthetic_costs(KINDS, seed=seed)
    rng = np.random.default_rng(seed)
    risk = {
        n: (
            {"msa": 0.0, "hamming": float(rng.uniform(0, 0.3))}
            if k == "attention"
            else {"mult": 0.0, "shift": (d := float(rng.uniform(0, 0.5))), "moe": 0.4 * d}
        )
        for n, k in KINDS.items()
    }
    return space, costs, risk


def _by_hand(space: SearchSpace, costs: CostTableFile, risk, params) -> tuple[float, float, float]:
    choice = dict(space.pinned)
    for p in space.params:
        choice.update(dict.fromkeys(p.layers, params[p.name]))
    lat = costs.fixed.latency_ms + sum(costs.layers[n][c].latency_ms for n, c in choice.items())
    en = costs.fixed.energy_mj + sum(costs.layers[n][c].energy_mj for n, c in choice.items())
    return lat, en, sum(risk[n][c] for n, c in choice.items())


def test_stage_a_stores_distinct_designs_and_ends_when_the_space_is_exhausted(tmp_path):
    space, costs, risk = _synthetic_problem()
    # one choice per layer type: a space of a few dozen designs
    frozen = SearchSpace.build(KINDS, freeze=[], tie=["attn", "attn.qkv", "attn.proj", "fc1", "fc2"])
    size = math.prod(len(p.choices) for p in frozen.params)
    assert frozen.size() == size < 500
    url = f"sqlite:///{tmp_path / 'study.db'}"
    res = run_stage_a(frozen, Objective(frozen, costs, risk), url, "s", trials=500, population=20,
                      persist_every_s=0.05)
    trials = stored_trials(url, "s")
    keys = [frozen.key(t.params) for t in trials]
    assert res.stored == len(trials) == len(set(keys))  # nothing stored twice
    assert res.repeats > 0  # NSGA-II offered known designs: replaced by unseen ones, not stored again
    assert any(t.user_attrs.get("replaces_repeat") for t in trials)
    assert 0.9 * size <= len(trials) <= size  # (almost) the whole space, then it stopped


def test_a_repeated_design_is_replaced_by_its_nearest_unseen_neighbour():
    space = SearchSpace.build(KINDS, freeze=[], tie=["attn", "attn.qkv", "attn.proj", "fc1", "fc2"])
    start = space.params_for("msa", "mult")
    rng = random.Random(0)
    near = _unseen_neighbour(space, start, {space.key(start)}, rng)
    assert sum(near[k] != start[k] for k in start) == 1  # one parameter changed
    every = {space.key(dict(zip(start, combo))) for combo in itertools.product(*(p.choices for p in space.params))}
    assert len(every) == space.size()
    assert _unseen_neighbour(space, start, every, rng) is None  # nothing left to explore


def test_energy_label_names_where_the_energy_comes_from(tmp_path):
    from dse.config import load_config
    from dse.cost.sources import cost_model_for, energy_label
    from tests.conftest import write_profile

    assert energy_label(synthetic_costs(KINDS)) == "cost table"
    cfg = load_config(None, ["model.kwargs={depth: 1}", "data.img_size=16"])
    profile = write_profile(tmp_path / "profiles", cfg=cfg)
    assert energy_label(cost_model_for(cfg, build_dense(cfg), profile)) == "model"


def test_a_study_priced_with_another_profile_is_refused_not_mixed(tmp_path):
    space, costs, risk = _synthetic_problem()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_stage_a(space, Objective(space, costs, risk), url, "s", trials=30, population=10, persist_every_s=0.05)
    other = synthetic_costs(KINDS, seed=1)  # the same layers, re-measured: other latencies
    with pytest.raises(StageError, match="priced otherwise"):
        run_stage_a(space, Objective(space, other, risk), url, "s", trials=60, population=10)
    again = run_stage_a(space, Objective(space, costs, risk), url, "s", trials=60, population=10)
    assert again.stored == 60  # the same pricing continues


def test_stage_a_persists_in_batches_and_a_rerun_continues(tmp_path):
    space, costs, risk = _synthetic_problem()
    objective = Objective(space, costs, risk)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = run_stage_a(space, objective, url, "s", trials=90, population=20, persist_every_s=0.05)
    assert (first.stored, first.evaluated, first.written, first.worker) == (90, 90, 90, 0)
    before = stored_trials(url, "s")
    second = run_stage_a(space, objective, url, "s", trials=200, population=20, persist_every_s=0.05)
    assert (second.stored, second.evaluated, second.worker) == (200, 110, 1)  # baselines not re-run
    trials = stored_trials(url, "s")
    assert [t.number for t in trials] == list(range(200))
    for old, new in zip(before, trials[:90]):
        assert (old.params, old.values) == (new.params, new.values)
    baselines = {t.user_attrs["baseline"]: t for t in trials if "baseline" in t.user_attrs}
    assert sorted(baselines) == ["all-mult", "all-shift", "recipe"] and all(
        t.number < 3 for t in baselines.values()
    )
    assert baselines["recipe"].params == space.params_for("hamming", "moe")
    for w, n in ((0, 87), (1, 110)):
        assert sorted(
            t.user_attrs["seq"]
            for t in trials
            if t.user_attrs.get("worker") == w and "baseline" not in t.user_attrs
        ) == list(range(n))
    for t in trials:
        assert np.allclose(t.values, _by_hand(space, costs, risk, t.params), rtol=1e-12)
    # The NSGA-II generations carried over: the resumed run bred from the stored population.
    gens = [t.system_attrs.get("NSGAIISampler:generation") for t in trials]
    assert max(gens[90:]) > max(gens[:90])


def test_sigterm_during_stage_a_writes_the_pending_batch(tmp_path):
    space, costs, risk = _synthetic_problem()
    objective = Objective(space, costs, risk)
    calls = 0

    def interrupted(params):
        nonlocal calls
        calls += 1
        if calls == 60:
            os.kill(os.getpid(), signal.SIGTERM)  # handled as KeyboardInterrupt in the main thread
        return objective(params)

    url = f"sqlite:///{tmp_path / 'study.db'}"
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):  # no periodic flush: only the interrupt handler writes
        run_stage_a(space, interrupted, url, "s", trials=10_000, population=20, persist_every_s=1e9)
    assert signal.getsignal(signal.SIGTERM) is previous
    stored = stored_trials(url, "s")
    trial_calls = calls - len(space.baselines())  # the study's objective key prices the baselines first
    assert trial_calls - 1 <= len(stored) <= trial_calls and len(stored) >= 56
    assert [t.number for t in stored] == list(range(len(stored)))


def test_stage_a_front_contains_or_dominates_every_baseline(tmp_path):
    space, costs, risk = _synthetic_problem(seed=2)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_stage_a(
        space, Objective(space, costs, risk), url, "s", trials=400, population=40, persist_every_s=1.0
    )
    trials = stored_trials(url, "s")
    front, baselines, values = front_table(space, trials)
    assert len(baselines) == 3
    f = np.array([[r["latency_ms"], r["energy_mj"], r["risk"]] for r in front])
    assert pareto.nondominated(f).all()
    assert not any(pareto.dominated_by(v, f).size for v in f)
    for b in baselines:
        v = np.array([b["latency_ms"], b["energy_mj"], b["risk"]])
        on = any(np.allclose(v, row) for row in f)
        assert on == b["on_front"]
        assert on or pareto.dominated_by(v, f).size > 0
    assert next(b for b in baselines if b["baseline"] == "all-mult")["on_front"]  # zero risk: never dominated


def test_choose_rule():
    measured = [
        {
            "trial": 1,
            "latency_ms": 5.0,
            "energy_mj": 1.0,
            "risk": 0.3,
            "accuracy": 90.0,
            "dense_accuracy": 95.0,
            "feasible": True,
        },
        {
            "trial": 2,
            "latency_ms": 6.0,
            "energy_mj": 1.0,
            "risk": 0.2,
            "accuracy": 94.5,
            "dense_accuracy": 95.0,
            "feasible": True,
        },
        {
            "trial": 3,
            "latency_ms": 7.0,
            "energy_mj": 1.0,
            "risk": 0.1,
            "accuracy": 94.8,
            "dense_accuracy": 95.0,
            "feasible": True,
        },
        {
            "trial": 4,
            "latency_ms": 4.0,
            "energy_mj": 9.0,
            "risk": 0.0,
            "accuracy": 95.0,
            "dense_accuracy": 95.0,
            "feasible": False,
        },
    ]
    best, rule = choose([], [], measured, max_drop=1.0, latency_budget=None, energy_budget=None)
    assert best["trial"] == 2 and "fastest" in rule  # 4 is faster and exact but over budget
    best, rule = choose([], [], measured, max_drop=0.1, latency_budget=None, energy_budget=None)
    assert best["trial"] == 3 and "most accurate" in rule
    best, _ = choose([], [], measured, max_drop=1.0, latency_budget=5.5, energy_budget=None)
    assert best["trial"] == 1  # the budget leaves only trial 1 (4 is infeasible in energy by its constraint)
    front = [
        {"trial": 7, "latency_ms": 3.0, "energy_mj": 1.0, "risk": 0.9},
        {"trial": 8, "latency_ms": 4.0, "energy_mj": 1.0, "risk": 0.4},
    ]
    recipe = {"trial": 0, "baseline": "recipe", "latency_ms": 6.0, "energy_mj": 2.0, "risk": 0.5}
    best, rule = choose(front, [recipe], [], max_drop=1.0, latency_budget=None, energy_budget=None)
    assert best["trial"] == 8 and "recipe" in rule


def _design(trial, latency, accuracy, changed, baseline=""):
    return {"trial": trial, "baseline": baseline, "latency_ms": latency, "energy_mj": 1.0, "risk": 0.1 * changed,
            "accuracy": accuracy, "dense_accuracy": 98.0, "feasible": True, "n_shift": changed, "n_mult": 8 - changed,
            "n_hamming": 0, "n_moe": 0, "n_msa": 2}


def test_choose_never_returns_a_design_the_dense_model_beats():
    dense = _design(0, 3.18, None, 0, "all-mult")
    # every fine-tuned design is slower than the dense model compiled, and less accurate: dense wins
    measured = [_design(5, 3.55, 97.78, 1), _design(6, 3.60, 98.0, 8, "all-shift")]
    best, rule = choose([], [dense], measured, max_drop=1.0, latency_budget=None, energy_budget=None)
    assert best["trial"] == 0 and best["accuracy"] == 98.0 and "dense design" in rule
    # a ShiftAdd design faster than dense within the accuracy budget is chosen
    measured.append(_design(7, 2.90, 97.5, 4))
    best, _ = choose([], [dense], measured, max_drop=1.0, latency_budget=None, energy_budget=None)
    assert best["trial"] == 7
    # ... but not when it costs more accuracy than allowed
    best, _ = choose([], [dense], measured, max_drop=0.25, latency_budget=None, energy_budget=None)
    assert best["trial"] == 0
    # a tie on latency goes to the design that changes fewer layers
    tie = [_design(8, 3.18, 98.0, 3), _design(9, 3.18, 98.0, 1)]
    best, _ = choose([], [dense], tie, max_drop=1.0, latency_budget=None, energy_budget=None)
    assert best["trial"] == 0
    best, _ = choose([], [], tie, max_drop=1.0, latency_budget=None, energy_budget=None)
    assert best["trial"] == 9
    # stage A only: dense (risk 0) is a candidate even when the front list omits it
    front = [_design(3, 3.5, None, 2)]
    recipe = dict(_design(1, 4.0, None, 8, "recipe"), risk=0.9)
    best, _ = choose(front, [recipe, dense], [], max_drop=1.0, latency_budget=None, energy_budget=None)
    assert best["trial"] == 0


# ---------------------------------------------------------------------------------------------------
# the whole search, in process: stage A + stage B + outputs


@pytest.mark.slow
def test_run_search_both_stages_writes_outputs_and_reuses_stage_b(tmp_path, monkeypatch, tiny_checkpoint,
                                                                   search_overrides):
    from dse.checkpoints import load_finetuned
    from dse.config import load_config
    from dse.search.driver import run_search
    from dse.training.train import evaluate
    from models.ops import kernel_ops

    ckpt, costs_json, kinds = tiny_checkpoint(tmp_path)
    raw = json.loads(costs_json.read_text())
    dense_lat = raw["fixed"][0] + sum(v["msa" if "msa" in v else "mult"][0] for v in raw["layers"].values())
    overrides = [
        *search_overrides,
        f"model.checkpoint={ckpt}",
        f"search.profile={costs_json}",
        "search.trials=150",
        "search.stage_b_candidates=1",
        "search.stage_b_epochs=0",
        "search.max_accuracy_drop=100",
        f"search.latency_budget_ms={dense_lat * 0.9}",
        f"out={tmp_path / 'run'}",
    ]
    cfg = load_config(None, overrides)
    summary = run_search(cfg)
    out = tmp_path / "run"
    for name in (
        "study.db",
        "pareto.csv",
        "pareto.png",
        "best_assignment.yaml",
        "resolved_config.yaml",
        "sensitivity.json",
        "search.json",
    ):
        assert (out / name).is_file(), name
    assert summary["stage_a"]["stored"] == 150 and summary["sensitivity"]["reused"] is False
    # stage B: one front candidate plus the recipe and all-shift (unless the front candidate is one of them),
    # each a trial of the second study with its constraint
    study_b = optuna.load_study(study_name="shiftadd-stage-b", storage=summary["storage"])
    n_b = len(study_b.trials)
    assert n_b == len(summary["stage_b"]) and n_b in (2, 3)
    assert {"recipe", "all-shift"} <= {r.get("baseline") for r in summary["stage_b"]}
    for t, row in zip(study_b.trials, summary["stage_b"]):
        assert t.constraints == {"latency_budget": pytest.approx(row["latency_ms"] - dense_lat * 0.9)}
        weights = Path(t.user_attrs["folder"]) / "weights.pt"
        model, _ = load_finetuned(weights)
        from dse.training.data import load_data

        with kernel_ops("off"):  # as fine-tuning evaluates
            acc = evaluate(model, load_data(cfg.data, cfg.seed).val, 256)["acc"]
        assert acc == pytest.approx(-t.values[0]) == pytest.approx(row["accuracy"])
    # the chosen design: fastest feasible within the (wide) accuracy window, written as the assignment
    feasible = [r for r in summary["stage_b"] if r["feasible"]]
    assert feasible, "the window is wide enough for at least one stage-B candidate"
    assert summary["chosen"]["trial"] == min(feasible, key=lambda r: r["latency_ms"])["trial"]
    frame = pd.read_csv(out / "pareto.csv")
    chosen_row = frame[frame["chosen"]].iloc[0]
    assert int(chosen_row["trial"]) == summary["chosen"]["trial"]
    best = Assignment.from_yaml(out / "best_assignment.yaml")
    space_params = [c for c in frame.columns if c.startswith("blocks.")]
    for layer in space_params:
        kind = "attention" if kinds[layer] == "attention" else "linear"
        assert getattr(best, kind)[layer] == chosen_row[layer]
    front = frame[frame["source"] == "front"][["latency_ms", "energy_mj", "risk"]].to_numpy()
    assert pareto.nondominated(front).all()
    # A rerun neither re-trains stage-B candidates nor re-measures the sensitivity.
    import dse.training.finetune

    monkeypatch.setattr(dse.training.finetune, "finetune", lambda *a, **k: pytest.fail("stage B re-trained"))
    again = run_search(cfg)
    assert again["sensitivity"]["reused"] is True and again["stage_a"]["evaluated"] == 0
    assert len(optuna.load_study(study_name="shiftadd-stage-b", storage=summary["storage"]).trials) == n_b


def _open_after(barrier, url: str, results) -> None:
    barrier.wait()
    try:
        open_storage(url)
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_creating_one_fresh_sqlite_study_all_succeed(tmp_path):
    """Several processes opening a fresh SQLite storage at once race to create its schema; every one opens
    it (the loser's "UNIQUE constraint failed" on alembic_version is retried, as PostgreSQL's "already
    exists" is). A CI run once lost a search this way to a reader polling the study it was creating."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_after, args=(barrier, url, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert sorted(results.get(timeout=5) for _ in range(n)) == ["ok"] * n


# ---------------------------------------------------------------------------------------------------
# several devices: one latency objective per profile


def _device_table(src: Path, dst: Path, scale: dict[str, float]) -> Path:
    """A second device's cost table: the same layers, each choice's latency scaled by ``scale[choice]``."""
    raw = json.loads(src.read_text())
    for layer in raw["layers"].values():
        for choice, cost in layer.items():
            cost[0] *= scale.get(choice, 1.0)
    raw.pop("moe_expert_costs", None)
    dst.write_text(json.dumps(raw))
    return dst


def test_search_on_two_devices_minimises_latency_on_each(tmp_path, tiny_checkpoint, search_overrides):
    from dse.config import load_config
    from dse.search.driver import run_search

    ckpt, laptop, kinds = tiny_checkpoint(tmp_path)
    laptop = laptop.rename(tmp_path / "laptop.json")
    # The synthetic table makes shift and Hamming cheaper than mult and MSA; on the second device they cost
    # 3x that, more than mult and MSA: the two latencies disagree, so the front trades one for the other.
    server = _device_table(laptop, tmp_path / "server.json", {"hamming": 3.0, "shift": 3.0, "moe": 2.0})
    cfg = load_config(None, [*search_overrides, f"model.checkpoint={ckpt}", "search.stage=a", "search.trials=150",
                             f"out={tmp_path / 'run'}"])
    cfg.search.profile = [str(laptop), str(server)]
    summary = run_search(cfg)
    assert summary["devices"] == ["laptop", "server"]
    frame = pd.read_csv(tmp_path / "run" / "pareto.csv")
    assert {"latency_ms@laptop", "latency_ms@server", "latency_rel"} <= set(frame.columns)
    tables = {name: json.loads(p.read_text()) for name, p in (("laptop", laptop), ("server", server))}
    params = [c for c in frame.columns if c.startswith("blocks.")]
    for _, row in frame.iterrows():  # each device's latency, summed by hand from its own table
        for name, table in tables.items():
            by_hand = table["fixed"][0] + sum(table["layers"][layer][row[layer]][0] for layer in params)
            assert row[f"latency_ms@{name}"] == pytest.approx(by_hand)
        assert row["latency_ms"] == pytest.approx(row["latency_ms@laptop"])
    front = frame[frame["source"] == "front"]
    objectives = front[["latency_ms@laptop", "latency_ms@server", "energy_mj", "risk"]].to_numpy()
    assert pareto.nondominated(objectives).all()
    assert front["latency_ms@server"].idxmin() != front["latency_ms@laptop"].idxmin()
    # The study records four objectives; the same study cannot be reused with one device.
    study = optuna.load_study(study_name="shiftadd", storage=summary["storage"])
    assert study.metric_names == ["latency_ms@laptop", "latency_ms@server", "energy_mj", "risk"]
    cfg.search.profile = str(laptop)  # one device: the labels name it, the objectives are the plain three
    with pytest.raises(StageError, match="objectives"):
        run_search(cfg)


def test_cli_search_with_two_devices_profiles_writes_a_column_per_device(tmp_path, capsys, tiny_checkpoint,
                                                                          search_overrides):
    from dse.cli import main
    from dse.config import load_config
    from tests.conftest import GPU_DEVICE, GPU_TARGET, write_profile

    ckpt, _, _ = tiny_checkpoint(tmp_path)
    cfg = load_config(None, search_overrides)
    here = write_profile(tmp_path / "profiles", cfg=cfg)
    # A GPU profile measured elsewhere: a hundred times the throughput, a larger per-call overhead.
    gpu = write_profile(tmp_path / "profiles", cfg=cfg, device=GPU_DEVICE, target=GPU_TARGET,
                        seconds_per_mac=2e-11, overhead_ms=0.01)
    out = tmp_path / "run"
    code = main(["search", "--stage", "a", "--checkpoint", str(ckpt), "--profile", str(here), "--profile", str(gpu),
                 "--trials", "60", "--out", str(out), *[a for o in search_overrides for a in ("--set", o)]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    this_device = here.parent.name
    assert f"predicted for: {this_device}, {GPU_DEVICE['slug']}" in captured.out
    frame = pd.read_csv(out / "pareto.csv")
    assert {f"latency_ms@{this_device}", f"latency_ms@{GPU_DEVICE['slug']}"} <= set(frame.columns)
    assert (frame[f"latency_ms@{GPU_DEVICE['slug']}"] < frame[f"latency_ms@{this_device}"]).all()
    # energy is the first profile's, labelled with its rows' source (write_profile: analytical "model")
    assert set(frame["energy_source"]) == {"model"} and "energy (mJ) source: model" in captured.out


@pytest.mark.parametrize("url", ["postgresql://u:s3cretPW@127.0.0.1:5432/db", "mysql+pymysql://root:p%40ss@db/x",
                                 "sqlite:///study.db", "postgresql://u@host/db"])
def test_hide_password_agrees_with_sqlalchemy(url):
    from sqlalchemy.engine import make_url

    from dse.config import hide_password

    assert hide_password(url) == make_url(url).render_as_string(hide_password=True)
    assert hide_password(f"error: cannot open {url}: refused") == (
        f"error: cannot open {make_url(url).render_as_string(hide_password=True)}: refused")


@pytest.mark.parametrize("via", ["flag", "env"])
def test_a_storage_password_is_never_printed_or_written(tmp_path, capsys, monkeypatch, via, tiny_checkpoint,
                                                         search_overrides):
    from dse.cli import main

    ckpt, costs, _ = tiny_checkpoint(tmp_path)
    url = "postgresql://u:s3cretPW@127.0.0.1:1/db"  # nothing listens on port 1: the search fails to connect
    storage = ["--storage", url] if via == "flag" else []
    if via == "env":
        monkeypatch.setenv("DSE_STORAGE", url)
    out = tmp_path / "run"
    code = main(["search", "--stage", "a", "--checkpoint", str(ckpt), "--profile", str(costs), *storage,
                 "--trials", "20", "--out", str(out), *[a for o in search_overrides for a in ("--set", o)]])
    captured = capsys.readouterr()
    assert code == 1 and "cannot open Optuna storage" in captured.err and "u:***@127.0.0.1" in captured.err
    assert "s3cretPW" not in captured.out + captured.err
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "resolved_config.yaml" for p in written)
    for path in written:
        assert b"s3cretPW" not in path.read_bytes(), path
