import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CI", "true")  # no progress bars in test output


def run_dse(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run the real CLI in a subprocess (exit codes and stderr are part of the contract)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dse", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture
def dse_cli():
    return run_dse
