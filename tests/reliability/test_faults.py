"""Fault injection: `dse profile`, `dse search` and `dse finetune` are SIGKILLed at a random point of their
work, then rerun. Whatever was completed before the kill must still be there unchanged, the rerun must not
redo it, and the final result must be complete. Two `dse profile` processes on one device file at once
must leave every row exactly once.

The kill point is drawn from a seeded RNG; the seed is in every failure message and
``SHIFTADD_FAULT_SEED`` replays it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import models
from dse.profiling.inventory import build_inventory
from dse.profiling.profiler import plan
from dse.profiling.store import KEY, load_profile, row_key
from dse.search.driver import stored_trials
from dse.search.space import SearchSpace

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("SHIFTADD_FAULT_SEED") or time.time_ns() % 1_000_000)
ENV = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def rng(request) -> random.Random:
    return random.Random(f"{SEED}-{request.node.name}")


def dse(*args: str) -> list[str]:
    return [sys.executable, "-m", "dse", *args]


@pytest.fixture
def wait_until(kill_process):
    """``wait_until(proc, ready, what)``: poll ``ready()``; fail (killing ``proc`` on a timeout) if ``proc``
    ends first or ``timeout`` passes."""

    def wait(proc: subprocess.Popen, ready, what: str, timeout: float = 300, poll: float = 0.02) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"seed {SEED}: the process ended (rc {proc.returncode}) before {what}")
            if time.monotonic() > deadline:
                kill_process(proc)
                pytest.fail(f"seed {SEED}: timed out waiting for {what}")
            time.sleep(poll)

    return wait


# ---- profile -----------------------------------------------------------------------------------------


@pytest.fixture
def profile_args(tiny_profile_set) -> list[str]:
    return [*tiny_profile_set, "--set", "profile.nonprim=false", "--set", "profile.torch_threads=1"]


def _rows(out: Path) -> dict[tuple, dict]:
    csvs = list(out.glob("*/*.csv"))
    if not csvs:
        return {}
    return {row_key(r): r for r in load_profile(csvs[0]).frame.to_dict("records")}


def test_sigkill_profile_keeps_measured_rows_and_rerun_completes(tmp_path, rng, tiny_profile_model, profile_args,
                                                                wait_until, kill_process):
    out = tmp_path / "profiles"
    specs = plan(build_inventory(models.create("vit_digits", **tiny_profile_model), batch=2, name="tiny"),
                 include_nonprim=False)
    kill_after = rng.randint(1, len(specs) - 1)  # rows on disk when the kill lands
    # every row times for >= 2 x 100 ms, so the kill (< 70 ms after the row count is seen) lands before the
    # last row is written even on a quiet machine, where tiny rows at 1 ms each finished before the kill
    args = ["profile", "--out", str(out), *profile_args, "--set", "profile.min_repeat_ms=100"]
    proc = subprocess.Popen(dse(*args), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until(proc, lambda: len(_rows(out)) >= kill_after, f"{kill_after} rows were written")
    time.sleep(rng.uniform(0.0, 0.05))  # land anywhere in the next measurement or write
    kill_process(proc)
    assert proc.returncode == -signal.SIGKILL, f"seed {SEED}: {proc.stderr.read()[-2000:]}"
    before = _rows(out)  # the file is valid: load_profile checks every column and row
    assert kill_after <= len(before) < len(specs), f"seed {SEED}: the profile finished before the kill"

    res = subprocess.run(dse(*args, "--json"), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["present"] == len(before) and summary["measured"] == len(specs) - len(before), (SEED, summary)
    after = _rows(out)
    assert set(after) == {s.key for s in specs}
    for key, row in before.items():  # kept as measured, not re-measured
        assert after[key]["latency_ms"] == row["latency_ms"] and after[key]["measured_at"] == row["measured_at"]
    (csv,) = out.glob("*/*.csv")
    assert not load_profile(csv).frame.duplicated(list(KEY)).any()
    assert not [p for p in csv.parent.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


def test_two_concurrent_profiles_write_every_row_once(tmp_path, profile_args, tiny_profile_model):
    out = tmp_path / "profiles"
    cmd = dse("profile", "--out", str(out), *profile_args, "--json")
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    specs = plan(build_inventory(models.create("vit_digits", **tiny_profile_model), batch=2, name="tiny"),
                 include_nonprim=False)
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-2000:]
        summary = json.loads(stdout)
        assert summary["measured"] + summary["present"] + summary["measured_by_other"] == len(specs)
    (csv,) = out.glob("*/*.csv")
    frame = load_profile(csv).frame
    assert not frame.duplicated(list(KEY)).any()
    assert {row_key(r) for r in frame.to_dict("records")} == {s.key for s in specs}


# ---- search ------------------------------------------------------------------------------------------


def test_sigkill_search_keeps_stored_trials_and_rerun_continues(tmp_path, rng, tiny_checkpoint, search_cli_settings,
                                                                spawn_dse, run_cli, wait_until, kill_process,
                                                                expected_objectives):
    ckpt, costs_json, kinds = tiny_checkpoint(tmp_path)
    out = tmp_path / "run"
    args = ["search", "--checkpoint", str(ckpt), "--profile", str(costs_json), "--stage", "a", "--trials", "5000",
            "--out", str(out), "--set", "search.persist_every_s=0.2", *search_cli_settings]
    url = f"sqlite:///{out / 'study.db'}"
    threshold = rng.randint(20, 400)

    def stored() -> int:
        if not (out / "study.db").exists():
            return 0
        try:
            return len(stored_trials(url, "shiftadd"))
        except Exception:  # noqa: BLE001 - the study is created by the first batch
            return 0

    proc = spawn_dse(*args, log=tmp_path / "first.log")
    try:
        wait_until(proc, lambda: stored() >= threshold, f"{threshold} trials were stored", poll=0.3)
    finally:
        kill_process(proc)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log.err").read_text()[-2000:]
    before = stored_trials(url, "shiftadd")
    assert threshold <= len(before) < 5000, SEED

    target = len(before) + 50  # a smaller target keeps the test short: the rerun continues, not restarts
    args[args.index("--trials") + 1] = str(target)
    res = run_cli(*args, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["stage_a"]["stored"] == target and summary["stage_a"]["evaluated"] == 50
    assert summary["sensitivity"]["reused"] is True
    after = stored_trials(url, "shiftadd")
    assert [t.number for t in after] == list(range(target))
    for old, new in zip(before, after):  # completed trials are unchanged
        assert (old.params, old.values, old.user_attrs) == (new.params, new.values, new.user_attrs), SEED
    assert all(t.user_attrs["worker"] == 1 for t in after[len(before):])
    assert sum("baseline" in t.user_attrs for t in after) == 3  # enqueued once, not again by the rerun
    space = SearchSpace.build(kinds)
    layers = {p.name: list(p.layers) for p in space.params}
    for t in after[:: max(1, len(after) // 40)]:  # the objectives, re-derived by hand from the files
        want = expected_objectives(layers, t.params, costs_json, out / "sensitivity.json", kinds, space.pinned)
        assert np.allclose(t.values, want, rtol=1e-9)
    assert (out / "best_assignment.yaml").is_file() and (out / "pareto.png").stat().st_size > 1000


# ---- finetune ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, tiny_cfg) -> Path:
    from dse.checkpoints import architecture, build_dense

    cfg = tiny_cfg()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dense") / "weights.pt"
    torch.save({"model": build_dense(cfg).state_dict(), "meta": {"architecture": architecture(cfg),
                                                                  "stage": "pretrain"}}, path)
    return path


def test_sigkill_finetune_keeps_finished_epochs_and_resume_completes(tmp_path, rng, dense_ckpt, costs_for,
                                                                    write_cost_table, finetune_cli_args,
                                                                    wait_until, kill_process):
    epochs = 4
    costs_json = write_cost_table(tmp_path / "costs.json", costs_for(models.create("vit_digits", **{
        "img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})))
    out = tmp_path / "ft"
    argv = finetune_cli_args(out, dense_ckpt, costs_json, f"finetune.epochs={epochs}")
    # epochs finished on disk when the kill lands; two or more are left, so that the kill (< 0.2 s later) lands
    # before the end on a quiet machine too, where a tiny epoch takes ~0.3 s
    done_before_kill = rng.randint(0, epochs - 2)

    def finished() -> int:
        try:
            return len(pd.read_csv(out / "metrics.csv"))
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return 0

    proc = subprocess.Popen(dse(*argv), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    started = (lambda: finished() >= done_before_kill) if done_before_kill else (lambda: out.exists())
    wait_until(proc, started, f"{done_before_kill} epochs were saved")
    time.sleep(rng.uniform(0.0, 0.15))
    kill_process(proc)
    assert proc.returncode == -signal.SIGKILL, f"seed {SEED}: {proc.stderr.read()[-2000:]}"
    assert not (out / "weights.pt").exists(), f"seed {SEED}: the run finished before the kill"
    kept = pd.read_csv(out / "metrics.csv") if finished() else None
    assert (0 if kept is None else len(kept)) >= done_before_kill  # every epoch saved before the kill is kept

    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    res = subprocess.run(dse(*argv, *resume), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    final = pd.read_csv(out / "metrics.csv")
    assert final["epoch"].tolist() == list(range(1, epochs + 1)), SEED
    if kept is not None:  # epochs finished before the kill were not re-run
        cols = [c for c in kept.columns if c != "epoch_s"]
        pd.testing.assert_frame_equal(final[cols].iloc[: len(kept)], kept[cols], check_exact=True)
    saved = torch.load(out / "weights.pt", weights_only=True)
    assert saved["meta"]["val_acc"] == pytest.approx(final["val_acc"].iloc[-1])
