"""What a benchmark job times: :func:`prepare` turns a job spec into checked, timeable steps.

The one definition of a measurement, shared by the runner's worker process
(``himnet-fast bench`` / ``scale``) and the pytest-benchmark suites in ``bench/``: build the
inputs and the provider's module or op function, check agreement with the reference
(:mod:`himnet_fast.reference`) on the same inputs, then hand out, per mode, a zero-argument
callable that is what gets timed, with its cost estimates.

A job spec is the dict the runner writes (``runner.plan``); :func:`prepare` reads ``what``,
``provider``, ``modes``, ``preset`` (a name), ``num_nodes``, ``batch_size``, ``device`` and the
optional ``check`` (default True), ``check_max_nodes`` (1024) and ``check_nodes`` (256). A
failed check raises :class:`PrepareFailed` (an exception during it, with where) or
:class:`Disagreement` (the provider's answer is off); other exceptions (building the inputs
or the module, e.g. out of memory) propagate unchanged.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional


def short(exc: BaseException, limit: int = 300) -> str:
    """One line naming ``exc``, at most ``limit`` characters (for a result row's reason)."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


class JobFailed(Exception):
    """The job cannot be timed in ``modes``; ``skipped`` maps the modes that were dropped
    before the failure (see :attr:`Prepared.skipped`) to their reason."""

    def __init__(self, message: str, modes: List[str], skipped: Dict[str, str]):
        super().__init__(message)
        self.modes, self.skipped = list(modes), dict(skipped)


class PrepareFailed(JobFailed):
    """``error`` was raised ``during`` a stage of the preparation ("building the function",
    "in the first call", "in the agreement check")."""

    def __init__(self, during: str, error: BaseException, modes: List[str], skipped: Dict[str, str]):
        super().__init__(f"{during}: {short(error)}", modes, skipped)
        self.during, self.error = during, error


class Disagreement(JobFailed):
    """The provider's output (or a gradient) is further from the reference than the tolerance."""

    def __init__(self, err: float, check_n: int, tolerance: float, modes: List[str], skipped: Dict[str, str]):
        super().__init__(f"disagrees with the reference: max relative error {err:.3g} > {tolerance:g}",
                         modes, skipped)
        self.err, self.check_n = err, check_n


@dataclass
class Step:
    """One timeable call: ``fn()`` is exactly what is timed in ``mode``.

    ``flops`` / ``nbytes``: algorithmic cost of one call (None where not estimated);
    ``first_call_ms``: the provider's first call in the preparation (it includes compilation),
    None when the preparation made none for this mode (the timer's warm-up then stands in)."""

    mode: str
    fn: Callable[[], object]
    flops: Optional[float]
    nbytes: Optional[float]
    first_call_ms: Optional[float]


@dataclass
class Prepared:
    """A job after its agreement check. ``modes``: the modes that can be timed, ``skipped``:
    the others with the reason; ``max_rel_err`` / ``check_n``: the check's result and graph size
    (None without a check). For the model, ``module`` and ``inputs`` are the provider's."""

    what: str
    provider: str
    modes: List[str]
    skipped: Dict[str, str]
    max_rel_err: Optional[float]
    check_n: Optional[int]
    make_step: Callable[[str], Step]
    module: object = None
    inputs: Dict = field(default_factory=dict)

    def step(self, mode: str) -> Step:
        """The step of ``mode``, built now (for an op's backward: the forward graph it
        differentiates, so drop the step to free it)."""
        if mode not in self.modes:
            raise ValueError(f"{self.what}/{self.provider} cannot time mode {mode!r}: "
                             f"{self.skipped.get(mode, 'not among the modes of the job')}")
        return self.make_step(mode)


def prepare(spec: dict) -> Prepared:
    """Build and check the job ``spec`` (see the module docstring); the model's job has one mode."""
    from . import providers as P

    if spec["what"] == P.MODEL:
        return _prepare_model(spec)
    return _prepare_op(spec)


def _setting(spec: dict):
    import torch

    from ..presets import get_preset

    return get_preset(spec["preset"]), int(spec["num_nodes"]), int(spec["batch_size"]), torch.device(spec["device"])


# --------------------------------------------------------------------------- the model

def model_pair_error(provider: str, preset, n: int, batch: int, device, mode: str, module=None,
                     step=None, inputs=None) -> tuple:
    """Largest relative error of ``provider`` against the reference (the output, and in train
    mode every parameter gradient) and the duration of the provider's call in ms (its first:
    it includes compilation). Builds its own models when ``module`` is None."""
    from . import providers as P

    if module is None:
        inputs = P.model_inputs(preset, n, batch, device, seed=1)
        module = P.build_module(provider, preset, n, device)
        P.set_mode(module, mode)
        step = P.model_step(P.maybe_compile(provider, module), list(module.parameters()), inputs, mode)
    # The same teacher-forcing setting as the provider's model (a "-notf" provider has it off).
    ref = P.build_module("reference" + (P.NO_TF if provider.endswith(P.NO_TF) else ""), preset, n, device)
    ref.load_state_dict(module.state_dict())
    P.set_mode(ref, mode)
    want = P.model_step(ref, list(ref.parameters()), inputs, mode)()
    t0 = time.perf_counter()
    got = step()
    got_ms = (time.perf_counter() - t0) * 1e3
    err = P.max_rel_err(got, want)
    if mode == "train":
        ref_params = dict(ref.named_parameters())
        for name, p in module.named_parameters():
            err = max(err, P.max_rel_err(p.grad, ref_params[name].grad))
            p.grad = None
    del ref, want, got
    gc.collect()
    return err, got_ms


def _prepare_model(spec: dict) -> Prepared:
    from . import providers as P

    preset, n, batch, device = _setting(spec)
    provider, modes = spec["provider"], list(spec["modes"])
    if len(modes) != 1:
        # one process per mode in the runner: each mode's memory peak is its own
        raise ValueError(f"a model job has one mode, got {modes}")
    mode = modes[0]
    inputs = P.model_inputs(preset, n, batch, device)
    module = P.build_module(provider, preset, n, device)
    P.set_mode(module, mode)
    eager = P.model_step(P.maybe_compile(provider, module), list(module.parameters()), inputs, mode)
    # A captured provider is checked through the same module run eagerly in its precision, then
    # timed as graph replays.
    def in_precision():
        with P.precision(provider):
            return eager()
    step = in_precision if provider in P.CAPTURED else eager
    err, check_n, first_ms = None, None, None
    if spec.get("check", True) and provider != "reference":
        try:
            if n <= int(spec.get("check_max_nodes", 1024)):
                check_n = n
                err, first_ms = model_pair_error(provider, preset, n, batch, device, mode, module, step, inputs)
            else:  # the reference would not fit: check the same code on a smaller graph
                check_n = int(spec.get("check_nodes", 256))
                err, _ = model_pair_error(provider, preset, check_n, min(batch, 2), device, mode)
        except Exception as exc:  # noqa: BLE001 - the caller decides (a result row, a skip)
            raise PrepareFailed("in the agreement check", exc, modes, {}) from exc
        if not err <= P.tolerance_of(provider):
            raise Disagreement(err, check_n, P.tolerance_of(provider), modes, {})
    if provider in P.CAPTURED:
        try:
            t0 = time.perf_counter()
            step = P.captured_step(module, inputs, mode, provider)
            step()  # the first call captures
            first_ms = (time.perf_counter() - t0) * 1e3
        except Exception as exc:  # noqa: BLE001
            raise PrepareFailed("capturing the CUDA graph", exc, modes, {}) from exc
    flops = P.model_flops(preset, n, batch, mode)
    return Prepared(spec["what"], provider, modes, {}, err, check_n,
                    lambda m: Step(m, step, flops, None, first_ms), module=module, inputs=inputs)


# --------------------------------------------------------------------------- single ops

def _prepare_op(spec: dict) -> Prepared:
    import torch

    from . import providers as P

    preset, n, batch, device = _setting(spec)
    provider, what, modes = spec["provider"], spec["what"], list(spec["modes"])
    case = P.op_case(what, preset, n, batch, device)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in case.inputs.items()}
    skipped: Dict[str, str] = {}
    try:
        fn = P.op_function(provider, what)
    except Exception as exc:  # noqa: BLE001
        raise PrepareFailed("building the function", exc, modes, skipped) from exc

    def forward():
        return fn(**leaves)

    err, check_n, dy = None, None, None
    try:
        t0 = time.perf_counter()
        try:
            out = forward()
        except NotImplementedError as exc:
            if provider != "flex" or "backward" not in str(exc):
                raise
            # FlexAttention has no backward on CPU: measure its forward without autograd.
            for k in leaves:
                leaves[k] = leaves[k].detach()
            skipped = {m: short(exc) for m in modes if m != "forward"}
            modes = [m for m in modes if m == "forward"]
            out = forward()
        first_ms = (time.perf_counter() - t0) * 1e3
        dy = torch.randn_like(out)
        if spec.get("check", True) and provider != "reference":
            check_n = n
            ref_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in case.inputs.items()}
            want = P.op_function("reference", what)(**ref_leaves)
            err = P.max_rel_err(out, want)
            if out.requires_grad:
                want.backward(dy)
                out.backward(dy)
                for k in leaves:
                    err = max(err, P.max_rel_err(leaves[k].grad, ref_leaves[k].grad))
            del want, ref_leaves
        del out
    except Exception as exc:  # noqa: BLE001
        raise PrepareFailed("in the agreement check" if dy is not None else "in the first call", exc,
                            modes, skipped) from exc
    if err is not None and not err <= P.tolerance():
        raise Disagreement(err, check_n, P.tolerance(), modes, skipped)

    def clear():
        for v in leaves.values():
            v.grad = None

    def make_step(mode: str) -> Step:
        clear()
        if mode == "forward":
            fn_mode, scale = forward, 1.0
        elif mode == "backward":
            held = forward()  # the graph to differentiate; built before timing, so not timed

            def fn_mode():
                clear()
                held.backward(dy, retain_graph=True)
            scale = 2.0
        elif mode == "full":
            def fn_mode():
                clear()
                forward().backward(dy)
            scale = 3.0
        else:
            raise ValueError(f"mode must be one of {P.OP_MODES} for an op, got {mode!r}")
        # minimum bytes moved: the forward's once, the backward's and a full step's twice
        return Step(mode, fn_mode, case.flops * scale, case.bytes * (scale if scale < 3 else 2.0),
                    first_ms if mode == "forward" else None)

    return Prepared(what, provider, modes, skipped, err, check_n, make_step)
