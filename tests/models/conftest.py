import pytest
import torch


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
