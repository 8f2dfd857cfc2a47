"""Datasets: scikit-learn's digits (embedded, ships with the package) and ImageFolder for real users.

Digits: 1,797 8x8 grey images in [0, 16], upsampled (bilinear) to ``img_size`` and repeated to 3
channels. Bilinear rather than nearest: with nearest upsampling every 4x4 patch is one flat pixel,
so a patch token carries a single scalar and the ViT learns several times slower. The train/val split
is stratified and seeded, so every command sees the same validation images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dse.config import DataConfig
from dse.errors import DataError

log = logging.getLogger(__name__)

DIGITS_MEAN, DIGITS_STD = 0.3, 0.4  # of x/16 over the whole set, rounded: keeps inputs ~unit scale


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    input_size: tuple[int, int, int]  # [C, H, W]
    # Batch-level augmentation for in-memory tensor datasets (None when the dataset transforms itself).
    augment: bool = False


def _digits_tensors(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)  # [N, 1, S, S]
    x = ((x - DIGITS_MEAN) / DIGITS_STD).repeat(1, 3, 1, 1)  # [N, 3, S, S]
    y = torch.tensor(digits.target, dtype=torch.long)
    return x, y


def digits_split(val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split of the 1,797 digits indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    idx = list(range(len(target)))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=target)
    return sorted(train_idx), sorted(val_idx)


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    if cfg.name == "digits":
        x, y = _digits_tensors(cfg.img_size)
        train_idx, val_idx = digits_split(cfg.val_fraction, seed)
        return DataBundle(
            train=TensorDataset(x[train_idx], y[train_idx]),
            val=TensorDataset(x[val_idx], y[val_idx]),
            num_classes=10,
            input_size=(3, cfg.img_size, cfg.img_size),
            augment=cfg.augment,
        )
    return _imagefolder(cfg)


def _imagefolder(cfg: DataConfig) -> DataBundle:
    root = Path(cfg.path or "")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"data folder {root / split} does not exist; data.path must hold train/ and val/ "
                            "ImageFolder trees")
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    train_tf = create_transform(cfg.img_size, is_training=cfg.augment)
    val_tf = create_transform(cfg.img_size, is_training=False)
    try:
        train, val = ImageFolder(root / "train", train_tf), ImageFolder(root / "val", val_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read ImageFolder data under {root}: {str(exc).splitlines()[0]}") from None
    return DataBundle(train=train, val=val, num_classes=len(train.classes),
                      input_size=(3, cfg.img_size, cfg.img_size), augment=False)


def epoch_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                 workers: int = 0, sampler=None) -> DataLoader:
    """A loader whose order depends only on (seed, epoch): resuming at an epoch boundary is exact."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if sampler is not None:
        sampler.set_epoch(epoch)
        shuffle = False
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=gen,
                      num_workers=workers, drop_last=False)


def augment_batch(x: torch.Tensor, gen: torch.Generator, max_shift: float = 0.125,
                  max_rotate_deg: float = 10.0, max_scale: float = 0.1) -> torch.Tensor:
    """Random small affine transform per image (digits are centred; shifts/rotations generalise)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_rotate_deg)  # [b]
    scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * max_scale  # [b]
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * max_shift * 2  # [b, 2] in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [b, H, W, 2]
    background = x.amin(dim=(1, 2, 3), keepdim=True)  # pad with the image's own background level
    return F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + background
