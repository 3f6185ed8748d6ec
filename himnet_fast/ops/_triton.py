"""What the ops' "triton" implementations share: whether Triton can run, and its launchers,
imported on first use.

Each op's Triton code lives in one module of ``himnet_fast.kernels`` (``kernels/`` in the
source tree): the ``@triton.jit`` kernels and their launchers (allocation, grids, block
sizes), nothing else. The op module registers those launchers as its "triton" forward and
backward through :func:`launcher`, which imports the kernel module when the op first runs on
this backend: ``import himnet_fast`` works without Triton and pays no Triton start-up cost.

:func:`check` is the ``check`` of every "triton" registration. It names why Triton cannot
run: the package is missing, the device is neither CUDA nor CPU, or a CPU tensor arrives
without ``TRITON_INTERPRET=1`` (the interpreter CI runs the kernels in). :func:`allow_meta`
lets ahead-of-time compilation (:mod:`himnet_fast.aot`) run the real launchers on meta
tensors.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Optional

import torch

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


def check(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else why not."""
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


def launcher(module: str, name: str) -> Callable:
    """``himnet_fast.kernels.<module>.<name>``, imported on its first call only."""
    fn = None

    def run(*args, **kwargs):
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(f"himnet_fast.kernels.{module}"), name)
        return fn(*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.__module__ = f"himnet_fast.kernels.{module}"
    run.__doc__ = f"himnet_fast.kernels.{module}.{name}, imported on first call."
    return run
