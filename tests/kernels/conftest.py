"""Kernel tests build against an empty, private tuning database, never the committed records."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_tuning_dir(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SHIFTADD_TUNING_DIR", str(tmp_path_factory.mktemp("tuning")))
    yield
    mp.undo()
