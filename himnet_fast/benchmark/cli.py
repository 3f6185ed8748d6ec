"""``himnet-fast bench`` and ``himnet-fast scale`` (plugged into himnet_fast.cli).

Only argparse work happens at import: torch, pandas and matplotlib load in the handlers.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .._argtypes import POSITIVE, integer, positive_float

from .providers import MODEL, OP_PROVIDERS as _PROVIDERS, OPS as _OPS

_WHAT = (MODEL,) + _OPS


def _common(p: argparse.ArgumentParser, default_what: str) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="batch size B (default 16)")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated subset of {','.join(_PROVIDERS)} (default: all on cuda; "
                        "reference,reference-compile,torch,triton,cuda on cpu)")
    p.add_argument("--what", default=default_what,
                   help=f"comma-separated kernels: himnet (the model) and/or ops {','.join(_OPS)} "
                        f"(default {default_what})")
    p.add_argument("--modes", default="train,infer",
                   help="model modes: train (forward+backward) and/or infer (default both); "
                        "ops always run forward, backward and full")
    p.add_argument("--out", default=None,
                   help="output directory (default runs/bench/<device>; the repository's committed bench/results/ "
                        "is written only when named explicitly)")
    p.add_argument("--repeats", type=POSITIVE, default=None, help="timed calls per job (default 3 on cpu, 20 on cuda)")
    p.add_argument("--warmup", type=integer(0), default=None, help="untimed calls first (default 1 on cpu, 3 on cuda)")
    p.add_argument("--memory-limit-gb", type=positive_float, default=None,
                   help="per-process limit (RLIMIT_AS on cpu, memory fraction on cuda); exceeding it "
                        "is recorded as OOM")
    p.add_argument("--timeout-s", type=positive_float, default=None, help="per-job wall-clock limit (recorded as timeout)")
    p.add_argument("--threads", type=POSITIVE, default=None,
                   help="torch intra-op threads in each worker (default: torch's own choice)")
    p.add_argument("--no-check", action="store_true", help="skip the agreement check against the reference")
    p.add_argument("--check-max-nodes", type=POSITIVE, default=1024,
                   help="check agreement at full size up to this N; above, on a 256-node graph")


def add_subcommands(subparsers) -> None:
    b = subparsers.add_parser("bench", help="model train/infer steps and per-op forward/backward, per provider",
                              description="Benchmark one preset: training step, inference and the single ops "
                                          "of every provider, each in its own process.")
    b.add_argument("--preset", default="metrla",
                   help="metrla, pemsbay, pems03, pems04, pems07, pems08, sd, gba, gla, ca or synthetic-N")
    b.add_argument("--nodes", default=None, help="override the preset's graph size (e.g. 16 for a smoke run)")
    _common(b, "himnet," + ",".join(_OPS))
    b.add_argument("--count-kernels", action="store_true",
                   help="instead of timing, count the CUDA kernels one model step launches, on CPU in seconds "
                        "(no GPU needed; docs/benchmarks.md, 'Kernel count'). Uses --preset, --nodes, "
                        "--batch-size, --modes, --out and --providers (default,reference unless given; any of "
                        "default,torch,triton,reference,reference-notf); prints a table, writes CSV and "
                        "markdown into --out when given")
    b.set_defaults(func=_bench)
    s = subparsers.add_parser("scale", help="sweep over graph sizes",
                              description="Latency and peak memory against the number of nodes N.")
    s.add_argument("--preset", default="pems07", help="model sizes to use at every N (default pems07)")
    s.add_argument("--nodes", required=True, help="comma-separated graph sizes, e.g. 207,883,2352,8600")
    _common(s, "himnet")
    s.set_defaults(func=_scale)
    add_roofline(subparsers)


def _config(args, kind: str):
    import torch

    from ..presets import get_preset
    from . import providers as P
    from .runner import RunConfig, parse_list, parse_nodes

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(args.preset)
    if args.nodes:
        nodes = parse_nodes(args.nodes)
    else:
        nodes = [preset.num_nodes]
    if args.providers:
        providers = parse_list(args.providers, "--providers", _PROVIDERS)
    else:
        providers = P.default_providers(torch.device(device))
    cpu = device == "cpu"
    return RunConfig(
        kind=kind, preset=preset.name, nodes=nodes, batch_size=args.batch_size, device=device,
        providers=providers, what=parse_list(args.what, "--what", _WHAT),
        modes=parse_list(args.modes, "--modes", P.MODEL_MODES), out=args.out or f"runs/{kind}/{device}",
        repeats=args.repeats if args.repeats is not None else (3 if cpu else 20),
        warmup=args.warmup if args.warmup is not None else (1 if cpu else 3),
        memory_limit_gb=args.memory_limit_gb, timeout_s=args.timeout_s, check=not args.no_check,
        check_max_nodes=args.check_max_nodes, threads=args.threads,
        command="himnet-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "",
    )


def _run(args, kind: str) -> int:
    try:
        import pandas  # noqa: F401
    except ImportError:
        print(f"himnet-fast {kind}: error: needs pandas: pip install pandas (or the package's [bench] extra)",
              file=sys.stderr)
        return 2
    from .runner import execute

    try:
        cfg = _config(args, kind)
    except (ValueError, TypeError) as exc:
        print(f"himnet-fast {kind}: {exc}", file=sys.stderr)
        return 2
    df = execute(cfg)
    return 0 if (df.status != "error").all() else 1


def _bench(args) -> int:
    if args.count_kernels:
        return _count_kernels(args)
    return _run(args, "bench")


def _count_kernels(args) -> int:
    from ..presets import get_preset
    from . import kernel_count as K
    from .providers import MODEL_MODES
    from .runner import parse_list, parse_nodes

    try:
        preset = get_preset(args.preset)
        nodes = None
        if args.nodes:
            parsed = parse_nodes(args.nodes)
            if len(parsed) != 1:
                raise ValueError(f"--nodes: one graph size when counting kernels, got {args.nodes!r}")
            nodes = parsed[0]
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        providers = parse_list(args.providers or "default,reference", "--providers", K.COUNT_PROVIDERS)
        modes = parse_list(args.modes, "--modes", MODEL_MODES)
    except (ValueError, TypeError) as exc:
        print(f"himnet-fast bench --count-kernels: {exc}", file=sys.stderr)
        return 2
    # The command that reproduces the counts, from the parsed values (complete, defaults included).
    command = (f"himnet-fast bench --count-kernels --preset {preset.name}"
               + (f" --nodes {nodes}" if nodes is not None else "")
               + f" --batch-size {args.batch_size} --providers {','.join(providers)} --modes {','.join(modes)}")
    results = K.count_table(providers, preset, nodes, args.batch_size, modes)
    print(K.report_text(results, command))
    if args.out:
        for path in K.write_report(results, args.out, command):
            print(f"wrote {path}")
    return 0


def _scale(args) -> int:
    return _run(args, "scale")


def add_roofline(subparsers) -> None:
    r = subparsers.add_parser("roofline", help="predicted time of every op and the model (no GPU needed)",
                              description="FLOPs, bytes and the roofline-predicted time at practical H100 "
                                          "limits, for our algorithms and the original's. Predictions, not "
                                          "measurements; --measured adds a benchmark CSV's p50 beside them.")
    r.add_argument("--preset", default="pems07", help="model sizes (default pems07)")
    r.add_argument("--nodes", type=POSITIVE, default=None, help="graph size (default: the preset's)")
    r.add_argument("--batch-size", type=POSITIVE, default=16, help="batch size (default 16)")
    r.add_argument("--measured", default=None, help="a bench CSV (himnet-fast bench --device cuda) to compare with")
    r.add_argument("--out", default=None, help="write roofline_<preset>_b<B>.{csv,md,png} into this folder")
    r.set_defaults(func=_roofline)


def _roofline(args) -> int:
    import os

    import pandas as pd

    from ..presets import get_preset
    from . import roofline as R
    from .report import to_markdown

    try:
        preset = get_preset(args.preset)
        n = preset.num_nodes if args.nodes is None else args.nodes
        if args.batch_size < 1 or n < 1:
            raise ValueError(f"--batch-size and --nodes must be >= 1, got {args.batch_size} and {n}")
        if args.measured and not os.path.isfile(args.measured):
            raise ValueError(f"--measured: no such file {args.measured!r}")
    except ValueError as exc:
        print(f"himnet-fast roofline: {exc}", file=sys.stderr)
        return 2
    rows = R.table(preset, n, args.batch_size)
    if args.measured:
        rows = R.with_measured(rows, args.measured)
    df = pd.DataFrame(rows)
    show = df.copy()
    for c in ("gflop", "gbytes", "predicted_ms", "compute_ms", "memory_ms"):
        show[c] = show[c].map(lambda v: f"{v:.4g}")
    for c in ("measured_ms", "measured_over_predicted"):
        if c in show:
            show[c] = show[c].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    if "measured_provider" in show:
        show["measured_provider"] = show["measured_provider"].fillna("")
    show = show.drop(columns=["limits", "preset"]).rename(columns={"predicted_ms": "PREDICTED ms"})
    text = (f"# Roofline predictions: {preset.name}, N = {n}, B = {args.batch_size}\n\n"
            f"Limits: {R.H100.name}: HBM {R.H100.bandwidth / 1e12:.2f} TB/s, fp32 FMA "
            f"{R.H100.compute['fp32'] / 1e12:.1f}, TF32 {R.H100.compute['tf32'] / 1e12:.0f}, bf16 "
            f"{R.H100.compute['bf16'] / 1e12:.0f} TFLOP/s. Every time in the PREDICTED column is a "
            "prediction from counting FLOPs and bytes (himnet_fast/benchmark/roofline.py), not a "
            "measurement; measured_ms is a benchmark p50 (fp32 rows only) where a CSV was given.\n\n"
            + to_markdown(show) + "\n")
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"roofline_{preset.name}_n{n}_b{args.batch_size}")
        df.to_csv(stem + ".csv", index=False)
        with open(stem + ".md", "w") as f:
            f.write(text)
        try:
            R.plot(rows, stem + ".png")
        except ImportError:
            print("himnet-fast roofline: matplotlib is not installed; no plot (pip install matplotlib)",
                  file=sys.stderr)
        print(f"wrote {stem}.csv, .md, .png")
    return 0
