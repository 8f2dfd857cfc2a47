"""Shared fixtures of the search tests: a tiny dense checkpoint, a synthetic cost table, and an independent
re-computation of the stage-A objectives from the files a search writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import models
from models.assignment import layer_kinds

ROOT = Path(__file__).resolve().parents[2]
TINY = {"depth": 2}
IMG = 16  # 4x4 patches -> 16 tokens: a fast model for the plumbing tests
# The config a test search runs with (as --set overrides, and as load_config overrides).
OVERRIDES = [
    "model.kwargs={depth: 2}",
    f"data.img_size={IMG}",
    "data.val_fraction=0.1",
    "search.sensitivity_samples=48",
    "search.population=20",
    "data.eval_batch_size=64",
]
CLI_SETTINGS = [arg for o in OVERRIDES for arg in ("--set", o)]


def tiny_checkpoint(folder: Path) -> tuple[Path, Path, dict[str, str]]:
    """(dense checkpoint, cost-table JSON, layer kinds) for a 2-block vit_digits with random weights."""
    from dse.search import synthetic_costs

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = models.create("vit_digits", num_classes=10, img_size=IMG, **TINY)
    ckpt = folder / "dense.pt"
    arch = {"name": "vit_digits", "kwargs": dict(TINY), "num_classes": 10, "img_size": IMG}
    torch.save({"model": model.state_dict(), "meta": {"architecture": arch}}, ckpt)
    kinds = layer_kinds(model)
    costs = folder / "costs.json"
    synthetic_costs(kinds, seed=3).to_json(costs)
    return ckpt, costs, kinds


def expected_objectives(
    params_to_layers: dict[str, list[str]],
    params: dict[str, str],
    costs_json: Path,
    sensitivity_json: Path,
    kinds: dict[str, str],
    pinned: dict[str, str],
) -> tuple[float, ...]:
    """Latency, energy and risk of one trial, summed by hand from the cost table and the sensitivity
    cache (the search's formula, re-derived: risk = sum max(0, dloss); moe = shift share x shift)."""
    table = json.loads(costs_json.read_text())
    sens = json.loads(sensitivity_json.read_text())["delta"]
    choice = dict(pinned)
    for name, value in params.items():
        for layer in params_to_layers[name]:
            choice[layer] = value
    lat, en = table["fixed"]
    risk = 0.0
    for layer, c in choice.items():
        lat += table["layers"][layer][c][0]
        en += table["layers"][layer][c][1]
        if c == "hamming":
            risk += max(0.0, sens[layer]["hamming"])
        elif c == "shift":
            risk += max(0.0, sens[layer]["shift"])
        elif c == "moe":
            m, s = table["layers"][layer]["mult"][0], table["layers"][layer]["shift"][0]
            risk += m / (m + s) * max(0.0, sens[layer]["shift"])
    assert set(choice) == set(kinds)
    return lat, en, risk


def dse_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dse", *args]


def spawn(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
    # stdout to ``log``, stderr to ``log`` + ".err"; the child keeps its own copies of the descriptors.
    with open(log, "w") as out, open(str(log) + ".err", "w") as err:
        return subprocess.Popen(
            dse_command(*args), cwd=ROOT, stdout=out, stderr=err, env=env, start_new_session=True
        )


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        dse_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)


def close_to(a, b, rel: float = 1e-9) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=rel, atol=1e-12))
