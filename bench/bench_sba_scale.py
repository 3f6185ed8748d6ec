"""Peak memory and time of one training step against N: dense attention, the exact streamed
adaptive graph product, and SBA (METIS-partitioned attention).

Each (method, N) runs in its own subprocess, so one size's peak cannot hide another's. Peak
memory is the step's own: the process's resident-set high-water mark is reset (Linux
``/proc/self/clear_refs``) after inputs and partition are built, and the figure is
``VmHWM - VmRSS`` (bytes the step added on top of what was resident before it). Time is the
faster of two forward+backward steps (one when the first took over 10 s). The log-log slope of
memory against N is fitted per method (the exponent: 1 = linear, 2 = quadratic).

    python bench/bench_sba_scale.py                      # 1k, 4k, 16k, 64k (+256k, 1M for SBA)
    python bench/bench_sba_scale.py --sizes 1000 4000 --methods sba

Methods, one layer each, B=1, d=32 features, fp32, CPU:
* dense:    x -> q, k, v (linear) -> softmax(q kᵀ/√d) v over all N nodes (an N x N matrix).
* adaptive: himnet_fast.ops.adaptive_propagate(x, E, cheb_k=2, backend="torch", dense=False),
            E: (N, 16); the exact softmax(relu(E Eᵀ)) product streamed in row chunks.
* sba:      one SBA block (himnet_fast.models.sba.SBABlock): intra-part + inter-part attention,
            residual, layer norm, feed-forward, over a METIS partition of a 2-D grid graph
            into parts of about 64 nodes (partitioning time reported separately).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

D = 32
DEFAULT_SIZES = [1_000, 4_000, 16_000, 64_000, 256_000, 1_000_000]
# the dense N x N score matrix is held several times (scores, probabilities, their gradients)
DENSE_MAX_BYTES = 4 << 30


def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _grid_edges(n):
    import numpy as np
    w = int(math.ceil(math.sqrt(n)))
    idx = np.arange(n)
    c = idx % w
    right = idx[(c + 1 < w) & (idx + 1 < n)]
    down = idx[idx + w < n]
    return np.concatenate([np.stack([right, right + 1]), np.stack([down, down + w])], 1)


def measure_step(step, info):
    """Time ``step`` (the faster of two calls; one when the first took over 10 s) and its peak
    resident memory above what was resident before it; print ``info`` with the results as the
    child's RESULT line."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")          # reset the peak-RSS high-water mark (VmHWM) to the current RSS
    base = _status("VmRSS")
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if times[0] > 10:
            break
    info.update(step_s=min(times), peak_rss_mb=_status("VmHWM") / 2**20,
                step_mem_mb=(_status("VmHWM") - base) / 2**20, base_rss_mb=base / 2**20)
    print("RESULT " + json.dumps(info))


