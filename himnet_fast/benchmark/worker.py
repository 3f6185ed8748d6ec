"""One benchmark job in a fresh process: ``python -m himnet_fast.benchmark.worker JOB.json OUT.jsonl``.

A job is one kernel and one provider at one graph size (for the model, one mode). The worker
has :func:`.steps.prepare` build the inputs and check agreement with the reference (the same
preparation the pytest-benchmark suites in ``bench/`` use), warms up (torch.compile compiles
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
from .steps import short as _short


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


# --------------------------------------------------------------------------- timing

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


def run(job: Job) -> None:
    """Prepare the job (:func:`.steps.prepare`: inputs, agreement check), then warm up and time
    each of its modes, one result row per mode; every failure is a row too."""
    from . import providers as P
    from .steps import Disagreement, PrepareFailed, prepare

    try:
        prepared = prepare(job.spec)
    except (PrepareFailed, Disagreement) as exc:
        for mode, reason in exc.skipped.items():
            job.emit(mode=mode, status="skipped", reason=reason)
        for mode in exc.modes:
            if isinstance(exc, PrepareFailed):
                job.fail(mode, exc.error, exc.during)
            else:
                job.emit(mode=mode, status="error", max_rel_err=exc.err, check_n=exc.check_n, reason=str(exc))
        return
    for mode, reason in prepared.skipped.items():
        job.emit(mode=mode, status="skipped", reason=reason)
    is_model = prepared.what == P.MODEL
    for mode in prepared.modes:
        step = None
        try:
            step = prepared.step(mode)
            warm_ms = job.warm(step.fn)
            extra = {}

            def breakdown():
                # Measured after the timed calls' peak: one more step, outside the peak window.
                extra.update(memory_breakdown(prepared.provider, prepared.module, prepared.inputs, mode))
            job.measure(step.fn, mode, step.flops, step.nbytes,
                        step.first_call_ms if step.first_call_ms is not None else warm_ms,
                        prepared.max_rel_err, prepared.check_n, after=breakdown if is_model else None, extra=extra)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a result row
            job.fail(mode, exc, "while timing" if is_model else f"timing {mode}")
        del step
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
        job = Job(spec, argv[1])
        run(job)
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
