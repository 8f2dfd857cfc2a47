"""MetaSchedule tuning writes a per-target database that later builds reuse without tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kernels
from kernels import tuning


def test_tuning_root_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    assert tuning.tuning_root() == tuning.PROJECT_ROOT / "profiles" / "tuning"
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "env"))
    assert tuning.tuning_root() == (tmp_path / "env").resolve()
    assert tuning.tuning_root(tmp_path / "arg") == (tmp_path / "arg").resolve()
    assert tuning.target_dir("cpu", tmp_path).name == kernels.target_slug("cpu")


def test_build_without_records_uses_default(tmp_path) -> None:
    fn = kernels.build("matadd", b=1, m=8, k=8, n=16, tuning_dir=tmp_path)
    assert fn.schedule == "default" and fn.tuned_trials == 0
    assert not any(tmp_path.rglob("database_tuning_record.json"))


@pytest.mark.slow
def test_tune_then_reuse(tmp_path, monkeypatch) -> None:
    """Tune a tiny GEMM with 2 trials; a second build (fresh cache) must not tune again."""
    b, m, k, n = 1, 8, 16, 16
    kernels.build("matmul", b=b, m=m, k=k, n=n, trials=2, tuning_dir=tmp_path)
    folder = tuning.target_dir("cpu", tmp_path)
    records = (folder / "database_tuning_record.json").read_text().splitlines()
    assert records and (folder / "database_workload.json").exists()
    entry = json.loads((folder / "selection.json").read_text())[
        tuning.kernel_key("matmul", b, m, k, n, "float32")
    ]
    assert entry["trials"] == 2 and entry["choice"] in ("default", "tuned")
    assert entry["tuned_ms"] > 0 and entry["default_ms"] > 0

    def no_tuning(*args, **kwargs):
        raise AssertionError("tune_tir called although a record exists")

    from tvm.s_tir import meta_schedule as ms

    monkeypatch.setattr(ms, "tune_tir", no_tuning)
    kernels.clear_cache()
    again = kernels.build("matmul", b=b, m=m, k=k, n=n, trials=2, tuning_dir=tmp_path)
    assert again.tuned_trials == 2 and again.schedule == entry["choice"]
    tuned = tuning.tuned_kernel(again, tmp_path)
    assert tuned is not None and tuned.schedule == "tuned"
    x, w = kernels.random_inputs("matmul", b, m, k, n)
    np.testing.assert_allclose(tuned(x, w), kernels.reference("matmul", x, w), rtol=1e-5, atol=1e-5)
    assert (folder / "database_tuning_record.json").read_text().splitlines() == records
