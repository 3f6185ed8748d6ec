"""Finds and loads the compiled CUDA extension ``himnet_fast._cuda_ext`` (built from csrc/).

The extension is optional: ``pip install`` builds it only where nvcc, CMake and pybind11 are
found (docs/cuda.md). This module loads it once, remembers why it could not, and answers the
backend's ``check``: the reason is part of every error an explicit ``backend="cuda"`` raises.

``$HIMNET_FAST_CUDA_EXT`` may name a built ``_cuda_ext*.so`` to load instead of the packaged
one (a development build directory, or the test that builds the module with CMake).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Dict, Optional

ENV_PATH = "HIMNET_FAST_CUDA_EXT"
BUILD_HINT = ("build it with `HIMNET_FAST_BUILD_CUDA=1 pip install -e . --no-build-isolation` "
              "(needs nvcc, cmake and pybind11; see docs/cuda.md)")

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_loaded = False
_device_reason: Dict[int, Optional[str]] = {}


def load_from(path: str) -> ModuleType:
    """Import a built extension from a file path (its module name stays ``_cuda_ext``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ENV_PATH}={path!r} is not a file")
    spec = importlib.util.spec_from_file_location("himnet_fast._cuda_ext", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load a Python extension from {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> Optional[ModuleType]:
    """The extension module, or None (then :func:`load_error` says why). Loads once."""
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        path = os.environ.get(ENV_PATH)
        try:
            _module = load_from(path) if path else importlib.import_module("himnet_fast._cuda_ext")
        except Exception as exc:  # ImportError, or a module built for another Python/ABI
            _module = None
            where = f"from ${ENV_PATH}={path!r}" if path else "himnet_fast._cuda_ext"
            _error = f"cannot import {where} ({type(exc).__name__}: {exc})"
    return _module


def load_error() -> Optional[str]:
    load()
    return _error


def device_reason(index: int) -> Optional[str]:
    """None when the loaded extension can run on CUDA device ``index``; else why not (no
    driver, a driver older than the toolkit the module was built with, or no kernel image
    for the GPU's architecture). Probed once per device."""
    if index not in _device_reason:
        module = load()
        if module is None:
            return f"extension not built: {_error}"
        try:
            module.probe(index)
            _device_reason[index] = None
        except RuntimeError as exc:
            _device_reason[index] = (f"the extension (CUDA {_fmt_version(module.cuda_version)}, "
                                     f"archs {module.cuda_archs}) cannot run on cuda:{index}: {exc}")
    return _device_reason[index]


def _fmt_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def info() -> str:
    """One line for `himnet-fast info`-style reports."""
    module = load()
    if module is None:
        return f"not built: {_error}"
    return f"built with CUDA {_fmt_version(module.cuda_version)} for archs {module.cuda_archs}"


def _reset() -> None:
    """Forget the cached module and probes (tests switch $HIMNET_FAST_CUDA_EXT)."""
    global _module, _error, _loaded
    _module, _error, _loaded = None, None, False
    _device_reason.clear()
