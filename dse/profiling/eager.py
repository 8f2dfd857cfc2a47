"""Eager PyTorch's own time in a forward: what no per-op profile row measures.

In eager mode every module call and every op call pays interpreter and dispatcher time on top of its
kernel: ``nn.Module.__call__``, the model's Python between ops (timm's reshapes, checks, identity
modules), argument parsing, output allocation. A per-op row times one op in a tight loop, so the sum of a
dense model's rows misses this glue, which ``torch.profiler`` shows as time outside every aten op (a
sizeable share of a small model's forward).

It is measured as the model's forward on an **empty batch**: every module and op runs and allocates,
every kernel returns at once, so what is timed is the framework and the model's Python alone, whatever
the batch. (A tiny-width twin of the architecture gives more, because its 1-element kernels still
run; the empty batch is the one that needs no per-architecture knowledge.) The profile keys the row as
``framework`` (backend ``torch``) at ``(1, module calls per forward, 1, 1)``: it is the cost of the
model's structure, and two models with the same number of module calls are priced alike. The compiled
TVM model has no such layer (its VM's dispatch per call is negligible next to eager's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

FRAMEWORK = "framework"


def count_module_calls(model: nn.Module, forward: Callable[[], Any]) -> int:
    """How many ``nn.Module`` forward calls of ``model`` (itself included) one ``forward()`` makes."""
    calls = 0

    def hook(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return calls


def empty_batch_forward(model: nn.Module, input_size: tuple[int, int, int]) -> Callable[[], Any]:
    """A callable running ``model`` in inference mode on an empty batch of ``input_size`` images."""
    import torch

    x = torch.empty(0, *input_size)

    def forward() -> Any:
        with torch.inference_mode():
            return model(x)

    return forward
