"""dse finetune: objective, costs policy, outputs, reload, exact resume after SIGKILL, fp32 fixed point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dse.checkpoints import architecture, build_dense, load_finetuned
from dse.errors import ConfigError, ProfileError
from dse.training.data import load_data
from dse.training.finetune import FinetuneObjective, distillation_loss, finetune
from dse.training.train import _amp_dtype, evaluate
from models.assignment import Assignment
from models.hamming import HammingAttention
from models.moe import moe_layers
from models.ops import kernel_ops
from models.reparam import reparameterize
from models.shift import ShiftLinear

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, tiny_cfg) -> Path:
    """A dense checkpoint in the format `dse pretrain` writes (random weights: mechanics, not accuracy)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_dense(cfg)
    path = tmp_path_factory.mktemp("dense") / "weights.pt"
    torch.save({"model": model.state_dict(), "meta": {"architecture": architecture(cfg), "stage": "pretrain"}},
               path)
    return path


# ---- the objective ---------------------------------------------------------------------------------


def test_distillation_loss_matches_hinton_formula_and_gradient():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    T = 2.5
    loss = distillation_loss(s, t, T)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(s.detach().numpy() / T), softmax(t.numpy() / T)
    expected = T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # d/dz_s [T^2 KL(p_t || p_s)] = T (p_s - p_t) / B (Hinton et al. 2015, eq. 2 before the T^2 rescale)
    np.testing.assert_allclose(s.grad.numpy(), T * (ps - pt) / 5, rtol=1e-4, atol=1e-7)
    assert distillation_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_objective_adds_weighted_kd_and_moe_balance(costs_for, tiny_cfg):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    dense = build_dense(cfg).eval()
    costs = costs_for(dense)
    student = reparameterize(dense, Assignment.uniform(dense, linear="moe"), costs=costs).train()
    x = torch.randn(4, 3, 16, 16)
    logits = student(x)
    objective = FinetuneObjective(dense, kd_weight=0.3, temperature=2.0, moe_coef=0.05, with_moe=True)
    loss, terms = objective(student, x, logits, torch.zeros(4, dtype=torch.long))

    # independent: KD from the formula, the balance loss from each layer's statistics and costs
    with torch.no_grad():
        t = dense(x)
    kd = (F.softmax(t / 2, 1) * (F.log_softmax(t / 2, 1) - F.log_softmax(logits / 2, 1))).sum(1).mean() * 4
    balance = 0.0
    for name, layer in moe_layers(student):
        importance, load = layer._stats
        c = torch.tensor([costs[name]["mult"], costs[name]["shift"]], dtype=importance.dtype)
        for v in (c * importance, c * load):
            balance += (v.var() / v.mean() ** 2).item()
    assert terms["kd_loss"] == pytest.approx(kd.item(), rel=1e-5)
    assert terms["moe_balance"] == pytest.approx(balance, rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * kd.item() + 0.05 * balance, rel=1e-5)


# ---- costs policy ----------------------------------------------------------------------------------


def test_moe_without_costs_is_an_error(tmp_path, dense_ckpt, costs_for, tiny_cfg):
    cfg = tiny_cfg("finetune.epochs=1")
    with pytest.raises(ProfileError, match="does not exist"):
        finetune(cfg, tmp_path / "a", checkpoint=dense_ckpt, profile=tmp_path / "missing.csv", progress=False)
    dense = build_dense(cfg)
    partial = dict(list(costs_for(dense).items())[:-1])
    with pytest.raises(ProfileError, match="no entry"):
        finetune(cfg, tmp_path / "b", checkpoint=dense_ckpt, costs=partial, progress=False)
    with pytest.raises(ConfigError, match="checkpoint"):
        finetune(cfg, tmp_path / "c", progress=False)


def test_all_shift_needs_no_profile_and_resume_refuses_another_assignment(tmp_path, dense_ckpt, costs_for,
                                                                           linear_names, tiny_cfg):
    from dse.errors import CheckpointError

    cfg = tiny_cfg("finetune.epochs=1")
    dense = build_dense(cfg)
    Assignment.uniform(dense, attention="msa", linear="shift").to_yaml(tmp_path / "shift.yaml")
    summary = finetune(cfg, tmp_path / "out", checkpoint=dense_ckpt, assignment=tmp_path / "shift.yaml",
                       progress=False)
    model, meta = load_finetuned(tmp_path / "out" / "weights.pt")
    assert meta["costs"] == {} and summary["moe_layers"] == 0
    assert all(isinstance(model.get_submodule(n), ShiftLinear) for n in linear_names(dense))
    with pytest.raises(CheckpointError, match="another assignment"):
        finetune(cfg, tmp_path / "out", checkpoint=dense_ckpt, costs=costs_for(dense), resume=True, progress=False)


