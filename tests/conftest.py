"""Test configuration.

Without a CUDA device, Triton kernels run in the interpreter on CPU tensors; TRITON_INTERPRET
must be set before Triton is imported, so it is set here, first. GPU tests are marked ``gpu``
and skip cleanly on a machine without one.
"""
import contextlib
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


HAS_TRITON = _triton_ok()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def parity_backends():
    """Backends the parity tests run on this machine: torch always, triton where it can run
    (CUDA, or the interpreter on CPU)."""
    out = ["torch"]
    if HAS_TRITON:
        from himnet_fast import _backend
        if _backend.unavailable_reason("meta_linear", "triton", DEVICE) is None:
            out.append("triton")
    return out


@contextlib.contextmanager
def tf32_matmul(enabled: bool):
    """Set PyTorch's fp32-matmul TF32 switch for the block and restore it after.

    Uses the current API (``torch.backends.cuda.matmul.fp32_precision``) where PyTorch has it:
    after that API has been used, touching the legacy ``allow_tf32`` raises, so a test that
    set the legacy flag would break every later test."""
    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", None) is not None:
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = enabled
        try:
            yield
        finally:
            matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny shapes (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared, loaded CPU, OpenMP
    threads spin-waiting against other processes made millisecond steps take seconds.
    Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||`` (Frobenius), the parity tests' measure."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
