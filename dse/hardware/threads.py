"""Thread counts of the two runtimes: PyTorch's intra-op pool and TVM's thread pool.

Importing this module imports neither torch nor TVM (:mod:`dse.deploy.artifact`, which must stay torch-free,
uses it); the functions that touch a runtime import it themselves.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kernels.targets import host_num_cores


def use_all_cores(cores: int | None = None) -> None:
    """Give TVM's thread pool one thread per usable core unless ``TVM_NUM_THREADS`` says otherwise.

    Without it TVM 0.27 halves ``hardware_concurrency()`` on x86 to skip hyper-threads, so a 2-vCPU
    machine runs every parallel loop on one thread (measured: 12.0 vs 6.9 ms for the embedded model).
    TVM reads the variable when its pool starts (the first parallel loop of the process), so this must run
    before any compiled code does.
    """
    if cores is None:
        cores = host_num_cores()
    os.environ.setdefault("TVM_NUM_THREADS", str(max(1, int(cores))))


def tvm_threads() -> int:
    """Threads TVM's pool runs parallel loops on in this process."""
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def set_torch_threads(threads: int) -> None:
    """PyTorch's intra-op threads; 0 keeps PyTorch's default (all cores)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``threads`` (0: unchanged) inside the block, restored after it."""
    import torch

    previous = torch.get_num_threads()
    set_torch_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def set_threads(threads: int) -> None:
    """The same number of threads for PyTorch and TVM (0: PyTorch's default, all cores). TVM's pool reads
    ``TVM_NUM_THREADS`` when its first parallel loop runs, so this must come before compiled code runs."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["TVM_NUM_THREADS"] = str(threads)
    else:
        use_all_cores(torch.get_num_threads())


__all__ = ["set_threads", "set_torch_threads", "torch_threads", "tvm_threads", "use_all_cores"]
