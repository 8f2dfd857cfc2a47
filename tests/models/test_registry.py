"""Model construction and weight surgery: resizing a ViT's weights to another image size."""

from __future__ import annotations

import pytest
import torch

import models
from models.errors import ModelError


def _vit(img_size: int, **kw):
    torch.manual_seed(0)
    return models.create("vit_digits", img_size=img_size, patch_size=4, embed_dim=16, depth=1, num_heads=2, **kw)


@pytest.mark.parametrize("class_token", [True, False])
def test_load_resized_keeps_weights_and_resamples_a_linear_position_embedding(class_token):
    pool = {} if class_token else {"global_pool": "avg"}
    small, big = _vit(16, class_token=class_token, **pool), _vit(32, class_token=class_token, **pool)  # grids 4->8
    prefix = 1 if class_token else 0
    # a position embedding linear in the patch centre's (row, col): bicubic resampling reproduces a linear
    # function where its 4x4 support stays inside the grid (the centre 2x2 of the new 8x8 grid)
    def linear(grid: int) -> torch.Tensor:
        c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid  # [grid] patch centres in [0, 1]
        rows, cols = torch.meshgrid(c, c, indexing="ij")
        return (3.0 * rows - 2.0 * cols).reshape(1, grid * grid, 1).expand(1, grid * grid, 16)  # [1, g*g, C]
    with torch.no_grad():
        small.pos_embed[:, prefix:] = linear(4)
        if prefix:
            small.pos_embed[:, :1] = 7.0
    models.load_resized(big, small)
    want = linear(8).reshape(8, 8, 16)[3:5, 3:5]
    got = big.pos_embed[0, prefix:].reshape(8, 8, 16)[3:5, 3:5]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    if prefix:
        assert torch.all(big.pos_embed[0, 0] == 7.0)  # the class token's embedding is not resampled
    for name, p in small.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(big.state_dict()[name], p), name


def test_load_resized_refuses_another_architecture():
    with pytest.raises(ModelError, match="not the same architecture"):
        models.load_resized(_vit(32), models.create("vit_digits", img_size=16, patch_size=4, embed_dim=32, depth=1,
                                                    num_heads=2))