# ---- the stage end to end ----------------------------------------------------------------------------


def test_finetune_outputs_metrics_and_reload(tmp_path, dense_ckpt, costs_for, tiny_cfg):
    cfg = tiny_cfg("finetune.epochs=2")
    dense = build_dense(cfg)
    costs = costs_for(dense)
    out = tmp_path / "ft"
    summary = finetune(cfg, out, checkpoint=dense_ckpt, costs=costs, progress=False)
    for name in ("weights.pt", "checkpoint.pt", "metrics.csv", "assignment.yaml", "resolved_config.yaml"):
        assert (out / name).exists(), name
    assert Assignment.from_yaml(out / "assignment.yaml") == Assignment.uniform(dense, "hamming", "moe")

    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert {"kd_loss", "moe_balance", "routing_gap"} <= set(metrics.columns)
    # a share is a count of the epoch's training tokens (every image, every token) over their number
    tokens = len(load_data(cfg.data, cfg.seed).train) * (dense.patch_embed.num_patches + dense.num_prefix_tokens)
    for name, c in costs.items():
        assert metrics[f"eq_share/{name}"].iloc[-1] == pytest.approx(c["shift"] / (c["mult"] + c["shift"]))
        routed = metrics[f"mult_share/{name}"].iloc[-1] * tokens
        assert routed == pytest.approx(round(routed), abs=1e-6 * tokens)

    model, meta = load_finetuned(out / "weights.pt")
    assert not model.training
    assert meta["costs"] == costs and meta["val_acc"] == summary["val_acc"]
    assert meta["dense_val_acc"] == summary["dense_val_acc"]
    assert isinstance(model.get_submodule("blocks.0.attn"), HammingAttention)
    assert bool(model.get_submodule("blocks.0.attn").fitted)
    for name, layer in moe_layers(model):
        assert layer.expert_costs.tolist() == [costs[name]["mult"], costs[name]["shift"]]
    saved = torch.load(out / "weights.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    data = load_data(cfg.data, cfg.seed)
    with kernel_ops("off"):
        assert evaluate(model, data.val, 256)["acc"] == pytest.approx(meta["val_acc"])
    # the shares in the summary are the last epoch's training shares
    assert summary["routing_end"] == pytest.approx({n: metrics[f"mult_share/{n}"].iloc[-1] for n in costs})


def test_hashing_fit_is_deterministic_and_saved(tmp_path, dense_ckpt, costs_for, tiny_cfg):
    cfg = tiny_cfg("finetune.epochs=0")
    dense = build_dense(cfg)
    states = []
    for run in ("a", "b"):
        finetune(cfg, tmp_path / run, checkpoint=dense_ckpt, costs=costs_for(dense), progress=False)
        states.append(torch.load(tmp_path / run / "weights.pt", weights_only=True)["model"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    unfitted = reparameterize(dense, Assignment.uniform(dense, "hamming", "mult")).state_dict()
    assert bool(states[0]["blocks.0.attn.fitted"]) and not bool(unfitted["blocks.0.attn.fitted"])
    assert not torch.equal(states[0]["blocks.0.attn.projection"], unfitted["blocks.0.attn.projection"])


def test_load_finetuned_rejects_a_dense_checkpoint(dense_ckpt):
    from dse.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a fine-tuned"):
        load_finetuned(dense_ckpt)


# ---- resume after SIGKILL ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, dense_ckpt, costs_for, tiny_cfg,
                                                             finetune_cli_args, write_cost_table):
    """`dse finetune` in a subprocess (so SIGKILL is real), killed during epoch 2, then `--resume`."""
    costs_json = write_cost_table(tmp_path / "costs.json", costs_for(build_dense(tiny_cfg())))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}

    def start(out: Path, *extra: str) -> subprocess.Popen:
        argv = finetune_cli_args(out, dense_ckpt, costs_json, "finetune.epochs=3")
        return subprocess.Popen([sys.executable, "-m", "dse", *argv, *extra],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(proc: subprocess.Popen) -> None:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr

    finish(start(tmp_path / "full"))
    part = tmp_path / "part"
    proc = start(part)
    deadline = time.time() + 600
    while not (part / "checkpoint.pt").exists():  # epoch 1 is saved: epoch 2 is running now
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    time.sleep(0.05)  # inside epoch 2 (a tiny epoch takes ~0.3 s on a quiet machine)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (part / "weights.pt").exists(), "the run finished before it was killed"
    assert len(pd.read_csv(part / "metrics.csv")) < 3
    finish(start(part, "--resume"))

    a, b = pd.read_csv(tmp_path / "full" / "metrics.csv"), pd.read_csv(part / "metrics.csv")
    cols = [c for c in a.columns if c != "epoch_s"]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
    wa = torch.load(tmp_path / "full" / "weights.pt", weights_only=True)
    wb = torch.load(part / "weights.pt", weights_only=True)
    for key, value in wa["model"].items():
        assert torch.equal(value, wb["model"][key]), key
    assert wa["meta"]["val_acc"] == wb["meta"]["val_acc"]


# ---- the CLI ------------------------------------------------------------------------------------------


def test_cli_missing_profile_is_one_line_usage_error(tmp_path, dense_ckpt, dse_cli, finetune_tiny):
    sets = [a for s in finetune_tiny for a in ("--set", s)]
    res = dse_cli("finetune", *sets, "--checkpoint", str(dense_ckpt), "--profile", str(tmp_path / "nope.csv"),
                  "--out", str(tmp_path / "o"), env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "dse profile" in res.stderr


# ---- mixed precision ------------------------------------------------------------------------------------


def test_amp_policy_and_fp32_fixed_point_under_autocast():
    assert _amp_dtype("bf16", "cpu") is None and _amp_dtype("off", "cuda") is None
    assert _amp_dtype("fp16", "cuda") is torch.float16 and _amp_dtype("bf16", "cuda:1") is torch.bfloat16
    with pytest.raises(ConfigError):
        _amp_dtype("fp8", "cuda")
    torch.manual_seed(0)
    layer = ShiftLinear(16, 8).train()
    x = (torch.randn(4, 16) * 8).to(torch.bfloat16)  # |x| >= 1: x * 2^16 overflows fp16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32
    # reference in float64: fixed-point grid floor(x 2^16) / 2^16 of the fp32 input, power-of-two weights
    xq = torch.floor(x.double() * 2**16) / 2**16
    w = layer.weight.detach().double()
    e = torch.log2(w.abs().clamp_min(2.0**-16)).round().clamp(-14, 0)
    wq = torch.sign(w) * (w.abs() >= 2.0**-15) * torch.exp2(e)
    ref = xq @ wq.T + layer.bias.detach().double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_finetune_on_cuda_with_bf16_autocast(tmp_path, dense_ckpt, costs_for, tiny_cfg):
    cfg = tiny_cfg("finetune.epochs=1", "device=cuda", "finetune.amp=bf16")
    dense = build_dense(cfg)
    summary = finetune(cfg, tmp_path / "gpu", checkpoint=dense_ckpt, costs=costs_for(dense), progress=False)
    metrics = pd.read_csv(tmp_path / "gpu" / "metrics.csv")
    assert np.isfinite(metrics["train_loss"]).all() and summary["epochs"] == 1


def test_moe_expert_costs_come_from_any_devices_profile(tmp_path):
    """Fine-tune here, deploy there: the balance loss is weighted by the profile given, whatever its device."""
    from dse.config import load_config
    from dse.cost.sources import cost_model_for
    from dse.training.finetune import resolve_costs
    from tests.conftest import GPU_DEVICE, GPU_TARGET, write_profile

    cfg = load_config(None, ["model.kwargs={depth: 1}", "data.img_size=16"])
    here = write_profile(tmp_path / "profiles", cfg=cfg)
    gpu = write_profile(tmp_path / "profiles", cfg=cfg, device=GPU_DEVICE, target=GPU_TARGET,
                        seconds_per_mac=2e-11, overhead_ms=0.01)
    dense = build_dense(cfg)
    plan = Assignment.uniform(dense, linear="moe")
    mine, theirs = (resolve_costs(cfg, dense, plan, profile=p) for p in (here, gpu))
    assert set(theirs) == set(plan.linear) and theirs != mine
    priced = cost_model_for(cfg, dense, gpu)
    assert theirs == {name: priced.moe_expert_costs(name) for name in theirs}
