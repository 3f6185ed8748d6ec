"""The "triton" backend: what its ops share, and the table that registers them.

Each op's Triton code lives in one module of ``himnet_fast.kernels`` (``kernels/`` in the
source tree), top to bottom: the ``@triton.jit`` kernels, the launchers (allocation, grids,
block sizes), the autograd Function, and the backend entry registered here (:data:`OPS`):

===============  ===========================  ==========================================
op               module                       Function -> entry
===============  ===========================  ==========================================
meta_linear      kernels/meta_linear.py       MetaLinearFunction -> triton_meta_linear
adaptive_matmul  kernels/adaptive_matmul.py   AdaptiveMatmulFunction -> triton_adaptive_matmul
gcru_gate        kernels/gcru.py              GcruGateFunction -> triton_gcru_gate
gcru_update      kernels/gcru.py              GcruUpdateFunction -> triton_gcru_update
===============  ===========================  ==========================================

This module keeps what they share: :func:`_check`, the ``check`` of every registration, which
names why Triton cannot run (the package is missing, the device is neither CUDA nor CPU, or a
CPU tensor arrives without ``TRITON_INTERPRET=1``, the interpreter CI runs the kernels in), and
:func:`allow_meta` for ahead-of-time compilation. The kernel module is imported when its op
first runs on this backend, so ``import himnet_fast`` works without Triton and pays no Triton
start-up cost. The entries promote mixed input dtypes (``_utils.promote``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional

import torch

from .. import _backend

_TRITON_ERROR: Optional[str] = None
_TRITON_CHECKED = False
# Set only by :func:`allow_meta` (ahead-of-time compilation, himnet_fast.aot): meta tensors are
# then accepted so the real launchers compute grids and constexprs without any data.
_ALLOW_META = False


@contextlib.contextmanager
def allow_meta():
    """Accept meta tensors on the "triton" backend inside the block (for AOT compilation only:
    launches must compile, not run, which :mod:`himnet_fast.aot` arranges)."""
    global _ALLOW_META
    old, _ALLOW_META = _ALLOW_META, True
    try:
        yield
    finally:
        _ALLOW_META = old


def _triton_import_error() -> Optional[str]:
    """None when ``import triton`` works, else the reason (checked once)."""
    global _TRITON_ERROR, _TRITON_CHECKED
    if not _TRITON_CHECKED:
        _TRITON_CHECKED = True
        try:
            importlib.import_module("triton")
        except Exception as exc:  # ImportError, or a broken install raising at import
            _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return _TRITON_ERROR


def _check(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else why not (every op's ``check``)."""
    err = _triton_import_error()
    if err is not None:
        return err
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "meta" and _ALLOW_META:
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if device.type == "cpu":
        if not interpret:
            return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                    "triton (slow; meant for tests)")
        # triton.jit picks interpreter or compiler when a kernel is defined: kernels imported
        # before the variable was set cannot run CPU tensors.
        mod = importlib.import_module("himnet_fast.kernels.gcru")
        if type(mod._gcru_gate_fwd_kernel).__name__ != "InterpretedFunction":
            return ("himnet_fast.kernels was imported before TRITON_INTERPRET=1 was set; set it before "
                    "the first Triton op runs")
        return None
    return f"device type {device.type!r} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"


# op -> (module in himnet_fast.kernels, backend entry in it). The entries take the op's
# validated arguments, as the other backends' implementations do.
OPS = {
    "meta_linear": ("meta_linear", "triton_meta_linear"),
    "adaptive_matmul": ("adaptive_matmul", "triton_adaptive_matmul"),
    "gcru_gate": ("gcru", "triton_gcru_gate"),
    "gcru_update": ("gcru", "triton_gcru_update"),
}


def entry(op: str):
    """The backend entry of ``op`` (imports its kernel module, and with it Triton)."""
    module, name = OPS[op]
    return getattr(importlib.import_module(f"himnet_fast.kernels.{module}"), name)


def _lazy(op: str):
    """A stand-in for ``entry(op)`` that imports the kernel module on its first call only."""
    fn = None

    def run(*args):
        nonlocal fn
        if fn is None:
            fn = entry(op)
        return fn(*args)

    module, name = OPS[op]
    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"himnet_fast.kernels.{module}.{name}, imported on first call."
    return run


for _op in OPS:
    _backend.register(_op, "triton", _lazy(_op), check=_check)
