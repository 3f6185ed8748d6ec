"""One benchmark job in a fresh process: ``python -m himnet_fast.benchmark.worker JOB.json OUT.jsonl``.

A job is one kernel and one provider at one graph size (for the model, one mode). The worker
builds the inputs, checks agreement with the reference, warms up (torch.compile compiles
here), then times ``repeats`` calls with the peak-memory meter reset just before them. Each
result is appended to OUT.jsonl as soon as it exists, so a process killed later (out of
memory) still leaves its earlier rows. A fresh process per job keeps the peak resident set of
one provider free of another's.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

from .schema import make_row


def _set_memory_limit(limit_gb) -> None:
    if not limit_gb:
        return
    import resource

    limit = int(float(limit_gb) * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    msg = str(exc).lower()
    return "can't allocate memory" in msg or "out of memory" in msg or "cannot allocate memory" in msg


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


class Job:
    def __init__(self, spec: dict, out_path: str):
        import torch

        from ..presets import get_preset
        from . import metrics

        self.spec = spec
        self.out_path = out_path
        self.device = torch.device(spec["device"])
        self.preset = get_preset(spec["preset"])
        self.n = int(spec["num_nodes"])
        self.batch = int(spec["batch_size"])
        self.repeats = int(spec.get("repeats", 3))
        self.warmup = int(spec.get("warmup", 1))
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        self.env = metrics.environment(self.device)
        self.peak_tflops, self.peak_gbps = metrics.device_peaks(self.device)
        if self.device.type == "cuda" and spec.get("memory_limit_gb"):
            total = torch.cuda.get_device_properties(self.device).total_memory
            frac = min(1.0, float(spec["memory_limit_gb"]) * (1 << 30) / total)
            torch.cuda.set_per_process_memory_fraction(frac, self.device)

    def emit(self, **fields) -> None:
        row = make_row(kernel=self.spec["what"], provider=self.spec["provider"], x_name="N", x=self.n,
                       batch_size=self.batch, preset=self.preset.name, load_avg=os.getloadavg()[0],
                       **self.env, **fields)
        with open(self.out_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def measure(self, fn, mode: str, flops, nbytes, first_call_ms, max_err, check_n, after=None,
                extra=None) -> None:
        """Time ``fn``; ``after()`` runs once the peak is read and may fill ``extra`` (more
        columns of the row, e.g. the memory breakdown)."""
        from . import metrics

        mem = metrics.MemoryMeter(self.device)
        mem.start()
        times = metrics.time_calls(fn, self.device, self.repeats)
        base, peak_abs, peak_inc = mem.stop()
        if after is not None:
            after()
        p20, p50, p80 = metrics.quantiles(times)
        sec = p50 / 1e3
        tflops = flops / sec / 1e12 if flops else None
        gbps = nbytes / sec / 1e9 if nbytes else None
        self.emit(mode=mode, status="ok", p20=p20, p50=p50, p80=p80, repeats=self.repeats,
                  first_call_ms=first_call_ms, peak_mem_mb=peak_inc, peak_mem_abs_mb=peak_abs,
                  mem_baseline_mb=base, mem_kind=mem.kind,
                  samples_per_s=self.batch / sec if mode in ("train", "infer") else None,
                  tflops=tflops, gbps=gbps,
                  pct_peak_tflops=100 * tflops / self.peak_tflops if tflops and self.peak_tflops else None,
                  pct_peak_gbps=100 * gbps / self.peak_gbps if gbps and self.peak_gbps else None,
                  max_rel_err=max_err, check_n=check_n, **(extra or {}))

    def fail(self, mode: str, exc: BaseException, during: str) -> None:
        provider = self.spec["provider"]
        if is_oom(exc):
            self.emit(mode=mode, status="oom", reason=f"out of memory {during}: {_short(exc, 200)}")
        elif "-compile" in provider or provider == "flex":
            # A provider that cannot compile this program is unavailable, not wrong.
            self.emit(mode=mode, status="skipped", reason=f"torch.compile failed {during}: {_short(exc)}")
        else:
            self.emit(mode=mode, status="error", reason=f"{during}: {_short(exc)}")

    def warm(self, fn) -> float:
        """Run the warm-up calls; the first call's duration in ms (it includes compilation),
        None with ``warmup=0``."""
        from . import metrics

        first = None
        for _ in range(self.warmup):
            t0 = time.perf_counter()
            fn()
            metrics.synchronize(self.device)
            first = (time.perf_counter() - t0) * 1e3 if first is None else first
        return first


# --------------------------------------------------------------------------- model job

def _model_pair_error(provider: str, preset, n: int, batch: int, device, mode: str, module=None,
                      step=None, inputs=None) -> float:
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


def memory_breakdown(provider: str, module, inputs, mode: str) -> dict:
    """Where a training step's memory goes, in MiB: parameters, their gradients, the optimizer
    state Adam would add (exp_avg and exp_avg_sq: 2x the parameters; the benchmark step runs no
    optimizer, so this is computed, not measured), and the activations autograd keeps from the
    forward for the backward, measured in one extra step: the distinct storages packed through
    ``torch.autograd.graph.saved_tensors_hooks`` during the forward, parameters excluded.
    Not measured for compiled providers (the hooks would make torch.compile recompile)."""
    import numpy as np
    import torch

    from . import providers as P

    params = list(module.parameters())
    pbytes = sum(p.numel() * p.element_size() for p in params)
    out = dict(mem_params_mb=pbytes / 2**20)
    if mode != "train":
        return out
    out.update(mem_grads_mb=pbytes / 2**20, mem_adam_mb=2 * pbytes / 2**20)
    if "-compile" in provider:
        return out
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            saved[st.data_ptr()] = st.nbytes()
        return t

    x, y_cov, labels = inputs["x"], inputs["y_cov"], inputs["labels"]
    np.random.seed(0)
    # Only the forward under the hooks: what a recomputing op saves again inside its own
    # backward is transient, not kept from the forward.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (module(x, y_cov, labels, P.BATCHES_SEEN) - labels).abs().mean()
    out["mem_saved_mb"] = sum(saved.values()) / 2**20
    loss.backward()
    for p in params:
        p.grad = None
    return out


def run_model(job: Job) -> None:
    from . import providers as P

    spec, mode = job.spec, job.spec["modes"][0]
    provider = spec["provider"]
    inputs = P.model_inputs(job.preset, job.n, job.batch, job.device)
    module = P.build_module(provider, job.preset, job.n, job.device)
    P.set_mode(module, mode)
    params = list(module.parameters())
    step = P.model_step(P.maybe_compile(provider, module), params, inputs, mode)
    err, check_n, first_ms = None, None, None
    if spec.get("check", True) and provider != "reference":
        stage = "in the agreement check"
        try:
            if job.n <= int(spec.get("check_max_nodes", 1024)):
                check_n = job.n
                err, first_ms = _model_pair_error(provider, job.preset, job.n, job.batch, job.device, mode,
                                                  module, step, inputs)
            else:  # the reference would not fit: check the same code on a smaller graph
                check_n = int(spec.get("check_nodes", 256))
                err, _ = _model_pair_error(provider, job.preset, check_n, min(job.batch, 2), job.device, mode)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a result row
            job.fail(mode, exc, stage)
            return
        if not err <= P.tolerance():
            job.emit(mode=mode, status="error", max_rel_err=err, check_n=check_n,
                     reason=f"disagrees with the reference: max relative error {err:.3g} > {P.tolerance():g}")
            return
    try:
        warm_ms = job.warm(step)
        # Measured after the timed calls' peak: one more step, outside the peak window.
        extra = {}

        def breakdown():
            extra.update(memory_breakdown(provider, module, inputs, mode))
        job.measure(step, mode, P.model_flops(job.preset, job.n, job.batch, mode), None,
                    first_ms if first_ms is not None else warm_ms, err, check_n, after=breakdown,
                    extra=extra)
    except Exception as exc:  # noqa: BLE001
        job.fail(mode, exc, "while timing")


# --------------------------------------------------------------------------- op job

def run_op(job: Job) -> None:
    import torch

    from . import providers as P

    spec, provider, what = job.spec, job.spec["provider"], job.spec["what"]
    case = P.op_case(what, job.preset, job.n, job.batch, job.device)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in case.inputs.items()}
    try:
        fn = P.op_function(provider, what)
    except Exception as exc:  # noqa: BLE001
        for mode in spec["modes"]:
            job.fail(mode, exc, "building the function")
        return

    def forward():
        return fn(**leaves)

    err, check_n, first_ms = None, None, None
    dy = None
    modes = list(spec["modes"])
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
            for mode in [m for m in modes if m != "forward"]:
                job.emit(mode=mode, status="skipped", reason=_short(exc))
            modes = [m for m in modes if m == "forward"]
            out = forward()
        first_ms = (time.perf_counter() - t0) * 1e3
        dy = torch.randn_like(out)
        if spec.get("check", True) and provider != "reference":
            check_n = job.n
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
        for mode in modes:
            job.fail(mode, exc, "in the agreement check" if dy is not None else "in the first call")
        return
    if err is not None and not err <= P.tolerance():
        for mode in modes:
            job.emit(mode=mode, status="error", max_rel_err=err, check_n=check_n,
                     reason=f"disagrees with the reference: max relative error {err:.3g} > {P.tolerance():g}")
        return

    def clear():
        for v in leaves.values():
            v.grad = None

    for mode in modes:
        clear()
        held = None
        try:
            if mode == "forward":
                fn_mode, scale = forward, 1.0
            elif mode == "backward":
                held = forward()  # the graph to differentiate; its memory is in the baseline

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
            warm = job.warm(fn_mode)
            job.measure(fn_mode, mode, case.flops * scale, case.bytes * (scale if scale < 3 else 2.0),
                        first_ms if mode == "forward" else warm, err, check_n)
        except Exception as exc:  # noqa: BLE001
            job.fail(mode, exc, f"timing {mode}")
        del held
        gc.collect()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m himnet_fast.benchmark.worker JOB.json OUT.jsonl", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    _set_memory_limit(spec.get("memory_limit_gb") if spec.get("device", "cpu") == "cpu" else None)
    job = None
    try:
        from . import providers as P

        job = Job(spec, argv[1])
        if spec["what"] == P.MODEL:
            run_model(job)
        else:
            run_op(job)
    except BaseException as exc:  # noqa: BLE001 - the runner turns a missing row into a crash row
        if job is not None and is_oom(exc):
            for mode in spec["modes"]:
                job.emit(mode=mode, status="oom", reason=f"out of memory: {_short(exc, 200)}")
            return 0
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
