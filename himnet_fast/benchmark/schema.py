"""The long-format result row: one row per measurement (or per skipped / failed one).

``status`` is "ok" (a timing), "skipped" (provider unavailable; ``reason`` says why), "error"
(disagreement with the reference, or a crash), "oom" (out of memory: a result, not a crash) or
"timeout". Times are milliseconds, memory MiB; ``peak_mem_mb`` is the increase over the
baseline (model/inputs created), ``peak_mem_abs_mb`` the absolute peak of the worker process
(RSS on CPU, allocated memory on a GPU, see ``mem_kind``). ``load_avg`` is the machine's 1-minute
load average when the row was written: on a shared CPU, a load above the core count means the
timings were taken under contention.

Memory breakdown of a model training row (MiB; see ``worker.memory_breakdown``):
``mem_params_mb`` parameters, ``mem_grads_mb`` their gradients, ``mem_adam_mb`` the state an
Adam optimizer would add (2x the parameters, computed), ``mem_saved_mb`` activations saved by
the forward for the backward (measured with saved-tensor hooks; empty for compiled providers).
The rest of ``peak_mem_mb`` is transient buffers and, on CPU, heap the allocator keeps.
"""
from __future__ import annotations

COLUMNS = (
    "kernel", "provider", "mode", "metric", "x_name", "x", "batch_size", "preset", "status", "reason",
    "p20", "p50", "p80", "repeats", "first_call_ms", "peak_mem_mb", "peak_mem_abs_mb", "mem_baseline_mb",
    "mem_kind", "samples_per_s", "tflops", "pct_peak_tflops", "gbps", "pct_peak_gbps", "max_rel_err",
    "check_n", "mem_params_mb", "mem_grads_mb", "mem_adam_mb", "mem_saved_mb", "load_avg", "device", "torch", "triton", "cuda", "git_commit", "timestamp", "host",
)
STATUSES = ("ok", "skipped", "error", "oom", "timeout")


def make_row(**fields) -> dict:
    """A row with every column (missing ones empty); unknown names are a programming error."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns {sorted(unknown)}")
    if fields.get("status", "ok") not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {fields.get('status')!r}")
    row = {c: None for c in COLUMNS}
    row.update(fields)
    row.setdefault("metric", "time_ms")
    if row["metric"] is None:
        row["metric"] = "time_ms"
    return row
