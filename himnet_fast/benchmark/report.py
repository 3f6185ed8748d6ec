"""Markdown tables (pandas) and PNG plots (matplotlib, log-log against N) of a results frame."""
from __future__ import annotations

import math
import os
from typing import List

REF = "reference"


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _fmt(v, spec: str = ".3g") -> str:
    f = _num(v)
    return "" if f is None else format(f, spec)


def _ms(v) -> str:
    f = _num(v)
    if f is None:
        return ""
    return f"{f:,.0f}" if f >= 1000 else format(f, ".4g")


def add_ratios(df):
    """Add ``speedup`` (reference p50 / p50) and ``mem_ratio`` (reference peak / peak: how
    many times less memory) per (kernel, mode, x, batch_size); blank where the reference has
    no timing (skipped, OOM)."""
    import pandas as pd

    df = df.copy()
    for c in ("p20", "p50", "p80", "peak_mem_mb", "peak_mem_abs_mb"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    keys = ["kernel", "mode", "x", "batch_size"]
    ref = df[(df.provider == REF) & (df.status == "ok")][keys + ["p50", "peak_mem_mb"]]
    ref = ref.rename(columns={"p50": "ref_p50", "peak_mem_mb": "ref_peak"}).drop_duplicates(keys)
    df = df.merge(ref, on=keys, how="left")
    df["speedup"] = df["ref_p50"] / df["p50"]
    df["mem_ratio"] = df["ref_peak"] / df["peak_mem_mb"]
    return df.drop(columns=["ref_p50", "ref_peak"])


def to_markdown(df) -> str:
    """A pipe table of a small DataFrame (pandas' own needs the optional 'tabulate')."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |")
    return "\n".join(lines)


def _predicted(row):
    """Roofline-predicted ms of a row at H100 fp32 limits (see roofline.py); None if unknown."""
    from ..presets import get_preset
    from .roofline import predicted_ms

    try:
        preset = get_preset(str(row.preset))
        return predicted_ms(str(row.kernel), str(row.mode), preset, int(row.x), int(row.batch_size),
                            str(row.provider))
    except (ValueError, TypeError, KeyError):
        return None


def _col(d, name):
    """A breakdown column formatted, blank where absent (CSVs written before it existed)."""
    if name not in d:
        return [""] * len(d)
    return d[name].map(lambda v: _fmt(v, ".1f"))


def summary_table(df):
    """One line per (kernel, mode, N, provider): time, memory and ratios vs the reference."""
    import pandas as pd

    d = add_ratios(df)
    order = {p: i for i, p in enumerate(["reference", "reference-compile", "reference-compile-notf", "torch", "torch-compile",
                                         "triton", "cuda", "flex"])}
    d["_o"] = d.provider.map(order).fillna(99)
    d = d.sort_values(["kernel", "mode", "x", "_o"], kind="stable")
    pred = [_predicted(r) for r in d.itertuples()]
    out = pd.DataFrame({
        "kernel": d.kernel, "mode": d["mode"], "N": d.x, "B": d.batch_size, "provider": d.provider,
        "status": d.status,
        "p50 ms": d.p50.map(_ms),
        "p20-p80 ms": [f"{_ms(a)} - {_ms(b)}" if _num(a) is not None else ""
                       for a, b in zip(d.p20, d.p80)],
        "peak MiB (+)": d.peak_mem_mb.map(lambda v: _fmt(v, ".0f")),
        "peak MiB (abs)": d.peak_mem_abs_mb.map(lambda v: _fmt(v, ".0f")),
        "speedup vs ref": d.speedup.map(lambda v: _fmt(v, ".2f") + "x" if _num(v) else ""),
        "memory ratio vs ref": d.mem_ratio.map(lambda v: _fmt(v, ".2f") + "x" if _num(v) else ""),
        "params MiB": _col(d, "mem_params_mb"),
        "grads MiB": _col(d, "mem_grads_mb"),
        "Adam state MiB": _col(d, "mem_adam_mb"),
        "saved act. MiB": _col(d, "mem_saved_mb"),
        "samples/s": d.samples_per_s.map(lambda v: _fmt(v, ".3g")),
        "TFLOP/s": d.tflops.map(lambda v: _fmt(v, ".3g")),
        "% peak": d.pct_peak_tflops.map(lambda v: _fmt(v, ".2g")),
        "GB/s": d.gbps.map(lambda v: _fmt(v, ".3g")),
        "first call s": d.first_call_ms.map(lambda v: _fmt(_num(v) / 1e3, ".1f") if _num(v) else ""),
        "PREDICTED ms (H100 fp32)": [_fmt(v, ".3g") for v in pred],
        "measured / predicted": [_fmt(_num(m) / v, ".2g") if (v and _num(m) and on_gpu) else ""
                                 for m, v, on_gpu in zip(d.p50, pred, d.device.astype(str).str.contains("H100"))],
        "max rel err": d.max_rel_err.map(lambda v: _fmt(v, ".1e")),
        "load": d.load_avg.map(lambda v: _fmt(v, ".1f")),
        "note": d.reason.fillna("").astype(str).str.slice(0, 160),
    })
    return out.reset_index(drop=True)


def write_markdown(df, path: str, cfg=None, command: str = "") -> str:
    first = df.iloc[0] if len(df) else None
    command = command or getattr(cfg, "command", "")
    lines = [f"# himnet-fast {getattr(cfg, 'kind', 'benchmark')} results", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if first is not None:
        lines += [f"Device: {first['device']}; torch {first['torch']}, triton {first['triton'] or '-'}, "
                  f"CUDA {first['cuda'] or '-'}; commit {first['git_commit'] or '-'}; {first['timestamp']}.", ""]
    lines += ["Time: p50 (p20-p80) of wall clock per call (CUDA events on a GPU). Peak memory: increase "
              "of the worker process's peak over its baseline once model and inputs exist "
              "(RSS on CPU, allocated memory on a GPU), and the absolute peak. Ratios are against "
              "`reference` at the same N and batch: speedup = reference time / time, memory ratio = "
              "reference peak / peak. \"first call\" includes torch.compile's compilation. "
              "Training rows break memory down: params, their grads, the state Adam would add "
              "(2x params, computed), and the activations the forward saves for backward "
              "(saved-tensor hooks; not measured under torch.compile); the rest of the peak is "
              "transient buffers and heap the allocator keeps. "
              "Model TFLOP/s count the matmul FLOPs of the lean algorithm; train = forward + backward. "
              "PREDICTED is not a measurement: the roofline time at 60 % of H100 limits for the row's "
              "algorithm (the original's for reference providers; `himnet-fast roofline` shows the counts); "
              "measured / predicted is given for rows measured on an H100.",
              "", to_markdown(summary_table(df)), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def write_plots(df, out_dir: str, stem: str) -> List[str]:
    """Per (kernel, mode): latency and peak memory against N, log-log, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    ok = df[df.status == "ok"].copy()
    for c in ("x", "p50", "peak_mem_mb", "peak_mem_abs_mb"):
        ok[c] = pd.to_numeric(ok[c], errors="coerce")
    paths = []
    for (kernel, mode), g in ok.groupby(["kernel", "mode"], sort=True):
        if g.x.nunique() == 1:
            paths.append(_bar_plot(plt, g, kernel, mode, out_dir, stem))
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for provider, gp in g.groupby("provider", sort=False):
            gp = gp.sort_values("x")
            axes[0].plot(gp.x, gp.p50, marker="o", label=provider)
            mem = gp.peak_mem_mb.where(gp.peak_mem_mb > 0)
            axes[1].plot(gp.x, mem, marker="o", label=provider)
        oom = df[(df.kernel == kernel) & (df["mode"] == mode) & (df.status == "oom")]
        for _, r in oom.iterrows():
            axes[1].axvline(float(r.x), color="grey", linestyle=":", linewidth=1)
            axes[1].annotate(f"{r.provider} OOM", (float(r.x), 0.02), xycoords=("data", "axes fraction"),
                             rotation=90, fontsize=7, color="grey")
        batch = g.batch_size.iloc[0]
        device = str(g.device.iloc[0])[:40]
        for ax, ylabel in zip(axes, ("p50 time per call (ms)", "peak memory increase (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("nodes N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{kernel} {mode}, batch {batch} - {device}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_{kernel}_{mode}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _bar_plot(plt, g, kernel: str, mode: str, out_dir: str, stem: str) -> str:
    """One graph size: a line through one point says nothing, so bars per provider, each
    labelled with its value and its ratio against the reference (speed-up for time, how many
    times less memory for memory)."""
    g = g.drop_duplicates("provider", keep="last")
    ref = g[g.provider == REF]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, col, ylabel, fmt in ((axes[0], "p50", "p50 time per call (ms)", "{:,.3g} ms"),
                                 (axes[1], "peak_mem_mb", "peak memory increase (MiB)", "{:,.0f} MiB")):
        vals = g[col].astype(float).tolist()
        bars = ax.bar(range(len(g)), vals, color=["#c44e52" if p.startswith(REF) else "#4c72b0" for p in g.provider])
        base = float(ref[col].iloc[0]) if len(ref) and float(ref[col].iloc[0]) > 0 else None
        for bar, v in zip(bars, vals):
            label = fmt.format(v)
            if base and v > 0:
                label += f"\n{base / v:.2f}x" + (" faster" if col == "p50" else " less")
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(g)))
        ax.set_xticklabels(g.provider.tolist(), rotation=20, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(vals) * 1.25 if vals and max(vals) > 0 else 1)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{kernel} {mode}, N = {int(g.x.iloc[0]):,}, batch {g.batch_size.iloc[0]} - "
                 f"{str(g.device.iloc[0])[:40]} (ratios against {REF})", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}_{kernel}_{mode}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

