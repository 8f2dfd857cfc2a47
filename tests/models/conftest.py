"""Fixtures of the models tests: the custom ops on their PyTorch backend, a fixed seed, one thread, and
shared builders (so no test module imports another)."""

from collections.abc import Callable

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _op_reference_backend():
    """Run the shiftadd custom ops on their PyTorch backend (same semantics as the TVM kernels, which are
    compiled per shape and tested in tests/kernels); tests that want TVM re-enable it locally."""
    try:
        from kernels.torch_ops import use_tvm
    except ImportError:
        yield
        return
    with use_tvm(False):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny tensors: one intra-op thread avoids OpenMP barrier stalls on a shared machine
    (10x slower per op with 2 threads under load, measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def vit_digits() -> Callable[..., nn.Module]:
    """``vit_digits(**kwargs)``: the embedded model's architecture, built directly from timm (independent of
    the registry)."""
    from timm.models.vision_transformer import VisionTransformer

    def build(**kwargs) -> nn.Module:
        args = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10)
        args.update(kwargs)
        return VisionTransformer(**args)

    return build


@pytest.fixture
def op_registered() -> Callable[[str], bool]:
    """``op_registered(name)``: whether ``torch.ops.shiftadd`` has the custom op ``name``."""

    def registered(name: str) -> bool:
        try:
            import kernels.torch_ops  # noqa: F401
        except ImportError:
            return False
        return hasattr(torch.ops.shiftadd, name)

    return registered
