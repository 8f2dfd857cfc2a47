"""Profile store: round trip, merge-by-key, header checks, corrupt files, concurrent writers."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from dse.errors import ProfileError
from dse.profiling.store import COLUMNS, KEY, ProfileStore, load_profile, meta_path, profile_path, row_key

DEVICE = {"kind": "cpu", "name": "Test CPU 9000", "slug": "test-cpu-9000", "cores": 2}
TARGET = {"kind": "llvm", "mcpu": "testcpu", "num-cores": 2}
VERSIONS = {"tvm": "0.27.0.post1", "torch": "2.14.1", "python": "3.11.7"}


def make_store(root: Path, device=DEVICE, versions=VERSIONS) -> ProfileStore:
    return ProfileStore(root, device, TARGET, "llvm-testcpu-2c", versions, {"repeat": 3})


def make_row(primitive="matmul", backend="tvm", b=1, m=8, k=4, n=2, latency=1.25, **extra) -> dict:
    row = {"primitive": primitive, "backend": backend, "batch": b, "m": m, "k": k, "n": n, "dtype": "float32",
           "latency_ms": latency, "latency_ms_p90": latency * 1.1, "repeats": 3, "min_repeat_ms": 5.0,
           "energy_mj": 0.001 * m, "energy_source": "model", "idle_power_w": None, "target": "llvm-testcpu-2c",
           "schedule": "default" if backend == "tvm" else "eager", "tuned_trials": 0, "load_1m": 0.5,
           "measured_at": "2026-01-01T00:00:00+00:00"}
    row.update(extra)
    return row


def test_round_trip(tmp_path):
    store = make_store(tmp_path)
    assert store.path == profile_path(tmp_path, "test-cpu-9000", "llvm-testcpu-2c")
    store.open(model="tiny (batch 2)")
    rows = [make_row(m=m, latency=0.1 * m) for m in (8, 16)] + [make_row("bmm", "torch", b=3, idle_power_w=4.5)]
    for row in rows:
        assert store.add(row)
    prof = load_profile(store.path)
    assert len(prof) == 3
    assert list(prof.frame.columns)[: len(COLUMNS)] == list(COLUMNS)
    for row in rows:
        got = prof.lookup(row["primitive"], row["batch"], row["m"], row["k"], row["n"], backend=row["backend"])
        for col, value in row.items():
            if value is None:
                assert math.isnan(got[col])
            else:
                assert got[col] == value, col
    assert prof.device_slug == "test-cpu-9000" and prof.target == TARGET
    assert prof.meta["models"] == ["tiny (batch 2)"] and prof.meta["versions"]["tvm"] == "0.27.0.post1"
    assert prof.frame["m"].dtype.kind == "i" and prof.frame["latency_ms"].dtype.kind == "f"


def test_merge_by_key(tmp_path):
    store = make_store(tmp_path)
    store.open()
    assert store.add(make_row(latency=1.0))
    assert not store.add(make_row(latency=2.0))  # present: kept
    assert load_profile(store.path).frame.latency_ms.tolist() == [1.0]
    assert store.add(make_row(latency=3.0), replace=True)
    assert load_profile(store.path).frame.latency_ms.tolist() == [3.0]
    assert store.keys() == {row_key(make_row())}


def test_passes_merge_to_the_median_of_pass_medians(tmp_path):
    import numpy as np

    from dse.profiling.store import merge_passes, passes_of

    store = make_store(tmp_path)
    store.open()
    lat, p90, energy, loads = [1.0, 3.0, 1.6, 2.2], [1.2, 3.5, 1.7, 2.4], [0.2, 0.4, 0.3, 0.5], [0.5, 1.5, 0.7, 0.2]
    assert store.add(make_row(latency=lat[0], latency_ms_p90=p90[0], energy_mj=energy[0], load_1m=loads[0]))
    for i in range(1, 4):
        assert store.add(make_row(latency=lat[i], latency_ms_p90=p90[i], energy_mj=energy[i], load_1m=loads[i],
                                  measured_at=f"2026-01-0{i + 1}T00:00:00+00:00"), merge=True)
        (row,) = load_profile(store.path).frame.to_dict("records")  # through the CSV and back
        assert passes_of(row) == i + 1 and row["pass_latencies_ms"] == tuple(lat[: i + 1])
        assert row["latency_ms"] == pytest.approx(np.median(lat[: i + 1]))
        assert row["latency_ms_p90"] == max(p90[: i + 1]) and row["repeats"] == 3 * (i + 1)
        assert row["energy_mj"] == pytest.approx(np.mean(energy[: i + 1]))
        assert row["load_1m"] == max(loads[: i + 1]) and row["measured_at"].startswith(f"2026-01-0{i + 1}")
    # two multi-pass rows: weighted by their passes
    both = merge_passes(make_row(latency=1.0, energy_mj=1.0, passes=3, pass_latencies_ms=(1.0, 0.9, 5.0)),
                        make_row(latency=2.0, energy_mj=3.0, passes=1))
    assert both["latency_ms"] == pytest.approx(np.median([1.0, 0.9, 5.0, 2.0])) and both["passes"] == 4
    assert both["energy_mj"] == pytest.approx((3 * 1.0 + 3.0) / 4)
    with pytest.raises(ValueError, match="different rows"):
        merge_passes(make_row(m=8), make_row(m=16))
    assert passes_of(make_row()) == 1


def test_passes_with_different_energy_sources_are_not_averaged_under_one_label(tmp_path):
    from dse.profiling.store import merge_passes, passes_of

    store = make_store(tmp_path)
    store.open()
    assert store.add(make_row(energy_mj=0.5, energy_source="rapl"))
    with pytest.raises(ProfileError, match="energy from model and rapl.*one energy source"):
        store.add(make_row(energy_mj=0.1, energy_source="model"), merge=True)
    (row,) = load_profile(store.path).frame.to_dict("records")
    assert (row["energy_mj"], row["energy_source"], passes_of(row)) == (0.5, "rapl", 1)  # left as it was
    same = merge_passes(make_row(energy_mj=0.5, energy_source="rapl"), make_row(energy_mj=0.7, energy_source="rapl"))
    assert (same["energy_mj"], same["energy_source"]) == (pytest.approx(0.6), "rapl")


def test_unknown_energy_round_trips_as_empty_and_a_figure_needs_its_source(tmp_path):
    store = make_store(tmp_path)
    store.open()
    assert store.add(make_row("framework", "torch", m=96, k=1, n=1, energy_mj=math.nan, energy_source=""))
    line = store.path.read_text().splitlines()[1].split(",")
    header = store.path.read_text().splitlines()[0].split(",")
    assert line[header.index("energy_mj")] == "" and line[header.index("energy_source")] == ""
    (row,) = load_profile(store.path).frame.to_dict("records")
    assert math.isnan(row["energy_mj"]) and row["energy_source"] == ""
    assert load_profile(store.path).energy_sources == []
    # an old profile's fabricated zero for interpreter time reads as unknown
    text = store.path.read_text().replace(",,,", ",0.0,model,", 1)
    store.path.write_text(text)
    (row,) = load_profile(store.path).frame.to_dict("records")
    assert math.isnan(row["energy_mj"]) and row["energy_source"] == ""
    # a kernel row with a figure but no source (or a source without a figure) is refused
    lines = text.splitlines()
    lines[1] = lines[1].replace("framework", "matmul", 1).replace(",0.0,model,", ",0.5,,", 1)
    store.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProfileError, match="energy_mj is given but energy_source is empty"):
        load_profile(store.path)


@pytest.mark.parametrize("field, other, phrase", [
    ("device", {**DEVICE, "name": "Other CPU"}, "device"),
    ("versions", {**VERSIONS, "tvm": "0.26.0"}, "TVM version"),
])
def test_refuses_foreign_profile_unless_forced(tmp_path, field, other, phrase):
    first = make_store(tmp_path)
    first.open()
    first.add(make_row())
    kwargs = {field: other}
    second = make_store(tmp_path, **kwargs)
    second.path = first.path  # same file (e.g. copied between machines), other device or version
    second.meta_path = first.meta_path
    with pytest.raises(ProfileError) as err:
        second.open()
    msg = str(err.value)
    assert phrase in msg and "--force" in msg and "\n" not in msg and str(first.path) in msg
    assert len(load_profile(first.path)) == 1  # untouched
    second.open(force=True)
    assert len(load_profile(first.path)) == 0  # discarded, new header
    meta = yaml.safe_load(first.meta_path.read_text())
    assert meta[field] == other


def _write(store: ProfileStore, text: str) -> None:
    store.path.write_text(text)


def _valid_text(tmp_path) -> tuple[ProfileStore, str]:
    store = make_store(tmp_path)
    store.open()
    store.add(make_row(m=8))
    store.add(make_row(m=16))
    return store, store.path.read_text()


@pytest.mark.parametrize("corrupt, phrase", [
    (lambda t: t.replace("latency_ms_p90,", "", 1), "lacks column(s) latency_ms_p90"),
    (lambda t: t.replace(",1.25,", ",nan,", 1), "latency_ms"),
    (lambda t: t.replace(",1.25,", ",-1.25,", 1), "must be positive"),
    (lambda t: t.replace(",8,4,", ",eight,4,", 1), "not an integer"),
    (lambda t: t[: len(t) - 30], "truncated"),
    (lambda t: t + t.splitlines()[1] + "\n", "same measurement"),
    (lambda t: t.replace(",model,", ",guess,", 1), "energy_source"),
    (lambda t: t + "matmul,tvm,1\n", "fields"),
])
def test_corrupt_files_are_rejected_with_one_line(tmp_path, corrupt, phrase):
    store, text = _valid_text(tmp_path)
    _write(store, corrupt(text))
    with pytest.raises(ProfileError) as err:
        load_profile(store.path)
    msg = str(err.value)
    assert phrase in msg and str(store.path) in msg and "\n" not in msg
    with pytest.raises(ProfileError):
        store.open()  # the store refuses to extend it
    store.open(force=True)  # --force starts afresh
    assert len(load_profile(store.path)) == 0


def test_missing_metadata_and_missing_file(tmp_path):
    store, _ = _valid_text(tmp_path)
    meta_path(store.path).unlink()
    with pytest.raises(ProfileError, match="no metadata"):
        load_profile(store.path)
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.csv")


def _writer(root: str, start: int, count: int) -> None:
    store = make_store(Path(root))
    store.open()
    for m in range(start, start + count):
        store.add(make_row(m=m))


def test_sigkill_mid_write_leaves_a_valid_profile(tmp_path):
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_writer, args=(str(tmp_path), 1, 10_000))
    proc.start()
    path = make_store(tmp_path).path
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") > 20:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # lands at a random point of a read-merge-write
    proc.join(10)
    prof = load_profile(path)  # complete and valid: the last committed version
    assert len(prof) >= 20
    assert sorted(prof.frame.m.tolist()) == list(range(1, len(prof) + 1))


def test_concurrent_writers_keep_every_row_once(tmp_path):
    ctx = mp.get_context("fork")
    # overlapping ranges: rows 20..39 are written by both processes
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, 40)) for s in (1, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    prof = load_profile(make_store(tmp_path).path)
    assert sorted(prof.frame.m.tolist()) == list(range(1, 60))
    assert not prof.frame.duplicated(list(KEY)).any()
