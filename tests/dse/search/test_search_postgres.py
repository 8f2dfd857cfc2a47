"""Two ``dse search`` workers share one study on a real PostgreSQL server (a private cluster on loopback).

Debian's PostgreSQL refuses to run as root, so the cluster runs as the ``postgres`` user (``runuser``).
The test checks that every trial of both workers is recorded exactly once: trial numbers 0..N-1 without
gaps or repeats, each worker's own sequence numbers complete, each baseline stored once, and every stored
trial's objectives equal to a re-computation from its parameters.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest


def _pg_bin() -> Path | None:
    for candidate in [
        os.path.dirname(shutil.which("initdb") or ""),
        *sorted(glob.glob("/usr/lib/postgresql/*/bin")),
    ]:
        if candidate and all(
            os.access(Path(candidate) / b, os.X_OK) for b in ("initdb", "pg_ctl", "createdb")
        ):
            return Path(candidate)
    return None


def _ensure_pg_bin() -> Path:
    found = _pg_bin()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "postgresql"], capture_output=True, timeout=600)
        found = _pg_bin()
    if found is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl, createdb) are missing and `apt-get install -y "
            "postgresql` did not provide them"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    pytest.importorskip("psycopg2", reason="psycopg2-binary is needed for the postgresql:// storage")
    bindir = _ensure_pg_bin()
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses root: run it as the postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="dse-pg-", dir="/tmp"))
    data = folder / "data"
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    port = _free_port()

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*as_postgres, *args], capture_output=True, text=True, timeout=120, check=check)

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        pg(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(folder / "server.log"),
            "-w",
            "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1",
            "start",
        )
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "dse")
    except subprocess.CalledProcessError as exc:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/dse"  # the driver is resolved by dse.search.trial_store
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_study_without_losing_or_duplicating_trials(
    tmp_path, postgres_url, tiny_checkpoint, search_overrides, search_cli_settings, spawn_dse, kill_process,
    expected_objectives,
):
    from dse.config import load_config
    from dse.search.driver import measure_risk, stored_trials
    from dse.search.space import SearchSpace

    ckpt, costs_json, kinds = tiny_checkpoint(tmp_path)
    outs = [tmp_path / "w0", tmp_path / "w1"]
    # Measure the sensitivity once and give both workers the cache, so they reach stage A together.
    from dse.checkpoints import load_dense
    from dse.training.data import load_data

    cfg = load_config(None, [*search_overrides, f"model.checkpoint={ckpt}"])
    outs[0].mkdir()
    dense, _ = load_dense(cfg, ckpt)
    measure_risk(cfg, outs[0], dense, kinds, ckpt, load_data(cfg.data, cfg.seed))
    outs[1].mkdir()
    (outs[1] / "sensitivity.json").write_text((outs[0] / "sensitivity.json").read_text())

    # large enough that neither worker can finish the study before the other has started (a quiet machine
    # runs ~600 stage-A trials/s: a target of 600 once let one worker write them all)
    target = 6000
    procs = [
        spawn_dse(
            "search",
            "--checkpoint",
            str(ckpt),
            "--profile",
            str(costs_json),
            "--stage",
            "a",
            "--trials",
            str(target),
            "--storage",
            postgres_url,
            "--study",
            "shared",
            "--out",
            str(out),
            "--json",
            "--set",
            "search.persist_every_s=0.2",
            *search_cli_settings,
            log=tmp_path / f"w{i}.log",
        )
        for i, out in enumerate(outs)
    ]
    try:
        deadline = time.monotonic() + 500
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            kill_process(p)
    errors = [(tmp_path / f"w{i}.log.err").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-1500:] for x in errors)
    summaries = [json.loads((tmp_path / f"w{i}.log").read_text()) for i in range(2)]
    workers = sorted(s["stage_a"]["worker"] for s in summaries)
    assert workers == [0, 1]
    assert all(s["sensitivity"]["reused"] for s in summaries)

    trials = stored_trials(postgres_url, "shared")
    n = len(trials)
    # Every worker stops once the study holds the target; the overshoot is at most the other's last batch.
    assert n >= target
    assert sorted(t.number for t in trials) == list(range(n))  # no lost or repeated trial numbers
    assert sum(s["stage_a"]["written"] for s in summaries) == n  # every written trial is there, once
    for s in summaries:
        w = s["stage_a"]["worker"]
        mine = [t for t in trials if t.user_attrs.get("worker") == w]
        assert len(mine) == s["stage_a"]["written"]
        seqs = sorted(t.user_attrs["seq"] for t in mine if "baseline" not in t.user_attrs)
        assert seqs == list(range(len(seqs)))  # this worker's trials, none missing, none twice
        assert len(mine) > 50  # both workers really contributed
    baselines = sorted(t.user_attrs["baseline"] for t in trials if "baseline" in t.user_attrs)
    assert baselines == ["all-mult", "all-shift", "recipe"]  # stored once although both workers ran them
    # Params and objectives were stored intact: recompute every trial's objectives from its params.
    space = SearchSpace.build(kinds)
    layers = {p.name: list(p.layers) for p in space.params}
    for t in trials:
        assert set(t.params) == set(layers)
        want = expected_objectives(
            layers, t.params, costs_json, outs[0] / "sensitivity.json", kinds, space.pinned
        )
        assert np.allclose(t.values, want, rtol=1e-9)
    # The workers did run side by side (their trial ranges interleave in the shared numbering).
    first = {
        w: min(t.number for t in trials if t.user_attrs.get("worker") == w and "baseline" not in t.user_attrs)
        for w in (0, 1)
    }
    last = {w: max(t.number for t in trials if t.user_attrs.get("worker") == w) for w in (0, 1)}
    assert first[0] < last[1] and first[1] < last[0]
