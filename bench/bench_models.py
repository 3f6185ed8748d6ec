"""Memory and time of one training step of AGCRN and the HyperST-Net models: the original-style
algorithm (``himnet_fast.reference_models``: per-node weights materialised at every step, dense
Chebyshev supports) against ``himnet_fast.models`` (torch backend).

Each (model, provider, N) runs in its own process, so peak RSS is that step's alone. Reported:
``peak_rss_increase_mib`` (``ru_maxrss`` after the step minus RSS before it: what the step
needs beyond model and inputs), ``step_s`` (forward + backward + optimizer, median of
``--repeats`` after one warm-up; the warm-up is skipped when ``--repeats 1``). A run that would
exceed ``--mem-limit-gb`` of address space beyond its start is stopped by ``RLIMIT_AS`` and
recorded as ``oom``; one past ``--timeout`` as ``timeout``.

    python bench/bench_models.py --nodes 207 2000 --out bench/results/cpu/models/models_cpu_b1.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODELS = ("agcrn", "hyperst-lstm-g", "hyperst-lstm-d", "hyperst-gcgru")
# Paper-sized settings: AGCRN's PEMS defaults (hidden 64, 2 layers, embed 10, cheb_k 2);
# HyperST with the same hidden width, one layer.
CONFIG = {
    "agcrn": dict(input_dim=1, rnn_units=64, output_dim=1, horizon=12, num_layers=2, embed_dim=10, cheb_k=2),
    "hyperst-lstm-g": dict(input_dim=1, hidden_dim=64, output_dim=1, horizon=12, num_layers=1, spatial_dim=16,
                           query_dim=8),
    "hyperst-lstm-d": dict(input_dim=1, hidden_dim=64, output_dim=1, horizon=12, num_layers=1, spatial_dim=16),
    "hyperst-gcgru": dict(input_dim=1, hidden_dim=64, output_dim=1, horizon=12, num_layers=1, spatial_dim=16,
                          embed_dim=10, cheb_k=2),
}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(model: str, provider: str, n: int, batch: int, steps: int, repeats: int, mem_limit_gb: float) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from himnet_fast import models as M
    from himnet_fast import reference_models as R
    torch.manual_seed(0)
    cfg = dict(CONFIG[model])
    attrs = torch.randn(n, 6)
    if model == "agcrn":
        net = R.RefAGCRN(n, **cfg) if provider == "reference" else M.AGCRN(num_nodes=n, backend="torch", **cfg)
    else:
        ref_cls = {"hyperst-lstm-g": R.RefHyperSTLSTMG, "hyperst-lstm-d": R.RefHyperSTLSTMD,
                   "hyperst-gcgru": R.RefHyperSTGCGRU}[model]
        net = ref_cls(n, attrs, **cfg) if provider == "reference" else M.build_model(model, n, attributes=attrs,
                                                                                    backend="torch", **cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(batch, steps, n, 1)
    y = torch.randn(batch, cfg["horizon"], n, 1)

    def step():
        out = net(x)
        loss = (out - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # Address-space cap relative to now, so the limit is what the step itself may take.
    cap = _vm_bytes() + int(mem_limit_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    rss0 = _rss_mib()
    times = []
    try:
        for i in range(repeats + (1 if repeats > 1 else 0)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    except (MemoryError, RuntimeError) as e:  # allocation failures surface as either
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        return dict(status="oom", error=str(e).splitlines()[0][:120])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = times[1:] if repeats > 1 else times
    times.sort()
    return dict(status="ok", step_s=round(times[len(times) // 2], 4), peak_rss_increase_mib=round(peak - rss0, 1),
                rss_before_mib=round(rss0, 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--providers", nargs="+", default=["reference", "ours"], choices=["reference", "ours"])
    p.add_argument("--nodes", nargs="+", type=int, default=[207, 2000])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=12, help="input window T")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-limit-gb", type=float, default=6.0)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default=None, help="CSV to write (appends rows if it exists)")
    p.add_argument("--_worker", nargs=3, metavar=("MODEL", "PROVIDER", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        m, prov, n = a._worker
        print(json.dumps(worker(m, prov, int(n), a.batch, a.steps, a.repeats, a.mem_limit_gb)))
        return 0
    import torch
    rows = []
    for n in a.nodes:
        for m in a.models:
            for prov in a.providers:
                cmd = [sys.executable, __file__, "--_worker", m, prov, str(n), "--batch", str(a.batch),
                       "--steps", str(a.steps), "--repeats", str(a.repeats), "--mem-limit-gb", str(a.mem_limit_gb)]
                t0 = time.time()
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                    if r.returncode == 0:
                        res = json.loads(r.stdout.strip().splitlines()[-1])
                    else:
                        err = (r.stderr.strip().splitlines() or ["?"])[-1]
                        res = dict(status="oom" if "memory" in err.lower() else "error", error=err[:120])
                except subprocess.TimeoutExpired:
                    res = dict(status="timeout")
                with open("/proc/loadavg") as f:
                    load = f.read().split()[0]
                row = dict(model=m, provider=prov, num_nodes=n, batch=a.batch, steps=a.steps, threads=os.environ.get(
                    "BENCH_THREADS", "1"), status=res.get("status"), step_s=res.get("step_s", ""),
                    peak_rss_increase_mib=res.get("peak_rss_increase_mib", ""), wall_s=round(time.time() - t0, 1),
                    load1=load, torch=torch.__version__, machine=platform.machine(), error=res.get("error", ""))
                print(json.dumps(row), flush=True)
                rows.append(row)
                if a.out:
                    new = not os.path.exists(a.out)
                    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                    with open(a.out, "a", newline="") as f:
                        w = csv.DictWriter(f, fieldnames=list(row))
                        if new:
                            w.writeheader()
                        w.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
