"""Backend registry and selection.

Every op (``meta_linear``, ``adaptive_matmul``, ``gcru_gate``, ``gcru_update``) has one
implementation per backend. A backend registers itself with :func:`register`; the op asks
:func:`resolve` which one to run for the tensors at hand.

Rules (docs/design.md, "Public contract"):

* ``backend=None`` or ``"auto"`` uses ``$HIMNET_FAST_BACKEND`` if set, otherwise the backend
  that measured fastest for the op on the tensors' device (:data:`AUTO_ORDER`; the evidence is
  in ``bench/results/gpu-h100/``).
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
#   281 ms for triton and 294 ms for cuda), inference (28 ms; cuda 40, triton 56), and each op
#   forward and backward (meta_linear "ST" 1.8 ms vs 3.1, adaptive propagation 0.7 ms vs 4.8).
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


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    ``fn`` takes the op's validated arguments. ``has_backward`` says whether gradients flow
    through it. ``check`` returns None when the backend can run on ``device``, else a reason.
    """

    fn: Callable
    has_backward: bool
    check: Callable[[torch.device], Optional[str]]


_REGISTRY: Dict[Tuple[str, str], Impl] = {}
_WARNED: set = set()


def register(op: str, backend: str, fn: Callable, *, has_backward: bool = True,
             check: Optional[Callable[[torch.device], Optional[str]]] = None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY[(op, backend)] = Impl(fn, has_backward, check or (lambda device: None))


def _ensure_loaded() -> None:
    # Optional backends register themselves on import; importing here (not at package import)
    # keeps `import himnet_fast` fast and free of Triton/CUDA start-up costs.
    from . import _optional_backends  # noqa: F401


def normalize_backend(backend: Optional[str]) -> Optional[str]:
    """Map None/"auto"/env var to a concrete name or None (automatic)."""
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


def unavailable_reason(op: str, backend: str, device: torch.device) -> Optional[str]:
    _ensure_loaded()
    impl = _REGISTRY.get((op, backend))
    if impl is None:
        return f"backend {backend!r} does not implement {op} (is it installed? see `himnet-fast info`)"
    return impl.check(device)


def resolve(op: str, backend: Optional[str], device: torch.device, needs_grad: bool) -> Tuple[str, Impl]:
    """Pick the implementation of ``op`` to run.

    Returns ``(backend_name, impl)``. Raises BackendUnavailableError when an explicitly
    requested backend cannot run on ``device``.
    """
    _ensure_loaded()
    name = normalize_backend(backend)
    if name is not None:
        reason = unavailable_reason(op, name, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run on {device}: {reason}")
        impl = _REGISTRY[(op, name)]
        if needs_grad and not impl.has_backward:
            return _fallback_for_grad(op, name, device)
        return name, impl
    order = auto_order(op, device)
    for cand in order:
        if unavailable_reason(op, cand, device) is None:
            impl = _REGISTRY[(op, cand)]
            if needs_grad and not impl.has_backward:
                continue
            return cand, impl
    raise BackendUnavailableError(f"{op}: no backend can run on {device}")  # torch always can


def auto_order(op: str, device: torch.device) -> Tuple[str, ...]:
    """Backends ``backend=None`` tries for ``op`` on ``device``, first choice first."""
    return AUTO_ORDER.get(device.type, {}).get(op, _AUTO_DEFAULT)


def _fallback_for_grad(op: str, name: str, device: torch.device) -> Tuple[str, Impl]:
    for cand in ("triton", "torch"):
        if cand == name:
            continue
        impl = _REGISTRY.get((op, cand))
        if impl is not None and impl.has_backward and impl.check(device) is None:
            key = (op, name, cand)
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"himnet_fast: backend {name!r} has no backward for {op}; "
                              f"using {cand!r} while gradients are needed", stacklevel=4)
            return cand, impl
    raise BackendUnavailableError(f"{op}: backend {name!r} has no backward and no fallback can run on {device}")


def available_backends(device: Optional[torch.device | str] = None) -> list:
    """Backends that can run every op on ``device`` (default: CUDA if present, else CPU).

    ``"triton"`` counts on CPU only when ``TRITON_INTERPRET=1`` is set.
    """
    _ensure_loaded()
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    ops = {op for (op, _) in _REGISTRY}
    out = []
    for b in BACKENDS:
        if all(unavailable_reason(op, b, device) is None for op in ops):
            out.append(b)
    return out


def backend_report() -> Dict[str, str]:
    """For `himnet-fast info`: each backend and either "available" or the reason it is not."""
    _ensure_loaded()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = sorted({op for (op, _) in _REGISTRY})
    report = {}
    for b in BACKENDS:
        reasons = [r for r in (unavailable_reason(op, b, device) for op in ops) if r]
        report[b] = "available on " + str(device) if not reasons else reasons[0]
    return report
