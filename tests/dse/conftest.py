"""Fixtures shared by the tests of ``dse``: the CLI in a subprocess, tiny models and checkpoints for the search,
fine-tune and profile tests, and the trained mixed ShiftAddViT (and its exported artifact) of the export and
bench tests.

Helpers are fixtures (most return a function), so no test module imports another.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import models
from dse.config import load_config
from models.assignment import layer_kinds

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------
# The CLI in a subprocess


def _dse_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dse", *args]


def _cli_env() -> dict[str, str]:
    return {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}


def _run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m dse ARGS`` from the repository root, output captured."""
    return subprocess.run(_dse_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=_cli_env())


def _spawn(*args: str, log: Path) -> subprocess.Popen:
    """``python -m dse ARGS`` in the background: stdout to ``log``, stderr to ``log`` + ".err"."""
    # the child keeps its own copies of the descriptors
    with open(log, "w") as out, open(str(log) + ".err", "w") as err:
        return subprocess.Popen(_dse_command(*args), cwd=ROOT, stdout=out, stderr=err, env=_cli_env(),
                                start_new_session=True)


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    return _run_cli


@pytest.fixture(scope="session")
def spawn_dse() -> Callable[..., subprocess.Popen]:
    return _spawn


@pytest.fixture(scope="session")
def kill_process() -> Callable[..., None]:
    return _kill


# ---------------------------------------------------------------------------------------------------
# Search: a tiny dense checkpoint, a synthetic cost table, and the stage-A objectives re-computed by hand

SEARCH_TINY = {"depth": 2}
SEARCH_IMG = 16  # 4x4 patches -> 16 tokens: a fast model for the plumbing tests
# The config a test search runs with (as --set overrides, and as load_config overrides).
SEARCH_OVERRIDES = [
    "model.kwargs={depth: 2}",
    f"data.img_size={SEARCH_IMG}",
    "data.val_fraction=0.1",
    "search.sensitivity_samples=48",
    "search.population=20",
    "data.eval_batch_size=64",
]


def _tiny_checkpoint(folder: Path) -> tuple[Path, Path, dict[str, str]]:
    """(dense checkpoint, cost-table JSON, layer kinds) for a 2-block vit_digits with random weights."""
    from dse.cost.sources import synthetic_costs

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = models.create("vit_digits", num_classes=10, img_size=SEARCH_IMG, **SEARCH_TINY)
    ckpt = folder / "dense.pt"
    arch = {"name": "vit_digits", "kwargs": dict(SEARCH_TINY), "num_classes": 10, "img_size": SEARCH_IMG}
    torch.save({"model": model.state_dict(), "meta": {"architecture": arch}}, ckpt)
    kinds = layer_kinds(model)
    costs = folder / "costs.json"
    synthetic_costs(kinds, seed=3).to_json(costs)
    return ckpt, costs, kinds


