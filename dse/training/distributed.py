"""Multi-process data-parallel training under ``torchrun`` (``torch.distributed``).

``torchrun --nproc_per_node N -m dse finetune ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`process_group` turns that environment into an initialised process group — gloo for CPU training,
NCCL for CUDA (one GPU per process, ``cuda:LOCAL_RANK``) — and tears it down afterwards. Without those
variables it does nothing, so the same command runs single-process. :func:`dse.training.train.train` notices the
initialised group and wraps the model in DDP.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from dse.errors import ConfigError

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting the same variables)."""
    return all(k in os.environ for k in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_device(device: str) -> str:
    """This rank's torch device: ``cuda`` becomes ``cuda:LOCAL_RANK``; CPU stays ``cpu``."""
    kind = torch.device(device).type
    if kind == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


@contextlib.contextmanager
def process_group(device: str, timeout_s: float = 1800.0) -> Iterator[str]:
    """Initialise the process group if launched by torchrun; yields the device this rank trains on."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun")
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device is cuda but no GPU is visible; set device=cpu for a gloo (CPU) run")
        backend = "nccl"
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                              "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"data-parallel training supports cpu (gloo) and cuda (nccl), not '{device}'")
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    log.info("process group: rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), backend)
    try:
        yield rank_device(device)
    finally:
        dist.destroy_process_group()
