"""A table of bad inputs per command: each must exit with the documented status and one line
``error: …`` naming the offending file/key/value, and must not modify any existing file.

Most cases call the real CLI entry point in-process (``dse.cli.main``) for speed; the subprocess
cases check that the same holds for ``python -m dse`` end to end.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from dse.cli import main
from tests.conftest import run_dse

COMMANDS = ["pretrain", "profile", "cost", "search", "finetune", "export", "bench", "run"]
# Arguments a command requires before it even reads its config.
REQUIRED = {"export": ["--checkpoint", "/nonexistent/ckpt.pt"], "bench": ["--artifact", "/nonexistent/artifact"]}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def call(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "no error printed"
    assert lines[-1].startswith("error: "), err
    assert "Traceback" not in err, err
    return lines[-1]


@pytest.fixture
def workspace(tmp_path):
    """An output folder with existing files that no failing command may touch."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing result\n")
    (out / "resolved_config.yaml").write_text("seed: 0\n")
    return out


def _available(command: str) -> bool:
    from dse import cli
    from dse.commands.registry import COMMANDS

    cli.build_parser()
    return command in COMMANDS


CONFIG_CASES = [
    ("malformed_yaml", "data: [unclosed\n", None, "not valid YAML"),
    ("unknown_key", "profile:\n  batchh: 8\n", None, "profile.batchh"),
    ("wrong_type", "data:\n  batch_size: many\n", None, "data.batch_size"),
    ("negative_batch", None, "profile.batch=-8", "profile.batch"),
    ("zero_batch", None, "bench.batch=0", "bench.batch"),
    ("negative_trials", None, "profile.trials=-1", "profile.trials"),
    ("unknown_model", None, "model.name=no_such_vit", "no_such_vit"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case, yaml_text, override, fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors_exit_2(command, case, yaml_text, override, fragment, workspace, tmp_path, capsys):
    if not _available(command):
        pytest.skip(f"command {command} not built")
    before = snapshot(workspace)
    argv = [command, "--out", str(workspace), *REQUIRED.get(command, [])]
    if yaml_text is not None:
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(yaml_text)
        argv += ["-c", str(cfg)]
    if override is not None:
        argv += ["--set", override]
    code, err = call(capsys, *argv)
    line = one_line(err)
    assert code == 2, (code, line)
    assert fragment in line
    assert snapshot(workspace) == before


def _profile_dir(tmp_path: Path, csv_text: str, meta: str | None = None) -> Path:
    path = tmp_path / "bad_profile.csv"
    path.write_text(csv_text)
    if meta is not None:
        path.with_suffix(".yaml").write_text(meta)
    return path


HEADER = ("primitive,batch,m,k,n,dtype,latency_ms,latency_ms_p90,repeats,energy_mj,energy_source,target,"
          "tuned_trials,backend,schedule,idle_power_w,measured_at\n")
ROW = "matmul,1,520,96,384,float32,{lat},0.5,7,0.1,model,llvm,0,tvm,default,,2026-11-22\n"

PROFILE_CASES = [
    ("missing_file", None, "does not exist"),
    ("wrong_columns", "a,b,c\n1,2,3\n", "column"),
    ("nan_latency", HEADER + ROW.format(lat="nan"), "latency"),
    ("negative_latency", HEADER + ROW.format(lat="-1"), "latency"),
    ("truncated", HEADER + ROW.format(lat="0.4")[:25], None),
    ("empty", "", None),
]


@pytest.mark.parametrize("case, text, fragment", PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES])
def test_bad_profile_files_for_cost(case, text, fragment, workspace, tmp_path, capsys):
    path = tmp_path / "missing.csv" if text is None else _profile_dir(tmp_path, text)
    before = snapshot(workspace)
    code, err = call(capsys, "cost", "--out", str(workspace), "--profile", str(path))
    line = one_line(err)
    assert code in (1, 2), line
    assert str(path.name) in line or str(path) in line
    if fragment:
        assert fragment in line.lower()
    assert snapshot(workspace) == before


def test_no_profile_on_disk_is_one_line(workspace, capsys):
    # The suite's profile root is empty (tests/conftest.py): the user's input is fine, the profile is missing.
    code, err = call(capsys, "cost", "--out", str(workspace))
    line = one_line(err)
    assert code == 2 and "does not exist" in line and "dse profile" in line


def test_a_model_built_for_another_image_size_than_the_data_is_one_line(workspace, tmp_path, capsys):
    import torch

    import models

    code, err = call(capsys, "cost", "--model", "deit_tiny_patch16_224", "--out", str(workspace))
    line = one_line(err)
    assert code == 2 and "built for 224x224 images but data.img_size is 32" in line and "data.img_size=224" in line
    ckpt = tmp_path / "pvt.pt"  # a user's state dict, no architecture record: the config describes it
    torch.save(models.create("pvt_v2_b0", num_classes=10).state_dict(), ckpt)
    out = tmp_path / "artifact"
    code, err = call(capsys, "export", "--checkpoint", str(ckpt), "--set", "model.name=pvt_v2_b0", "--out", str(out))
    assert code == 2 and "pvt_v2_b0 is built for 224x224 images" in one_line(err) and not out.exists()


def test_foreign_device_profile_prices_there_but_is_refused_for_measuring(workspace, tmp_path, capsys):
    import json

    from tests.conftest import GPU_DEVICE, write_profile

    foreign = write_profile(tmp_path / "profiles", device=GPU_DEVICE)  # this CPU's target, another device
    code = main(["cost", "--out", str(workspace), "--profile", str(foreign), "--batch", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["device"] == GPU_DEVICE["slug"]
    before = snapshot(workspace)
    code, err = call(capsys, "cost", "--validate", "--out", str(workspace), "--profile", str(foreign),
                     "--batch", "2")
    line = one_line(err)
    assert code == 2 and GPU_DEVICE["slug"] in line and "measured on" in line
    assert snapshot(workspace) == before


def test_assignment_naming_missing_layers(workspace, tmp_path, capsys):
    bad = tmp_path / "assignment.yaml"
    bad.write_text("linear:\n  blocks.99.mlp.fc1: shift\n")
    code, err = call(capsys, "cost", "--out", str(workspace), "--assignment", str(bad))
    line = one_line(err)
    assert code == 2 and "blocks.99.mlp.fc1" in line


def test_assignment_with_unknown_choice(workspace, tmp_path, capsys):
    bad = tmp_path / "assignment.yaml"
    bad.write_text("linear:\n  blocks.0.mlp.fc1: divide\n")
    code, err = call(capsys, "cost", "--out", str(workspace), "--assignment", str(bad))
    line = one_line(err)
    assert code == 2 and "divide" in line


def test_checkpoint_of_another_architecture_for_finetune(workspace, tmp_path, capsys):
    import models

    other = models.create("vit_digits", embed_dim=48, num_heads=2)
    path = tmp_path / "other.pt"
    torch.save({"model": other.state_dict()}, path)
    before = snapshot(workspace)
    code, err = call(capsys, "finetune", "--out", str(workspace), "--checkpoint", str(path),
                     "--set", "finetune.epochs=1")
    line = one_line(err)
    assert code == 2 and ("does not fit" in line or "architecture" in line)
    assert snapshot(workspace) == before


def test_cuda_target_without_gpu(workspace, capsys):
    import kernels

    if kernels.cuda_available():
        pytest.skip("a GPU is present")
    code, err = call(capsys, "profile", "--out", str(workspace), "--target", "cuda")
    line = one_line(err)
    assert code == 1 and "no CUDA device" in line


def test_unknown_target_and_primitive(workspace, capsys):
    code, err = call(capsys, "profile", "--out", str(workspace), "--target", "tpu")
    assert code == 2 and "tpu" in one_line(err)
    with pytest.raises(Exception) as exc:
        import kernels

        kernels.build("matdivide", b=1, m=2, k=2, n=2)
    assert "matdivide" in str(exc.value) and "matshift" in str(exc.value)


def test_tampered_artifact_is_refused(tmp_path, capsys):
    """A checksum mismatch is refused before the library is loaded (loading runs its code)."""
    from dse.deploy import artifact

    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "model.so").write_bytes(b"\x7fELF not really")
    (folder / "weights.npz").write_bytes(b"weights")
    (folder / "assignment.yaml").write_text("linear: {}\n")
    artifact.write_manifest(folder, {})
    (folder / "model.so").write_bytes(b"\x7fELF tampered")
    code, err = call(capsys, "bench", "--artifact", str(folder))
    line = one_line(err)
    assert code in (1, 2) and "checksum" in line.lower()


def test_subprocess_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {trials: -5}\n")
    res = run_dse("search", "-c", str(bad), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "search.trials" in one_line(res.stderr)


def test_nvml_failing_mid_window_keeps_existing_rows(tmp_path, monkeypatch, capsys, tiny_profile_set):
    """NVML present but the GPU drops off the bus in the middle of a measurement window: `dse profile`
    exits 1 with one line naming the NVML failure, and the rows measured before are untouched.

    The fake ``pynvml`` is injected where the project imports it (``dse.hardware.nvml``); as no GPU exists here the
    kernels run on the CPU and only the energy source is the NVML meter — the part under test."""
    import threading

    import dse.hardware.energy
    from dse.hardware.energy import NvmlMeter
    from tests.conftest import FakeGpu

    out = tmp_path / "profiles"
    argv = ["profile", "--out", str(out), *tiny_profile_set, "--set", "profile.nonprim=false",
            "--set", "profile.torch_threads=1"]
    assert main([*argv, "--batch", "1"]) == 0  # a healthy run first: these rows must survive
    capsys.readouterr()
    (csv,) = out.glob("*/*.csv")
    before = snapshot(out)

    fake = FakeGpu()
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake.module())
    monkeypatch.setattr(dse.hardware.energy, "select_source",
                        lambda *a, **k: NvmlMeter(0, counter_poll_s=0.01, power_poll_s=0.01))
    lose = threading.Timer(0.3, lambda: setattr(fake, "lost", True))  # lands inside the first 0.5 s window
    lose.start()
    try:
        code, err = call(capsys, *argv, "--set", "profile.energy_window_s=0.5")
    finally:
        lose.cancel()
    line = one_line(err)
    assert code == 1 and "GPU is lost" in line and "could not be measured" in line
    assert snapshot(out) == before, "the failing run changed the existing profile"
    assert len(store_rows(csv)) > 0


def store_rows(csv: Path) -> list[dict]:
    from dse.profiling.store import load_profile

    return load_profile(csv).frame.to_dict("records")