def _expected_objectives(
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


@pytest.fixture(scope="session")
def search_overrides() -> list[str]:
    return list(SEARCH_OVERRIDES)


@pytest.fixture(scope="session")
def search_cli_settings() -> list[str]:
    """:data:`SEARCH_OVERRIDES` as ``--set`` arguments."""
    return [arg for o in SEARCH_OVERRIDES for arg in ("--set", o)]


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Callable[[Path], tuple[Path, Path, dict[str, str]]]:
    return _tiny_checkpoint


@pytest.fixture(scope="session")
def expected_objectives() -> Callable[..., tuple[float, ...]]:
    return _expected_objectives


# ---------------------------------------------------------------------------------------------------
# Attention as eager PyTorch runs it


def _unfused(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with timm's ``fused_attn`` off on every attention: eager PyTorch then runs softmax attention as
    its two products and the softmax (what the compiled model runs), not one ``F.scaled_dot_product_attention``."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


@pytest.fixture(scope="session")
def unfused() -> Callable[[torch.nn.Module], torch.nn.Module]:
    return _unfused


# ---------------------------------------------------------------------------------------------------
# Fine-tune: a tiny config, distinct expert costs per layer, a cost-table stand-in for a profile

FINETUNE_TINY = ["data.img_size=16", "data.augment=false",
                 "model.kwargs={patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}",
                 "finetune.warmup_epochs=0", "finetune.lr=0.002", "finetune.threads=1", "finetune.batch_size=128"]


def _tiny_cfg(*extra: str):
    return load_config(None, [*FINETUNE_TINY, *extra])


def _linear_names(model) -> list[str]:
    return [n for n, k in layer_kinds(model).items() if k == "linear"]


def _costs_for(model) -> dict[str, dict[str, float]]:
    """Distinct, non-uniform costs per layer, so a mix-up of layers would show."""
    return {n: {"mult": 1.0 + i, "shift": 2.0 + 0.5 * i} for i, n in enumerate(_linear_names(model))}


def _write_cost_table(path: Path, costs: dict) -> Path:
    """A cost-table JSON (dse.cost.sources.CostTableFile) holding only the MoE expert costs: a profile stand-in."""
    path.write_text(json.dumps({"fixed": [0.0, 0.0], "layers": {}, "moe_expert_costs": costs}))
    return path


def _finetune_cli_args(out: Path, dense_ckpt: Path, costs_json: Path, *sets: str) -> list[str]:
    return ["finetune", *[a for s in [*FINETUNE_TINY, *sets] for a in ("--set", s)], "--checkpoint",
            str(dense_ckpt), "--profile", str(costs_json), "--out", str(out)]


@pytest.fixture(scope="session")
def finetune_tiny() -> list[str]:
    """The tiny fine-tune config as ``load_config`` overrides."""
    return list(FINETUNE_TINY)


@pytest.fixture(scope="session")
def tiny_cfg() -> Callable[..., object]:
    """``tiny_cfg(*overrides)``: the tiny fine-tune config."""
    return _tiny_cfg


@pytest.fixture(scope="session")
def linear_names() -> Callable[..., list[str]]:
    return _linear_names


@pytest.fixture(scope="session")
def costs_for() -> Callable[..., dict[str, dict[str, float]]]:
    return _costs_for


@pytest.fixture(scope="session")
def write_cost_table() -> Callable[[Path, dict], Path]:
    return _write_cost_table


@pytest.fixture(scope="session")
def finetune_cli_args() -> Callable[..., list[str]]:
    """``finetune_cli_args(out, dense_ckpt, costs_json, *overrides)``: the `dse finetune` argv of the tiny config."""
    return _finetune_cli_args


# ---------------------------------------------------------------------------------------------------
# Profile: a tiny model (one block, 8x8 patches) and the `dse profile` arguments that measure it fast

PROFILE_TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 1.0}


@pytest.fixture(scope="session")
def tiny_profile_model() -> dict[str, object]:
    """vit_digits arguments of the tiny profile model."""
    return dict(PROFILE_TINY)


@pytest.fixture(scope="session")
def tiny_profile_set() -> list[str]:
    """`dse profile` arguments for the tiny profile model, two repeats of at least 1 ms, batch 2; rows are reused
    whatever the test machine's load (a subprocess does not see the `quiet_host` fixture)."""
    kwargs = "{img_size: 16, patch_size: 8, embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 1.0}"
    return ["--set", f"model.kwargs={kwargs}", "--set", "data.img_size=16", "--set", "profile.repeat=2",
            "--set", "profile.min_repeat_ms=1", "--set", "profile.busy_load_per_core=1000",
            "--batch", "2"]


# ---------------------------------------------------------------------------------------------------
# Export and bench: one small, trained, mixed ShiftAddViT and its artifact, built once per session

SHIFTADD = SimpleNamespace(
    assignment={
        "attention": {"blocks.0.attn": "hamming", "blocks.1.attn": "msa"},
        "linear": {"blocks.0.attn.qkv": "shift", "blocks.0.attn.proj": "moe", "blocks.0.mlp.fc1": "shift",
                   "blocks.0.mlp.fc2": "mult", "blocks.1.attn.qkv": "mult", "blocks.1.attn.proj": "shift",
                   "blocks.1.mlp.fc1": "moe", "blocks.1.mlp.fc2": "shift"},
    },
    costs={"blocks.0.attn.proj": {"mult": 1.0, "shift": 1.0}, "blocks.1.mlp.fc1": {"mult": 1.0, "shift": 1.0}},
    # Small enough to train in seconds on one thread, and far above chance.
    overrides=["model.kwargs={depth: 2, embed_dim: 48}", "pretrain.epochs=4", "pretrain.warmup_epochs=1",
               "pretrain.lr=3e-3", "pretrain.threads=1", "data.augment=false", "data.batch_size=32",
               "export.repeat=5", "export.threads=1"],
    # One layer and one MoE Shift expert on the integer kernel, the rest chosen by the exporter's rule.
    forced="export.shift_primitive={blocks.0.attn.qkv: matshift, blocks.1.mlp.fc1: matshift}",
    check_images=96,  # the exporter's own calibration and check; the tests compare all 360 themselves
)


@pytest.fixture(scope="session")
def shiftadd_spec() -> SimpleNamespace:
    """What :func:`shiftadd_checkpoint` and :func:`artifact` are built from: ``assignment``, ``costs``,
    ``overrides``, ``forced`` (shift primitives) and ``check_images``."""
    return SHIFTADD


@pytest.fixture(scope="session")
def shiftadd_checkpoint(tmp_path_factory) -> Path:
    """A ``dse finetune``-format weights.pt (and resolved config) of the mixed ShiftAddViT."""
    from dse.checkpoints import architecture, build_dense
    from dse.config import save_config
    from dse.training.data import load_data
    from dse.training.finetune import fit_batch, reparam_options
    from dse.training.pretrain import pretrain
    from models.assignment import Assignment
    from models.hamming import fit_hamming
    from models.moe import moe_layers
    from models.reparam import reparameterize

    root = tmp_path_factory.getbasetemp() / "shiftadd"
    root.mkdir(exist_ok=True)
    cfg = load_config(None, [*SHIFTADD.overrides, f"out={root}"])
    pretrain(cfg, root / "dense", progress=False)
    dense = build_dense(cfg)
    models.load_weights(dense, root / "dense" / "weights.pt")
    plan = Assignment.from_dict(SHIFTADD.assignment)
    torch.manual_seed(0)
    model = reparameterize(dense, plan, costs=SHIFTADD.costs, **reparam_options(cfg)).eval()
    fit_hamming(model, fit_batch(load_data(cfg.data, cfg.seed), cfg))
    for _, layer in moe_layers(model):  # a fine-tuned router splits the tokens; a fresh one barely varies
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    folder = root / "finetune"
    folder.mkdir()
    meta = {"architecture": architecture(cfg), "assignment": plan.to_dict(), "costs": SHIFTADD.costs,
            "reparam": reparam_options(cfg), "dense_checkpoint": str(root / "dense" / "weights.pt")}
    torch.save({"model": model.state_dict(), "meta": meta}, folder / "weights.pt")
    save_config(cfg, folder)
    return folder


@pytest.fixture(scope="session")
def artifact(shiftadd_checkpoint, tmp_path_factory) -> Path:
    """``dse export`` through the CLI (CPU artifact and the compile-only CUDA companion)."""
    out = tmp_path_factory.getbasetemp() / "artifact" / "vit"
    out.parent.mkdir(exist_ok=True)
    args = ["export", "--checkpoint", str(shiftadd_checkpoint), "--out", str(out), "--set", SHIFTADD.forced,
            "--set", f"export.val_images={SHIFTADD.check_images}", "--json"]
    res = subprocess.run(_dse_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["folder"] == str(out)
    return out