def _child(method, n, part_size):
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    info = dict(method=method, N=n)
    if method == "dense":
        x = torch.randn(1, n, D, requires_grad=True)
        lin = torch.nn.Linear(D, 3 * D)

        def step():
            q, k, v = lin(x).chunk(3, -1)
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
            (a @ v).sum().backward()
    elif method == "adaptive":
        from himnet_fast.ops import adaptive_propagate
        x = torch.randn(1, n, D, requires_grad=True)
        e = torch.randn(n, 16, requires_grad=True)

        def step():
            adaptive_propagate(x, e, 2, backend="torch", dense=False).sum().backward()
    else:
        from himnet_fast.models.sba import SBABlock
        from himnet_fast.partition import partition_graph
        t0 = time.perf_counter()
        part = partition_graph(max(1, n // part_size), edge_index=_grid_edges(n), num_nodes=n)
        info.update(partition_s=time.perf_counter() - t0, parts=part.num_parts, M=part.max_size)
        blk = SBABlock(part, D, heads=4)
        x = torch.randn(1, n, D, requires_grad=True)

        def step():
            blk(x).sum().backward()
    measure_step(step, info)


def run_child(row, args, timeout):
    """Run ``python args...`` (one measurement in a fresh process) and merge its RESULT line, or
    a note saying why there is none, and its wall time into ``row``."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                           env=_child_env())
        res = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if res:
            row.update(json.loads(res[0][7:]))
        else:
            row["note"] = "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1][:120]
    except subprocess.TimeoutExpired:
        row["note"] = f"timed out (> {timeout:.0f} s)"
    row["wall_s"] = time.perf_counter() - t0


def _child_env():
    # A fixed glibc mmap threshold: large buffers are mmapped and go back to the OS when freed.
    # Otherwise glibc raises the threshold after the first large frees (setup, partitioning)
    # and the step reuses that already-resident heap, hiding part of its memory from VmHWM.
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")


def _fit(rows, n_min=0):
    import numpy as np
    pts = [(r["N"], r["step_mem_mb"]) for r in rows if r.get("step_mem_mb", 0) > 0 and r["N"] >= n_min]
    if len(pts) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    ap.add_argument("--methods", nargs="+", default=["dense", "adaptive", "sba"],
                    choices=["dense", "adaptive", "sba"])
    ap.add_argument("--part-size", type=int, default=64, help="SBA nodes per part (about)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per (method, N)")
    ap.add_argument("--max-other", type=int, default=64_000,
                    help="largest N for dense/adaptive (SBA runs every size)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu" / "sba"))
    ap.add_argument("--command", help=argparse.SUPPRESS)
    ap.add_argument("--from-csv", help="rewrite the markdown (and exponents) from this CSV, run nothing")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a.child[0], int(a.child[1]), a.part_size)
    if a.from_csv:
        import csv
        rows = []
        for r in csv.DictReader(open(a.from_csv)):
            row = {k: v for k, v in r.items() if v != ""}
            for k in ("N", "parts", "M"):
                if k in row:
                    row[k] = int(row[k])
            for k in ("step_s", "step_mem_mb", "peak_rss_mb", "base_rss_mb", "partition_s", "wall_s"):
                if k in row:
                    row[k] = float(row[k])
            rows.append(row)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        return _write(rows, methods, Path(a.out), a.command or "")
    rows = []
    for method in a.methods:
        for n in a.sizes:
            row = dict(method=method, N=n)
            if method != "sba" and n > a.max_other:
                row["note"] = f"not run (N > --max-other {a.max_other})"
            elif method == "dense" and 3 * 4 * n * n > DENSE_MAX_BYTES:
                row["note"] = f"not run: ~{3 * 4 * n * n / 2**30:.0f} GiB of N x N buffers"
            else:
                run_child(row, [__file__, "--part-size", str(a.part_size), "--child", method, str(n)],
                          a.timeout)
            print(json.dumps(row), flush=True)
            rows.append(row)
    _write(rows, a.methods, Path(a.out), " ".join(argv if argv is not None else sys.argv[1:]))


def _linear(rows, n_min=16_000):
    """Least-squares ``memory = a + b*N`` over N >= n_min: (a MiB, b MiB per 1,000 nodes)."""
    import numpy as np
    pts = [(r["N"], r["step_mem_mb"]) for r in rows if r.get("step_mem_mb", 0) > 0 and r["N"] >= n_min]
    if len(pts) < 2:
        return float("nan"), float("nan")
    b, a = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
    return float(a), float(b * 1000)


def write_csv(rows, path):
    """The measured rows as CSV (floats to 4 significant digits, missing values empty)."""
    cols = ["method", "N", "step_s", "step_mem_mb", "peak_rss_mb", "base_rss_mb", "parts", "M",
            "partition_s", "wall_s", "note"]
    with open(path, "w") as f:
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join(("" if r.get(c) is None else
                              (f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r[c])).replace(",", ";"))
                             for c in cols) + "\n")


def write_md_table(f, rows):
    """The measured rows as a markdown table into the open file ``f``."""
    f.write("| method | N | step (s) | step memory (MiB) | peak RSS (MiB) | parts x M | partition (s) | note |\n")
    f.write("|---|---:|---:|---:|---:|---|---:|---|\n")
    for r in rows:
        g = lambda c, fmt: (fmt.format(r[c]) if c in r else "")
        pm = f"{r['parts']} x {r['M']}" if "parts" in r else ""
        f.write(f"| {r['method']} | {r['N']} | {g('step_s', '{:.3g}')} | {g('step_mem_mb', '{:.1f}')} | "
                f"{g('peak_rss_mb', '{:.0f}')} | {pm} | {g('partition_s', '{:.2f}')} | {r.get('note', '')} |\n")


def _write(rows, methods, out, command):
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sba_scale_cpu.csv")
    exps = {m: (_fit([r for r in rows if r["method"] == m]),
                _fit([r for r in rows if r["method"] == m], 16_000),
                _fit([r for r in rows if r["method"] == m], 64_000)) for m in methods}
    with open(out / "sba_scale_cpu.md", "w") as f:
        f.write("# One training step against N (CPU, 1 thread, B=1, d=32, fp32)\n\n")
        f.write("Command: `python bench/bench_sba_scale.py " + command + "`\n\n")
        write_md_table(f, rows)
        f.write("\nFitted exponent of step memory against N (log-log slope over the sizes that ran; "
                "small sizes are dominated by fixed allocations (chunk buffers, allocator), so "
                "slopes over N >= 16,000 and N >= 64,000 are also given; nan = fewer than two "
                "sizes ran), and an affine fit memory = a + b N over N >= 16,000:\n\n")
        for m, (e_all, e16, e64) in exps.items():
            a0, b1 = _linear([r for r in rows if r["method"] == m])
            f.write(f"* {m}: {e_all:.2f} (all sizes), {e16:.2f} (N >= 16,000), {e64:.2f} "
                    f"(N >= 64,000); affine: {a0:.0f} MiB + {b1:.2f} MiB per 1,000 nodes\n")
    print("exponents:", json.dumps(exps))


if __name__ == "__main__":
    main()
