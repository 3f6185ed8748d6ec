"""Peak memory and time of one HimNet training step against N with the partitioned adaptive
graph (``HimNet(partition=...)``, himnet_fast.ops.partitioned_adaptive), up to N = 1,000,000.

The companion of ``bench_sba_scale.py`` (same measurement: each (method, N) in its own
subprocess, step memory = ``VmHWM - VmRSS`` after resetting the high-water mark, the faster of
two steps, one when the first took over 10 s; the log-log slope of step memory against N).

    python bench/bench_himnet_partitioned_scale.py
    python bench/bench_himnet_partitioned_scale.py --sizes 1000 4000 --methods himnet-partitioned

Reduced configuration (a full-size HimNet step at 1M nodes on one CPU core would take hours):
B=1, in_steps=2, out_steps=2, hidden_dim=8, node and spatio-temporal embeddings of 8, time-of-day
and day-of-week embeddings of 4, cheb_k=2, one layer, fp32, 1 thread, training mode with
teacher forcing; the step is forward + MAE loss + backward (no optimiser update).

* himnet-partitioned: METIS partition of a 2-D grid graph into P = round(sqrt(N)) parts (parts
  of about sqrt(N) nodes, which minimises M + P); partitioning time reported separately.
  ``HIMNET_FAST_DENSE_BUDGET_MB=0``: the per-node ("S") meta-weights are streamed from their
  pools at every N rather than built as (N, I, O) below the default 256 MiB budget, so the
  curve does not change algorithm mid-way.
* himnet-exact: the default HimNet (exact adaptive graph, torch backend; dense below
  ``$HIMNET_FAST_DENSE_BUDGET_MB``, streamed above), for contrast at small N.
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

sys.path.insert(0, str(Path(__file__).parent))
from bench_sba_scale import _fit, _grid_edges, _linear, measure_step, run_child, write_csv, write_md_table  # noqa: E402

DEFAULT_SIZES = [1_000, 4_000, 16_000, 64_000, 256_000, 1_000_000]
CONFIG = dict(input_dim=3, output_dim=1, out_steps=2, hidden_dim=8, num_layers=1, cheb_k=2,
              node_embedding_dim=8, st_embedding_dim=8, tod_embedding_dim=4, dow_embedding_dim=4)
IN_STEPS = 2


def _child(method, n):
    import numpy as np
    import torch

    import himnet_fast as hf
    from himnet_fast.partition import partition_graph
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    info = dict(method=method, N=n)
    part = None
    if method == "himnet-partitioned":
        # per-node ("S") weights streamed at every N (see the module docstring)
        os.environ["HIMNET_FAST_DENSE_BUDGET_MB"] = "0"
        t0 = time.perf_counter()
        part = partition_graph(max(1, round(math.sqrt(n))), edge_index=_grid_edges(n), num_nodes=n)
        info.update(partition_s=time.perf_counter() - t0, parts=part.num_parts, M=part.max_size)
    model = hf.HimNet(n, **CONFIG, backend="torch", in_steps=IN_STEPS, partition=part).train()
    B, S = 1, CONFIG["out_steps"]
    x = torch.rand(B, IN_STEPS, n, 3)
    x[..., 2] = torch.randint(0, 7, (B, IN_STEPS, n))
    y_cov = torch.rand(B, S, n, 2)
    y_cov[..., 1] = torch.randint(0, 7, (B, S, n))
    labels = torch.randn(B, S, n, 1)

    def step():
        model.zero_grad(set_to_none=True)
        (model(x, y_cov, labels, batches_seen=0) - labels).abs().mean().backward()

    measure_step(step, info)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    ap.add_argument("--methods", nargs="+", default=["himnet-exact", "himnet-partitioned"],
                    choices=["himnet-exact", "himnet-partitioned"])
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per (method, N)")
    ap.add_argument("--max-exact", type=int, default=4_000, help="largest N for himnet-exact")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu" / "sba"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a.child[0], int(a.child[1]))
    rows = []
    for method in a.methods:
        for n in a.sizes:
            row = dict(method=method, N=n)
            if method == "himnet-exact" and n > a.max_exact:
                row["note"] = f"not run (N > --max-exact {a.max_exact})"
            else:
                run_child(row, [__file__, "--child", method, str(n)], a.timeout)
            print(json.dumps(row), flush=True)
            rows.append(row)
    _write(rows, a.methods, Path(a.out), " ".join(argv if argv is not None else sys.argv[1:]))


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def _write(rows, methods, out, command):
    import torch
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "himnet_partitioned_scale_cpu.csv")
    cfg = ", ".join(f"{k}={v}" for k, v in CONFIG.items())
    with open(out / "himnet_partitioned_scale_cpu.md", "w") as f:
        f.write("# One HimNet training step against N, partitioned adaptive graph (CPU, 1 thread)\n\n")
        f.write(f"Command: `python bench/bench_himnet_partitioned_scale.py {command}` at commit "
                f"{_commit()}, torch {torch.__version__}.\n\n")
        f.write(f"Configuration: B=1, in_steps={IN_STEPS}, {cfg}, fp32, training mode (teacher forcing), "
                "forward + MAE loss + backward; himnet-partitioned with HIMNET_FAST_DENSE_BUDGET_MB=0 "
                "(per-node weights streamed at every N), parts of about sqrt(N) nodes.\n\n")
        write_md_table(f, rows)
        f.write("\nFitted exponent of step memory against N (log-log slope; nan = fewer than two sizes ran) "
                "and an affine fit memory = a + b N over N >= 16,000:\n\n")
        for m in methods:
            mr = [r for r in rows if r["method"] == m]
            a0, b1 = _linear(mr)
            f.write(f"* {m}: {_fit(mr):.2f} (all sizes), {_fit(mr, 16_000):.2f} (N >= 16,000), "
                    f"{_fit(mr, 64_000):.2f} (N >= 64,000); affine: {a0:.0f} MiB + {b1:.2f} MiB per 1,000 nodes\n")
            pts = [(r["N"], r["step_s"]) for r in mr if r.get("step_s")]
            if len(pts) >= 2 and m == "himnet-partitioned":
                import numpy as np
                big = [p for p in pts if p[0] >= 16_000]
                slope = np.polyfit(np.log([p[0] for p in big]), np.log([p[1] for p in big]), 1)[0] if len(big) >= 2 else float("nan")
                f.write(f"  time exponent (N >= 16,000): {slope:.2f} (1.5 expected: N (M + P) with M, P ~ sqrt(N))\n")


if __name__ == "__main__":
    main()
