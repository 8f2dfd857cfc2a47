import json

import pytest


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert "Traceback" not in stderr, stderr
    return lines[-1]


def test_help_lists_every_command_of_the_readme(dse_cli):
    """The README's command table (the user's contract) against what ``dse --help`` offers."""
    import re

    from tests.conftest import ROOT

    documented = set(re.findall(r"^\| `dse (\w+)` \|", (ROOT / "README.md").read_text(), re.M))
    assert {"env", "profile", "search", "finetune", "export", "bench", "run"} <= documented
    res = dse_cli("--help")
    assert res.returncode == 0
    offered = set(re.findall(r"^    (\w+)\s{2,}", res.stdout, re.M))
    assert documented <= offered, documented - offered


def test_python_m_and_no_command(dse_cli):
    res = dse_cli()
    assert res.returncode == 2


def test_env_json_parses(dse_cli):
    res = dse_cli("env", "--json", "--no-compile")
    assert res.returncode == 0, res.stderr
    env = json.loads(res.stdout)
    assert env["versions"]["tvm"] and "model" in env["energy_sources"]
    assert env["energy_sources"]["model"] == "usable"
    # the CUDA target shown is the one dse export compiles its companion artifact for
    assert '"arch":"sm_90"' in env["targets"]["cuda"]["target"].replace(" ", "")
    res = dse_cli("env", "--json", "--no-compile", "--set", "export.cuda_arch=sm_86")
    assert '"arch":"sm_86"' in json.loads(res.stdout)["targets"]["cuda"]["target"].replace(" ", "")


def test_unknown_config_key_exits_2_naming_the_key(tmp_path, dse_cli):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain:\n  epochs: 1\n  lr_warmup: 3\n")
    res = dse_cli("pretrain", "-c", str(cfg), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "pretrain.lr_warmup" in _one_error_line(res.stderr)


def test_bad_flag_is_usage_error(dse_cli):
    res = dse_cli("pretrain", "--no-such-flag")
    assert res.returncode == 2
    _one_error_line(res.stderr)


@pytest.mark.parametrize("overrides, code, fragment", [
    (["data.name=imagefolder", "data.path=/nonexistent/imagenet"], 2, "/nonexistent/imagenet/train"),
    (["model.checkpoint=/nonexistent/dense.pt"], 2, "/nonexistent/dense.pt"),
    (["model.name=no_such_model_xyz"], 2, "no_such_model_xyz"),
])
def test_missing_inputs_one_line(tmp_path, overrides, code, fragment, dse_cli):
    args = ["pretrain", "--out", str(tmp_path / "o")]
    for o in overrides:
        args += ["--set", o]
    res = dse_cli(*args)
    assert res.returncode == code, res.stderr
    assert fragment in _one_error_line(res.stderr)


def test_debug_shows_traceback(tmp_path, dse_cli):
    res = dse_cli("pretrain", "--debug", "--out", str(tmp_path / "o"), "--set", "model.checkpoint=/nope.pt")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_truncated_checkpoint_is_one_line(tmp_path, dse_cli):
    bad = tmp_path / "dense.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    res = dse_cli("pretrain", "--out", str(tmp_path / "o"), "--set", f"model.checkpoint={bad}")
    assert res.returncode == 2
    assert "cannot be read" in _one_error_line(res.stderr)


def test_checkpoint_of_another_architecture(tmp_path, dse_cli):
    import torch

    import models

    other = models.create("vit_digits", embed_dim=48, num_heads=2)
    path = tmp_path / "other.pt"
    torch.save({"model": other.state_dict()}, path)
    res = dse_cli("pretrain", "--out", str(tmp_path / "o"), "--set", f"model.checkpoint={path}")
    assert res.returncode == 2
    assert "does not fit this model" in _one_error_line(res.stderr)


def test_an_unknown_figure_shows_as_a_dash_in_tables_and_null_in_json():
    import json
    import math

    from dse.cli import _json_safe
    from dse.commands.common import table
    from dse.cost.sources import energy_text

    text = table([{"model": "eager", "energy_mj": math.nan}, {"model": "tvm", "energy_mj": 0.25}])
    assert text.splitlines()[2].split() == ["eager", "—"] and text.splitlines()[3].split() == ["tvm", "0.250"]
    assert json.loads(json.dumps(_json_safe({"rows": [{"energy_mj": math.nan}], "x": (1.0,)}))) == \
        {"rows": [{"energy_mj": None}], "x": [1.0]}
    assert (energy_text(math.nan), energy_text(None), energy_text(0.0125)) == ("unknown", "unknown", "0.0125 mJ")
