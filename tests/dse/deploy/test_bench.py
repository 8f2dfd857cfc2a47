"""dse bench: the artifact against the dense PyTorch model, side by side on the same inputs."""

from __future__ import annotations

import json
import time

import pytest


def test_interleaved_timing_ranks_contestants():
    from dse.deploy.bench import interleaved

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.001)

    def slow():
        calls["slow"] += 1
        time.sleep(0.004)

    stats = interleaved({"fast": fast, "slow": slow}, repeat=9, warmup=2, rounds=3)
    assert calls == {"fast": 11, "slow": 11}  # warm-up + 3 rounds of 3
    assert stats["fast"].repeats == stats["slow"].repeats == 9
    assert 1.0 <= stats["fast"].median_ms < stats["slow"].median_ms
    assert 4.0 <= stats["slow"].median_ms <= stats["slow"].p90_ms


def test_bench_cli_reports_all_contestants(artifact, dse_cli):
    res = dse_cli("bench", "--artifact", str(artifact), "--no-compile", "--set", "bench.repeat=6",
                  "--set", "bench.warmup=1", "--json", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    rows = {r["model"].split(" (")[0] + " (" + r["model"].split(" (")[1].split(",")[0]: r for r in out["rows"]}
    assert set(rows) == {"ShiftAddViT (TVM", "dense (PyTorch eager)"}
    tvm_row, eager = rows["ShiftAddViT (TVM"], rows["dense (PyTorch eager)"]
    for row in (tvm_row, eager):
        assert 0 < row["median_ms"] <= row["p90_ms"]
        assert row["energy_source"]
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    assert tvm_row["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / tvm_row["median_ms"])
    assert out["batch"] == 8 and out["inputs"].startswith("validation images")
    assert out["torch_compile_s"] is None
    if tvm_row["predicted_ms"] is not None:
        expected = 100.0 * (tvm_row["predicted_ms"] - tvm_row["median_ms"]) / tvm_row["median_ms"]
        assert tvm_row["prediction_error_pct"] == pytest.approx(expected)

    from dse.commands.bench import render

    text = render(out)
    assert "ShiftAddViT (TVM" in text and "dense (PyTorch eager)" in text and "x eager" in text
    assert f"{tvm_row['median_ms']:.3f}" in text


def test_bench_without_dense_checkpoint_is_one_line_error(artifact, tmp_path, dse_cli):
    res = dse_cli("bench", "--artifact", str(artifact), "--no-compile", "--dense", str(tmp_path / "nope.pt"),
                  timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "dense checkpoint" in lines[0]


def test_bench_refuses_another_devices_profile(artifact, tmp_path, dse_cli):
    from tests.conftest import GPU_DEVICE, write_profile

    foreign = write_profile(tmp_path / "profiles", device=GPU_DEVICE)  # this CPU's target, another device
    res = dse_cli("bench", "--artifact", str(artifact), "--no-compile", "--profile", str(foreign), timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and GPU_DEVICE["slug"] in lines[0]
