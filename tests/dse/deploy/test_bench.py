"""dse bench: the artifact against the dense model (compiled by TVM, and in PyTorch), side by side on the same
inputs."""

from __future__ import annotations

import json
import statistics
import time
import types

import pytest
import yaml


def test_interleaved_timing_ranks_contestants():
    from dse.deploy.bench import interleaved

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.001)

    def slow():
        calls["slow"] += 1
        time.sleep(0.004)

    stats = interleaved({"fast": fast, "slow": slow}, repeat=9, warmup=2, rounds=3, lead_in_ms=0)
    assert calls == {"fast": 11, "slow": 11}  # warm-up + 3 rounds of 3
    assert stats["fast"].repeats == stats["slow"].repeats == 9
    assert 1.0 <= stats["fast"].median_ms < stats["slow"].median_ms
    assert 4.0 <= stats["slow"].median_ms <= stats["slow"].p90_ms


def test_budget_caps_the_calls():
    from dse.deploy.bench import calls_within, interleaved

    # 200 calls over 3 rounds = 67 a round; four contestants of 150 ms each take 0.6 s a round of calls:
    # a 30 s budget fits 30 / (3 * 0.6) = 16 calls a round
    assert calls_within(30.0, [150.0] * 4, repeat=200, rounds=3) == 16
    assert calls_within(30.0, [1.0] * 4, repeat=200, rounds=3) == 67  # fits: the full count
    assert calls_within(0.001, [150.0] * 4, repeat=200, rounds=3) == 5  # never below 5 a round
    assert calls_within(None, [150.0] * 4, repeat=200, rounds=3) == 67
    stats = interleaved({"a": lambda: time.sleep(0.01)}, repeat=300, warmup=1, rounds=3, lead_in_ms=0,
                        budget_s=0.6)
    assert 3 * 5 <= stats["a"].repeats <= 3 * 20  # 0.6 s / 3 rounds / ~10 ms: about 20 a round, not 100


