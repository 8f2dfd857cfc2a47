"""Data-parallel training with two CPU processes (gloo) under torchrun (slow: each test starts the launcher
and two Python processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from dse.checkpoints import architecture, build_dense, load_finetuned
from dse.training.data import load_data
from dse.training.train import evaluate
from models.ops import kernel_ops

ROOT = Path(__file__).resolve().parents[3]

_WORKER = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from dse.config import load_config
from dse.training.data import load_data
from dse.training.distributed import process_group, rank
from dse.training.pretrain import train_spec
from dse.checkpoints import build_dense
from dse.training.train import train

out = Path(sys.argv[1])
cfg = load_config(None, json.loads(sys.argv[2]))
with process_group("cpu") as device:
    torch.manual_seed(123 + rank())  # different initial weights per rank: DDP must broadcast rank 0's
    model = build_dense(cfg)
    row = train(model, load_data(cfg.data, cfg.seed), train_spec(cfg), out, device=device, progress=False)
    torch.save(model.state_dict(), out / f"rank{rank()}.pt")
    (out / f"rank{rank()}.json").write_text(json.dumps({"row": row, "world": dist.get_world_size()}))
"""


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # The worker script lives in tmp_path, so this checkout goes on the path explicitly (an installed copy of
    # the package elsewhere must not answer for it).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_ranks_stay_identical_and_share_metrics(tmp_path):
    overrides = ["data.img_size=16", "data.augment=true", "pretrain.epochs=2", "pretrain.warmup_epochs=0",
                 "pretrain.lr=0.005",
                 "model.kwargs={patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}", "data.batch_size=64"]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    res = torchrun(str(script), str(tmp_path), json.dumps(overrides))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # same start (broadcast) and the same averaged gradients
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert rows[0]["world"] == 2
    # each rank trained on its own half; the reported training loss/accuracy are summed over both ranks
    for key in ("train_loss", "train_acc", "val_acc"):
        assert rows[0]["row"][key] == rows[1]["row"][key], key
    # rank 0 alone wrote the files, with its (= everyone's) final weights
    saved = torch.load(tmp_path / "weights.pt", weights_only=True)["model"]
    for key in r0:
        assert torch.equal(saved[key], r0[key]), key
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2] and metrics["train_loss"].iloc[1] < metrics["train_loss"].iloc[0]


def test_torchrun_finetune_two_processes_then_load_single_process(tmp_path, tiny_cfg, costs_for, write_cost_table,
                                                                 finetune_cli_args):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    dense = build_dense(cfg)
    ckpt = tmp_path / "dense.pt"
    torch.save({"model": dense.state_dict(), "meta": {"architecture": architecture(cfg)}}, ckpt)
    costs_json = write_cost_table(tmp_path / "costs.json", costs_for(dense))
    out = tmp_path / "ft"
    res = torchrun("-m", "dse", *finetune_cli_args(out, ckpt, costs_json, "finetune.epochs=1"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)  # rank 0 alone prints: exactly one JSON document
    assert summary["processes"] == 2 and summary["epochs"] == 1

    model, meta = load_finetuned(out / "weights.pt")  # this (single) process, no process group
    assert not torch.distributed.is_initialized()
    data = load_data(cfg.data, cfg.seed)
    with kernel_ops("off"):
        acc = evaluate(model, data.val, 256)["acc"]
    assert acc == pytest.approx(meta["val_acc"]) and meta["val_acc"] == pytest.approx(summary["val_acc"])
    metrics = pd.read_csv(out / "metrics.csv")
    # routing shares are summed over both ranks' tokens
    assert len(metrics) == 1 and all(0 <= metrics[f"mult_share/{n}"].iloc[0] <= 1 for n in meta["costs"])
