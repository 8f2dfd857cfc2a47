"""Which implementation of the two ShiftAdd products a layer runs: kernel custom op or PyTorch reference.

The custom ops live in ``kernels.torch_ops`` (namespace ``shiftadd``):

* ``shift_linear(x f32[b,m,k], shift int8[n,k], sign int8[n,k], frac_bits) -> f32[b,m,n]``
* ``matadd(mask f32[b,k,m] in {0,1}, v f32[b,k,n]) -> f32[b,m,n]``

Training always runs the differentiable PyTorch reference (straight-through estimators need it);
inference (``module.eval()``) runs the op when the module-level mode allows it:

* ``"auto"`` (default): the op if ``kernels.torch_ops`` registers it, else the reference;
* ``"on"``: the op, and a :class:`~models.errors.ModelError` if it is not registered;
* ``"off"``: always the reference (e.g. to compare the two paths).

Switch with :func:`set_kernel_ops` or, scoped, ``with kernel_ops("off"): ...``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator

import torch

from models.errors import ModelError

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
_mode = "auto"
_imported: bool | None = None  # None: not tried yet


def set_kernel_ops(mode: str) -> None:
    """Set the process-wide inference path: ``"auto"``, ``"on"`` or ``"off"`` (see module docstring)."""
    global _mode
    if mode not in MODES:
        raise ModelError(f"unknown kernel-ops mode '{mode}'; use one of {', '.join(MODES)}")
    _mode = mode


def kernel_ops_mode() -> str:
    return _mode


@contextlib.contextmanager
def kernel_ops(mode: str) -> Iterator[None]:
    """Temporarily set the inference path (restored on exit, also on error)."""
    previous = _mode
    set_kernel_ops(mode)
    try:
        yield
    finally:
        set_kernel_ops(previous)


def _registered(name: str) -> Callable | None:
    global _imported
    if _imported is None:
        try:
            importlib.import_module("kernels.torch_ops")
            _imported = True
        except ImportError as exc:  # the kernels package may be absent in a stripped install
            log.debug("kernels.torch_ops unavailable (%s); using PyTorch references", exc)
            _imported = False
    try:
        return getattr(torch.ops.shiftadd, name)
    except (AttributeError, RuntimeError):
        return None


def resolve(name: str, training: bool) -> Callable | None:
    """The op to run for ``name`` now, or ``None`` for the PyTorch reference."""
    if training or _mode == "off":
        return None
    op = _registered(name)
    if op is None and _mode == "on":
        raise ModelError(f"kernel op shiftadd.{name} is not registered; check that kernels.torch_ops imports, "
                         "or use models.ops.set_kernel_ops('auto')")
    return op


def fp32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off where it is on; a no-op otherwise, so an exported graph (no autocast) carries
    no ``wrap_with_autocast`` region around the custom ops."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def matadd_reference(mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out[b,m,n] = sum_k mask[b,k,m] * v[b,k,n]`` (``matadd`` of :mod:`kernels.primitives`), differentiable
    in both."""
    return torch.bmm(mask.transpose(1, 2), v)  # [b, m, k] @ [b, k, n] -> [b, m, n]


def matadd(mask: torch.Tensor, v: torch.Tensor, training: bool) -> torch.Tensor:
    """Masked accumulate through the kernel op at inference, the reference in training."""
    op = resolve("matadd", training)
    if op is None:
        return matadd_reference(mask, v)
    return op(mask.contiguous(), v.contiguous())
