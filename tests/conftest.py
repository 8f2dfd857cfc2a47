import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import kernels
from dse.config import Config
from dse.device import describe_device
from dse.inventory import build_inventory
from dse.pretrain import build_dense
from dse.profile import plan
from dse.store import format_rows, meta_path, profile_path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CI", "true")  # no progress bars in test output
# No test reads the profiles committed for some host CPU: the default profile root is an empty folder of the
# session's (subprocesses inherit it). A test that needs a profile writes one (the `profile_root` fixtures).
os.environ["DSE_PROFILE_DIR"] = tempfile.mkdtemp(prefix="dse-profiles-")


def run_dse(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run the real CLI in a subprocess (exit codes and stderr are what users script against)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dse", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture
def dse_cli():
    return run_dse


def write_profile(root: Path, *, cfg: Config | None = None, batch: int = 2, device: dict | None = None,
                  target: dict | None = None, seconds_per_mac: float = 2e-9, overhead_ms: float = 0.002) -> Path:
    """Write ``<root>/<device>/<target>.csv`` + ``.yaml``: every row ``dse profile`` would measure for the model
    of ``cfg`` (default: the built-in config's; ``dse.profile.plan``), priced by a stated formula instead of a
    measurement, so tests own their data:
    ``latency_ms = overhead_ms + b·m·k·n · seconds_per_mac · 1e3`` (PyTorch rows 1.5× that), energy 0.01 mJ
    (``model``). ``device``/``target`` default to this machine's CPU and target."""
    cfg = cfg or Config()
    model = cfg.model.name
    inventory = build_inventory(build_dense(cfg), batch=batch, nbits=cfg.finetune.nbits, name=model)
    target = json.loads(json.dumps(target or kernels.targets.target_to_dict(kernels.resolve_target("cpu"))))
    device = device or describe_device("cpu").as_dict()
    rows = []
    for spec in plan(inventory):
        ms = overhead_ms + spec.b * spec.m * spec.k * spec.n * seconds_per_mac * 1e3
        ms *= 1.5 if spec.backend == "torch" else 1.0
        rows.append({"primitive": spec.primitive, "backend": spec.backend, "batch": spec.b, "m": spec.m,
                     "k": spec.k, "n": spec.n, "dtype": spec.dtype, "latency_ms": ms, "latency_ms_p90": ms,
                     "repeats": 7, "energy_mj": 0.01, "energy_source": "model", "idle_power_w": None,
                     "target": json.dumps(target), "schedule": "eager" if spec.backend == "torch" else "default",
                     "tuned_trials": 0, "measured_at": "2026-12-01T00:00:00+00:00"})
    slug = kernels.target_slug(target)
    path = profile_path(root, str(device["slug"]), slug)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_rows(rows))
    meta = {"format": 1, "device": dict(device), "target": dict(target), "target_slug": slug,
            "versions": {"tvm": "test", "torch": "test"}, "settings": {},
            "models": [f"{model} (batch {batch}, formula rows)"], "created": "2026-12-01T00:00:00+00:00"}
    meta_path(path).write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


GPU_DEVICE = {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3", "index": 0,
              "cores": None, "arch": "hopper"}
GPU_TARGET = {"kind": "cuda", "arch": "sm_90"}


@pytest.fixture
def profile_root(tmp_path):
    """An empty profile root of the test's own; ``write_profile(root, ...)`` fills it."""
    root = tmp_path / "profiles"
    root.mkdir()
    return root
