import pandas as pd
import pytest
import torch

import models
from dse.checkpoints import build_dense
from dse.config import load_config
from dse.errors import ConfigError
from dse.training.data import load_data
from dse.training.pretrain import pretrain, train_spec
from dse.training.train import cosine_lambda, evaluate, load_training_state, train


def _tiny_cfg(**extra):
    overrides = ["data.img_size=16", "model.kwargs={patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}",
                 "data.augment=false", "pretrain.warmup_epochs=0", "pretrain.lr=0.003"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_cosine_schedule_shape():
    f = cosine_lambda(total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert abs(f(0) - 0.1) < 1e-9 and abs(f(9) - 1.0) < 1e-9
    assert abs(f(10) - 1.0) < 1e-9 and abs(f(100) - 0.1) < 1e-9
    assert f(55) < f(20)


def test_one_epoch_lowers_the_loss(tmp_path):
    cfg = _tiny_cfg(**{"pretrain.epochs": 1, "data.batch_size": 16})
    data = load_data(cfg.data, cfg.seed)
    torch.manual_seed(0)
    model = build_dense(cfg)
    before = evaluate(model, data.train, 512)["loss"]
    train(model, data, train_spec(cfg), tmp_path, progress=False)
    after = evaluate(model, data.train, 512)["loss"]
    assert after < before - 0.05, (before, after)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics["epoch"]) == [1] and {"val_acc", "train_loss", "lr"} <= set(metrics.columns)


def test_resume_continues_exactly(tmp_path):
    cfg = _tiny_cfg(**{"pretrain.epochs": 3})
    data = load_data(cfg.data, cfg.seed)
    torch.manual_seed(0)
    full = build_dense(cfg)
    train(full, data, train_spec(cfg), tmp_path / "full", progress=False)

    torch.manual_seed(0)  # same initial weights as the uninterrupted run
    part = build_dense(cfg)
    train(part, data, train_spec(cfg), tmp_path / "part", progress=False, until_epoch=1)
    assert load_training_state(tmp_path / "part" / "checkpoint.pt")["epoch"] == 0
    resumed = build_dense(cfg)  # a fresh process would start from new weights
    train(resumed, data, train_spec(cfg), tmp_path / "part", progress=False, resume=True)
    a = pd.read_csv(tmp_path / "full" / "metrics.csv")
    b = pd.read_csv(tmp_path / "part" / "metrics.csv")
    assert a["val_acc"].tolist() == b["val_acc"].tolist()
    assert a["train_loss"].tolist() == b["train_loss"].tolist()
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_pretrain_with_one_seed_gives_one_dense_model(tmp_path):
    """The seed fixes the initial weights too, whatever the process's RNG did before (two `make run`s once
    produced different dense models from the same seed: the model was built before seeding)."""
    cfg = _tiny_cfg(**{"pretrain.epochs": 1, "data.batch_size": 32})
    weights = []
    for i, junk in enumerate((1, 2)):
        torch.manual_seed(1000 + junk)  # a different RNG state before each run
        torch.rand(junk)
        pretrain(cfg, tmp_path / f"run{i}", progress=False)
        weights.append(torch.load(tmp_path / f"run{i}" / "weights.pt", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_progressive_resizing_starts_the_full_size_model_from_the_low_res_phase(tmp_path):
    """pretrain.low_res: the low-resolution phase trains in its own folder and its weights, position
    embedding resampled, are where the full-size phase starts (with 0 full-size epochs: what it ends with)."""
    cfg = _tiny_cfg(**{"pretrain.epochs": 0, "pretrain.low_res": 8, "pretrain.low_res_epochs": 2,
                       "data.batch_size": 64})
    pretrain(cfg, tmp_path, progress=False)
    assert len(pd.read_csv(tmp_path / "low_res_8px" / "metrics.csv")) == 2
    low = models.create("vit_digits", img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    models.load_weights(low, tmp_path / "low_res_8px" / "weights.pt")
    untrained = build_dense(cfg)
    want = models.load_resized(build_dense(cfg), low).state_dict()
    got = torch.load(tmp_path / "weights.pt", weights_only=True)["model"]
    assert got["pos_embed"].shape == untrained.pos_embed.shape == (1, 17, 32)  # 4x4 patches + cls at 16 px
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert not torch.equal(got["blocks.0.mlp.fc1.weight"], untrained.state_dict()["blocks.0.mlp.fc1.weight"])


def test_progressive_resizing_needs_a_smaller_image_size():
    with pytest.raises(ConfigError, match="pretrain.low_res"):
        _tiny_cfg(**{"pretrain.low_res_epochs": 2, "pretrain.low_res": 16})
