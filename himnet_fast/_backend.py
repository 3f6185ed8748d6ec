"""Backend registry and selection: the one dispatch mechanism of every op.

Each op module (``himnet_fast/ops/<op>.py``) registers, next to its code, one implementation
per backend that can run it: ``register(op, backend, forward, backward, check=...)``. Its
PyTorch custom op takes the backend's *name* as an argument and runs :func:`impl` of it, so
the choice is made once, in Python, where the op is called (:func:`resolve`), and the
registered op itself is a plain function of tensors that ``torch.compile`` and CUDA graphs
treat like any other.

Rules (docs/design.md, "Backends"):

* ``backend=None`` or ``"auto"`` uses ``$HIMNET_FAST_BACKEND`` if set, otherwise the backend
  that measured fastest for the op on the tensors' device (:data:`AUTO_ORDER`; the evidence is
  in ``bench/results/``).
* An explicit backend that cannot run raises :class:`BackendUnavailableError` naming why.
* A backend without a backward for an op that needs gradients hands over to the next one
  that has it, with one warning per (op, backend) pair.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda")
# Automatic choice on CUDA, per op, by measurement only (bench/results/gpu-h100/, one H100,
# PEMS07 preset, each provider in its own process):
# * torch first for everything measured at N = 883, B = 16: the training step (91 ms against
#   281 ms for triton and 294 ms for cuda), inference (28 ms; cuda 40, triton 56), and each
#   op forward and backward (meta_linear "ST" 1.8 ms vs 3.1, adaptive propagation 0.7 ms vs 4.8).
#   The cuda kernels are FMA-only (no tensor cores) and never measured fastest.
# * triton first for the streamed adaptive product (graphs above HIMNET_FAST_DENSE_BUDGET_MB,
#   which only that path reaches): a training step at N = 20,000, B = 1 took 2.58 s with it
#   against 3.84 s with torch's row-blocked streaming.
# A new measurement that changes a ranking changes this table, not a guess.
AUTO_ORDER = {
    "cuda": {"adaptive_matmul": ("triton", "torch")},
    "cpu": {},
}
_AUTO_DEFAULT = ("torch",)
ENV_VAR = "HIMNET_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run for the given tensors."""


def _always(device: torch.device) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    ``forward`` and ``backward`` take the op's validated arguments (the op module documents
    them); ``backward`` is None for a forward-only (inference) implementation. ``check``
    returns None when the backend can run on ``device``, else the reason it cannot.
    """

    forward: Callable
    backward: Optional[Callable]
    check: Callable[[torch.device], Optional[str]]

    @property
    def has_backward(self) -> bool:
        return self.backward is not None


_REGISTRY: Dict[Tuple[str, str], Impl] = {}
_WARNED: set = set()


def register(op: str, backend: str, forward: Callable, backward: Optional[Callable] = None, *,
             check: Optional[Callable[[torch.device], Optional[str]]] = None) -> None:
    """Register ``backend``'s implementation of ``op`` (called by the op's own module)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY[(op, backend)] = Impl(forward, backward, check or _always)


def impl(op: str, backend: str) -> Impl:
    """The registered implementation (no availability check: :func:`resolve` made it)."""
    return _REGISTRY[(op, backend)]


def normalize_backend(backend: Optional[str]) -> Optional[str]:
    """Map None/"auto"/the environment variable to a concrete backend name, or None
    (automatic). Raises ValueError for an unknown name, TypeError for a non-string."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    else:
        source = "backend"
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    name = backend.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS} or None, got {backend!r}")
    return name


def check_backend_arg(backend: Optional[str]) -> Optional[str]:
    """A module's ``backend=`` argument, checked when the module is built (so a typo fails there,
    not at the first forward): its normalised name, or None (automatic: ``$HIMNET_FAST_BACKEND``
    is then read when the ops run)."""
    return None if backend is None else normalize_backend(backend)


def unavailable_reason(op: str, backend: str, device: torch.device) -> Optional[str]:
    impl_ = _REGISTRY.get((op, backend))
    if impl_ is None:
        return f"backend {backend!r} does not implement {op} (is it installed? see `himnet-fast info`)"
    return impl_.check(device)


def resolve(op: str, backend: Optional[str], device: torch.device, needs_grad: bool) -> str:
    """The name of the backend that runs ``op`` for tensors on ``device``.

    Raises BackendUnavailableError when an explicitly requested backend cannot run there.
    """
    name = normalize_backend(backend)
    if name is not None:
        reason = unavailable_reason(op, name, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run on {device}: {reason}")
        if needs_grad and not _REGISTRY[(op, name)].has_backward:
            return _fallback_for_grad(op, name, device)
        return name
    for cand in auto_order(op, device):
        if unavailable_reason(op, cand, device) is None:
            if needs_grad and not _REGISTRY[(op, cand)].has_backward:
                continue
            return cand
    raise BackendUnavailableError(f"{op}: no backend can run on {device}")  # torch always can


def auto_order(op: str, device: torch.device) -> Tuple[str, ...]:
    """Backends ``backend=None`` tries for ``op`` on ``device``, first choice first."""
    return AUTO_ORDER.get(device.type, {}).get(op, _AUTO_DEFAULT)


def _fallback_for_grad(op: str, name: str, device: torch.device) -> str:
    for cand in ("triton", "torch"):
        if cand == name:
            continue
        impl_ = _REGISTRY.get((op, cand))
        if impl_ is not None and impl_.has_backward and impl_.check(device) is None:
            key = (op, name, cand)
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"himnet_fast: backend {name!r} has no backward for {op}; "
                              f"using {cand!r} while gradients are needed", stacklevel=4)
            return cand
    raise BackendUnavailableError(f"{op}: backend {name!r} has no backward and no fallback can run on {device}")


def available_backends(device: Optional[torch.device | str] = None) -> list:
    """Backends that can run every op they implement on ``device`` (default: CUDA if present,
    else CPU). An op a backend does not implement runs on another (torch implements all), so it
    does not count against it: the CUDA extension has no SBA attention, and is still available
    for HimNet.

    ``"triton"`` counts on CPU only when ``TRITON_INTERPRET=1`` is set.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    return [b for b in BACKENDS if _ops_of(b) and all(unavailable_reason(op, b, device) is None for op in _ops_of(b))]


def _ops_of(backend: str) -> list:
    """The ops ``backend`` implements, sorted."""
    return sorted(op for op, b in _REGISTRY if b == backend)


def backend_report() -> Dict[str, str]:
    """For `himnet-fast info`: each backend and either "available" or the reason it is not."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {}
    for b in BACKENDS:
        ops = _ops_of(b)
        reasons = [r for r in (unavailable_reason(op, b, device) for op in ops) if r]
        if not ops:
            reasons = [f"backend {b!r} implements no op"]
        report[b] = "available on " + str(device) if not reasons else reasons[0]
    return report