def test_interleaved_leads_in_untimed_after_each_switch(monkeypatch):
    """The first call after a switch (cold caches) runs in the untimed lead-in, for every contestant alike. A fake
    clock that only the contestants advance: a warm call takes 1 ms, the first after a switch 50 ms."""
    import dse.deploy.bench

    clock = {"now": 0.0, "last": None}

    def contestant(name):
        def call():
            clock["now"] += 0.001 if clock["last"] == name else 0.050
            clock["last"] = name
        return call

    monkeypatch.setattr(dse.deploy.bench, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    fns = {"a": contestant("a"), "b": contestant("b")}
    stats = dse.deploy.bench.interleaved(fns, repeat=6, warmup=1, rounds=3, lead_in_ms=3)
    for s in stats.values():
        assert s.repeats == 6 and list(s.samples_ms) == pytest.approx([1.0] * 6)
    cold = dse.deploy.bench.interleaved(fns, repeat=6, warmup=1, rounds=3, lead_in_ms=0)  # without: the switch is timed
    assert all(sorted(s.samples_ms)[-3:] == pytest.approx([50.0] * 3) for s in cold.values())


def test_the_thermometer_reads_around_every_block():
    from dse.deploy.bench import block_speeds, interleaved_rounds

    order: list[str] = []
    readings: list[float] = []

    def probe():
        order.append("probe")
        readings.append(float(len(readings) + 1))  # 1, 2, 3, ...

    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    interleaved_rounds(fns, per_round=1, warmup=1, rounds=2, lead_in_ms=0, between=probe)
    timed = order[2:]  # after the two warm-up calls
    assert timed == ["probe", "a", "probe", "b", "probe", "a", "probe", "b", "probe"]
    # block k lies between readings k and k + 1 and takes the smaller: a's blocks 1|2 and 3|4, b's 2|3 and 4|5
    assert block_speeds(readings, ["a", "b"], 2) == {"a": [1.0, 3.0], "b": [2.0, 4.0]}
    assert block_speeds([1.0, 9.0, 2.0], ["a"], 2) == {"a": [1.0, 2.0]}  # a preempted reading does not count
    with pytest.raises(ValueError, match="expected 5"):
        block_speeds(readings[:-1], ["a", "b"], 2)


def _contestants(out: dict) -> dict[str, dict]:
    return {r["contestant"]: r for r in out["rows"]}


@pytest.fixture(scope="module")
def benched(artifact, run_cli):
    """One `dse bench --json` of the artifact (no torch.compile): it builds the dense TVM baseline."""
    res = run_cli("bench", "--artifact", str(artifact), "--no-compile", "--set", "bench.repeat=6",
                  "--set", "bench.warmup=1", "--json", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_bench_cli_reports_all_contestants(benched, artifact):
    out = benched
    rows = _contestants(out)
    assert set(rows) == {"tvm", "dense_tvm", "eager"}
    assert rows["tvm"]["model"].startswith("ShiftAddViT (TVM, ") and rows["dense_tvm"]["model"] == "dense (TVM)"
    assert rows["eager"]["model"] == "dense (PyTorch eager)"
    tvm_row, dense_tvm, eager = rows["tvm"], rows["dense_tvm"], rows["eager"]
    for row in rows.values():
        assert 0 < row["median_ms"] <= row["p90_ms"]
        assert row["energy_source"]
        assert row["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / row["median_ms"])
    # the headline figure and the ShiftAddViT row's own figure are computed apart: they must agree
    assert tvm_row["speedup_vs_eager"] == pytest.approx(out["speedup_vs_eager"])
    # the exported design's three speed-ups, from the JSON's own medians
    assert out["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / tvm_row["median_ms"])
    assert out["speedup_vs_dense_tvm"] == pytest.approx(dense_tvm["median_ms"] / tvm_row["median_ms"])
    assert out["speedup_vs_dense_tvm"] == pytest.approx(out["dense_tvm"]["median_ms"] / tvm_row["median_ms"])
    assert out["speedup_vs_compiled"] is None and out["torch_compile_s"] is None
    assert out["dense_tvm"]["median_ms"] == dense_tvm["median_ms"] and out["dense_tvm"]["built"] is True
    assert out["dense_tvm"]["predicted_ms"] == dense_tvm["predicted_ms"]
    assert out["batch"] == 8 and out["inputs"].startswith("validation images")
    from dse.hardware.device import describe_device

    here = describe_device("cpu")
    assert out["device"]["slug"] == here.slug and out["device"]["name"] == here.name
    for row in (tvm_row, dense_tvm):  # a figure, or the reason there is none: never neither
        assert (row["predicted_ms"] is None) == bool(row["no_prediction"]), row

    # the dense baseline: the dense checkpoint exported with every layer mult/msa, next to the artifact
    folder = artifact.with_name(artifact.name + "-dense-tvm") / "artifact"
    assert out["dense_tvm"]["artifact"] == str(folder.resolve())
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    assert set(manifest["model"]["assignment_counts"]) == {"msa", "mult"}
    assert {k["primitive"] for k in manifest["kernels"]} <= {"matmul", "bmm"}
    assert manifest["input"] == yaml.safe_load((artifact / "manifest.yaml").read_text())["input"]

    from dse.commands.bench import render

    text = render(out)
    assert "ShiftAddViT (TVM" in text and "dense (TVM)" in text and "dense (PyTorch eager)" in text
    assert "x eager" in text and f"{tvm_row['median_ms']:.3f}" in text and f"{dense_tvm['median_ms']:.3f}" in text
    assert f"{out['speedup_vs_dense_tvm']:.2f}x vs dense (TVM)" in text
    for row in rows.values():  # a figure, or the reason there is none, on the command line too
        assert (row["predicted_ms"] is None) == bool(row["no_prediction"])
        if row["no_prediction"]:
            assert f"no prediction for {row['model']}: {row['no_prediction']}" in text


def test_second_bench_reuses_the_dense_tvm_artifact(benched, artifact, run_cli):
    folder = artifact.with_name(artifact.name + "-dense-tvm")
    before = {p.name: p.stat().st_mtime_ns for p in (folder / "artifact").iterdir()}
    stage = (folder / "dense_tvm.json").read_text()
    res = run_cli("bench", "--artifact", str(artifact), "--no-compile", "--set", "bench.repeat=3",
                  "--set", "bench.warmup=1", "--json", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["dense_tvm"]["built"] is False and "dense_tvm" in _contestants(out)
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "artifact").iterdir()} == before
    assert (folder / "dense_tvm.json").read_text() == stage


def test_no_dense_tvm_omits_the_contestant(benched, artifact, run_cli):
    res = run_cli("bench", "--artifact", str(artifact), "--no-compile", "--no-dense-tvm", "--set",
                  "bench.repeat=3", "--set", "bench.warmup=1", "--json", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert set(_contestants(out)) == {"tvm", "eager"}
    assert out["dense_tvm"] is None and out["speedup_vs_dense_tvm"] is None
    assert out["speedup_vs_eager"] == pytest.approx(_contestants(out)["eager"]["median_ms"] /
                                                    _contestants(out)["tvm"]["median_ms"])


def test_bench_dense_tvm_config_key_is_checked(tmp_path, dse_cli):
    # checked before any file is opened: the artifact folder need not exist
    res = dse_cli("bench", "--artifact", str(tmp_path / "nope"), "--set", "bench.dense_tvm=3", timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bench.dense_tvm" in lines[0]


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


@pytest.fixture
def dense_tvm_inputs(tmp_path):
    """(config, artifact manifest, artifact folder, tiny dense ViT, its checkpoint file) for dense_tvm_artifact."""
    import models
    from dse.config import load_config

    ckpt = tmp_path / "dense.pt"
    ckpt.write_bytes(b"dense weights")
    model = models.create("vit_digits", num_classes=10, img_size=16, depth=1)
    manifest = {"input": {"batch": 2, "shape": [2, 3, 16, 16], "dtype": "float32"}, "target": {"kind": "llvm"},
                "target_slug": "llvm-test", "accuracy": {"val_images": 16}}
    return load_config(), manifest, tmp_path / "art", model, ckpt


def test_dense_tvm_artifact_is_rebuilt_only_when_its_inputs_change(dense_tvm_inputs, monkeypatch):
    """Export stood in for by a fake that records its calls: reused while the fingerprint holds."""
    import dse.deploy.bench

    cfg, manifest, art_dir, model, ckpt = dense_tvm_inputs
    calls = []

    def fake_export(dcfg, checkpoint, out, *, target, assignment, profile, cuda_arch):
        calls.append({"target": target, "batch": dcfg.export.batch, "plan": yaml.safe_load(assignment.read_text())})
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.yaml").write_text("format: fake\n")
        return {"folder": str(out)}

    monkeypatch.setattr(dse.deploy.bench, "export", fake_export)
    folder, built = dse.deploy.bench.dense_tvm_artifact(cfg, manifest, art_dir, model, ckpt, None)
    assert built and folder == art_dir.resolve().with_name("art-dense-tvm") / "artifact"
    plan = calls[0]["plan"]
    assert set(plan["attention"].values()) == {"msa"} and set(plan["linear"].values()) == {"mult"}
    assert calls[0]["batch"] == 2 and calls[0]["target"] == {"kind": "llvm"}
    assert dse.deploy.bench.dense_tvm_artifact(cfg, manifest, art_dir, model, ckpt, None)[1] is False  # reused
    ckpt.write_bytes(b"other dense weights")
    assert dse.deploy.bench.dense_tvm_artifact(cfg, manifest, art_dir, model, ckpt, None)[1] is True  # new checkpoint
    other_target = {**manifest, "target": {"kind": "llvm", "mcpu": "other"}}
    assert dse.deploy.bench.dense_tvm_artifact(cfg, other_target, art_dir, model, ckpt, None)[1] is True  # new target
    assert len(calls) == 3


def test_dense_tvm_build_failure_says_what_to_do(dense_tvm_inputs, monkeypatch):
    import dse.deploy.bench
    from dse.errors import KernelError

    cfg, manifest, art_dir, model, ckpt = dense_tvm_inputs

    def failing_export(*_args, **_kwargs):
        raise KernelError("TVM failed to compile the model for llvm-test: no schedule")

    monkeypatch.setattr(dse.deploy.bench, "export", failing_export)
    with pytest.raises(KernelError, match=r"dense TVM baseline .* no schedule; .*--no-dense-tvm") as err:
        dse.deploy.bench.dense_tvm_artifact(cfg, manifest, art_dir, model, ckpt, None)
    assert "\n" not in str(err.value)
    assert not (art_dir.resolve().with_name("art-dense-tvm") / "dense_tvm.json").exists()  # nothing cached


def test_bench_prediction_error_is_against_the_measured_median(benched):
    rows = _contestants(benched)
    priced = [rows[name] for name in ("tvm", "dense_tvm") if rows[name]["predicted_ms"] is not None]
    if not priced:
        pytest.skip(f"no stored profile of this device and target prices the artifact "
                    f"({rows['tvm']['no_prediction']}); the prediction error has nothing to compare")
    for row in priced:
        expected = 100.0 * (row["predicted_ms"] - row["median_ms"]) / row["median_ms"]
        assert row["prediction_error_pct"] == pytest.approx(expected)


def test_bench_reads_the_host_speed_around_each_contestant(benched):
    speed, rows = benched["host_speed"], benched["rows"]
    assert len(speed["now_samples_ms"]) == 3 * len(rows) + 1
    assert speed["now_ms"] == pytest.approx(statistics.median(speed["now_samples_ms"]))
    for row in rows:
        if row["predicted_ms"] is None or speed["then"] is None:
            assert row["prediction_error_now_pct"] is None
            continue
        # the prediction at the host speed of this contestant's own blocks
        expected = 100.0 * (row["predicted_ms"] * row["host_speed_ratio"] - row["median_ms"]) / row["median_ms"]
        assert row["prediction_error_now_pct"] == pytest.approx(expected)


def test_a_bench_under_load_says_so():
    from dse.profiling.profiler import busy_host_warning

    assert busy_host_warning(1.0, 2, "dse bench") is None and busy_host_warning(None, 2, "dse bench") is None
    assert "3.0 on 2 cores" in busy_host_warning(3.0, 2, "dse bench")  # above 1.25 per core
