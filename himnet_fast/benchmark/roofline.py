"""Roofline predictions: FLOPs, bytes moved and the predicted time of each op and of the whole
model, for our algorithms and for the original's, at practical limits of a GPU.

Every figure here is a *prediction* from counting, never a measurement. The model is the usual
one: each kernel takes ``max(FLOPs / compute peak, bytes / bandwidth)``, and a sequence of
kernels the sum of those. The limits are 60 % of the vendor peaks (what well-tuned kernels
reach in practice); for an H100 SXM: HBM 3.35 TB/s, dense bf16 tensor cores ~990 TFLOP/s,
TF32 ~495 TFLOP/s and fp32 FMA (CUDA cores) ~67 TFLOP/s.

What is counted, per graph-convolution call (``HimGCN``) with input ``C`` channels (signal and
state), ``I = K*C``, output ``O``, embedding ``D``, batch ``B``, ``N`` nodes:

* **original**: the dense supports ``T_0..T_{K-1}`` (N×N each, B×N×N for the per-sample graph,
  the identity included) are read for every call and multiplied with the input (``2 K N² B C``
  FLOPs); the meta-weights are materialised and then applied: "S" writes and reads ``N·I·O``,
  "T" ``B·I·O``, "ST" the ``B·N·I·O`` tensor. The supports themselves are built once per forward
  (softmax of ``N²`` scores, the ``K-2`` dense products ``T_k = 2 A T_{k-1} - T_{k-2}``).
* **ours**: ``K-1`` streamed products ``A v`` that recompute the ``D``-wide scores and read
  only E and the values; the "S" weights built once per forward; "ST" as one fused GEMM over the
  D pool slices that reads x, q and the pool and writes y.

A training step counts 3x the forward's FLOPs and bytes (backward ~2x forward: one GEMM per
operand gradient; it re-reads what forward wrote); the original's backward also reads and
writes its materialised weights, which the factor 3 covers. Elementwise gate work and the
small projections are left out (under 1 % of either side at the PEMS07 sizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

__all__ = ["Limits", "H100", "Cost", "PRECISIONS", "op_costs", "model_costs", "predict", "table",
           "predicted_ms"]


@dataclass(frozen=True)
class Limits:
    """Practical limits of one GPU: bandwidth in bytes/s and compute in FLOP/s per precision."""

    name: str
    bandwidth: float
    compute: Dict[str, float]


_PRACTICAL = 0.6
H100 = Limits(
    "H100 SXM (60% of peak)",
    bandwidth=_PRACTICAL * 3.35e12,
    compute={"fp32": _PRACTICAL * 67e12, "tf32": _PRACTICAL * 495e12, "bf16": _PRACTICAL * 990e12},
)
# Storage bytes per element of each compute precision (TF32 reads and writes fp32).
PRECISIONS = {"fp32": 4, "tf32": 4, "bf16": 2}
_MODE_FACTOR = {"forward": 1.0, "infer": 1.0, "backward": 2.0, "full": 3.0, "train": 3.0}


@dataclass
class Cost:
    """FLOPs and elements moved by a sequence of kernels, kept per kernel so each kernel is
    bound by its own limit (``parts`` of (flops, elements))."""

    parts: List[tuple]

    @property
    def flops(self) -> float:
        return sum(f for f, _ in self.parts)

    def bytes(self, precision: str) -> float:
        return PRECISIONS[precision] * sum(e for _, e in self.parts)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.parts + other.parts)

    def scaled(self, k: float) -> "Cost":
        return Cost([(f * k, e * k) for f, e in self.parts])


def _supports_build(n: int, d: int, k: int, groups: int) -> Cost:
    """Original: A = softmax(relu(E Eᵀ)) and the dense T_k, once per forward."""
    parts = [(2.0 * groups * n * n * d, groups * (n * d + 2.0 * n * n))]   # scores, softmax in place
    for _ in range(max(0, k - 2)):
        parts.append((2.0 * groups * n ** 3, groups * 3.0 * n * n))
    parts.append((0.0, groups * k * n * n))  # writes the stacked supports, identity included
    return Cost(parts)


def _propagate(algorithm: str, b: int, n: int, c: int, d: int, k: int, per_sample: bool) -> Cost:
    """``cat_k(T_k x)`` of x (B, N, C)."""
    groups = b if per_sample else 1
    if algorithm == "original":
        # einsum('knm,bmc->bknc') over K dense supports (identity included)
        return Cost([(2.0 * k * n * n * b * c, groups * k * n * n + b * n * c + k * b * n * c)])
    # K-1 flash-style products; each recomputes the D-wide scores for its values.
    per = (2.0 * groups * n * n * d + 2.0 * n * n * b * c, groups * n * d + 2.0 * b * n * c)
    return Cost([per] * max(0, k - 1))


def _meta_linear(algorithm: str, axis: str, b: int, n: int, i: int, o: int, d: int) -> Cost:
    """y = x @ W(q) + q @ Pb for x (B, N, I), output O, embedding D."""
    apply_flops = 2.0 * b * n * i * o
    if axis == "ST":
        if algorithm == "original":
            return Cost([(2.0 * b * n * d * i * o, b * n * d + d * i * o + b * n * i * o),   # build W
                         (apply_flops, b * n * i * o + b * n * i + b * n * o)])         # apply W
        return Cost([(2.0 * b * n * d * i * o, b * n * i + b * n * d + d * i * o + b * n * o)])
    if axis == "S":
        build = Cost([(2.0 * n * d * i * o, n * d + d * i * o + n * i * o)])
        use = Cost([(apply_flops, n * i * o + b * n * i + b * n * o)])
        return build + use if algorithm == "original" else use   # ours: built once per forward
    if axis == "T":
        return Cost([(2.0 * b * d * i * o, b * d + d * i * o + b * i * o),
                     (apply_flops, b * i * o + b * n * i + b * n * o)])
    raise ValueError(f"axis must be 'S', 'T' or 'ST', got {axis!r}")


def _cell(algorithm: str, axis: str, b: int, n: int, c_in: int, h: int, d: int, k: int,
          per_sample: bool) -> Cost:
    """One GCRU step: gate (O = 2H) and update (O = H) graph convolutions of C_in + H channels."""
    c = c_in + h
    cost = Cost([])
    for o in (2 * h, h):
        cost = cost + _propagate(algorithm, b, n, c, d, k, per_sample)
        cost = cost + _meta_linear(algorithm, axis, b, n, k * c, o, d)
    return cost


def model_costs(preset, num_nodes: int, batch: int, algorithm: str, mode: str = "train",
                cheb_k: int = 2, steps: int = 12, input_dim: int = 3, output_dim: int = 1,
                ycov_dim: int = 2) -> Cost:
    """One HimNet forward (``mode`` "infer") or training step ("train") at a preset's sizes."""
    _check_algorithm(algorithm)
    n, b, h, k = int(num_nodes), int(batch), preset.hidden_dim, cheb_k
    d_s, d_t, d_st = (preset.node_embedding_dim, preset.tod_embedding_dim + preset.dow_embedding_dim,
                      preset.st_embedding_dim)
    fwd = Cost([])
    if algorithm == "original":
        fwd = fwd + _supports_build(n, d_s, k, 1) + _supports_build(n, d_st, k, b)
    else:
        # the "S" weights once per forward (the original rebuilds them per call, counted in _cell)
        for o in (2 * h, h):
            fwd = fwd + Cost([(2.0 * n * d_s * k * (input_dim + h) * o, n * d_s + d_s * k * (input_dim + h) * o
                               + n * k * (input_dim + h) * o)])
    for _ in range(steps):
        fwd = fwd + _cell(algorithm, "S", b, n, input_dim, h, d_s, k, False)
        fwd = fwd + _cell(algorithm, "T", b, n, input_dim, h, d_t, k, False)
        fwd = fwd + _cell(algorithm, "ST", b, n, output_dim + ycov_dim, h, d_st, k, True)
    return fwd.scaled(_factor(mode))


def op_costs(what: str, preset, num_nodes: int, batch: int, algorithm: str, mode: str = "forward",
             cheb_k: int = 2, output_dim: int = 1, ycov_dim: int = 2, input_dim: int = 3) -> Cost:
    """One of the benchmark's single ops (``meta_linear_st``, ``adaptive_propagate``,
    ``adaptive_propagate_st``) at the shapes it has inside HimNet."""
    _check_algorithm(algorithm)
    n, b, h = int(num_nodes), int(batch), preset.hidden_dim
    if what == "meta_linear_st":
        c = output_dim + ycov_dim + h
        cost = _meta_linear(algorithm, "ST", b, n, cheb_k * c, 2 * h, preset.st_embedding_dim)
    elif what == "adaptive_propagate":
        cost = _propagate(algorithm, b, n, input_dim + h, preset.node_embedding_dim, cheb_k, False)
        if algorithm == "original":
            cost = _supports_build(n, preset.node_embedding_dim, cheb_k, 1) + cost
    elif what == "adaptive_propagate_st":
        cost = _propagate(algorithm, b, n, output_dim + ycov_dim + h, preset.st_embedding_dim, cheb_k, True)
        if algorithm == "original":
            cost = _supports_build(n, preset.st_embedding_dim, cheb_k, b) + cost
    else:
        raise ValueError(f"unknown op {what!r}; expected meta_linear_st, adaptive_propagate or adaptive_propagate_st")
    return cost.scaled(_factor(mode))


def predict(cost: Cost, precision: str = "fp32", limits: Limits = H100) -> Dict[str, float]:
    """Predicted seconds of ``cost``: per kernel the larger of its compute and memory time.

    Returns seconds, the pure compute and pure memory times, and which bound dominates."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    peak, size = limits.compute[precision], PRECISIONS[precision]
    total = t_flops = t_bytes = 0.0
    for f, e in cost.parts:
        tf, tb = f / peak, size * e / limits.bandwidth
        total += max(tf, tb)
        t_flops += tf
        t_bytes += tb
    return {"seconds": total, "compute_s": t_flops, "memory_s": t_bytes,
            "bound": "memory" if t_bytes > t_flops else "compute"}


def predicted_ms(kernel: str, mode: str, preset, num_nodes: int, batch: int, provider: str,
                 precision: str = "fp32", limits: Limits = H100):
    """Predicted milliseconds of one benchmark row (the original's algorithm for the
    ``reference*`` providers, ours for the others); None for an unknown kernel."""
    algorithm = "original" if provider.startswith("reference") else "ours"
    try:
        if kernel == "himnet":
            cost = model_costs(preset, num_nodes, batch, algorithm, mode)
        else:
            cost = op_costs(kernel, preset, num_nodes, batch, algorithm, mode)
    except ValueError:
        return None
    return 1e3 * predict(cost, precision, limits)["seconds"]


def table(preset, num_nodes: int, batch: int, limits: Limits = H100):
    """Long-format rows: every op and the model, both algorithms, every precision, forward and
    training (ops: forward, backward, full; model: infer, train)."""
    rows = []
    items = [("himnet", m) for m in ("infer", "train")] + [
        (op, m) for op in ("meta_linear_st", "adaptive_propagate", "adaptive_propagate_st")
        for m in ("forward", "backward", "full")]
    for kernel, mode in items:
        for algorithm in ("original", "ours"):
            if kernel == "himnet":
                cost = model_costs(preset, num_nodes, batch, algorithm, mode)
            else:
                cost = op_costs(kernel, preset, num_nodes, batch, algorithm, mode)
            for precision in PRECISIONS:
                p = predict(cost, precision, limits)
                rows.append(dict(kernel=kernel, mode=mode, algorithm=algorithm, precision=precision,
                                 N=num_nodes, B=batch, preset=preset.name, gflop=cost.flops / 1e9,
                                 gbytes=cost.bytes(precision) / 1e9, predicted_ms=1e3 * p["seconds"],
                                 compute_ms=1e3 * p["compute_s"], memory_ms=1e3 * p["memory_s"],
                                 bound=p["bound"], limits=limits.name))
    return rows


def _factor(mode: str) -> float:
    if mode not in _MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(_MODE_FACTOR)}, got {mode!r}")
    return _MODE_FACTOR[mode]


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ("original", "ours"):
        raise ValueError(f"algorithm must be 'original' or 'ours', got {algorithm!r}")


def with_measured(rows, measured_csv: str):
    """Add ``measured_ms`` (p50 of the matching benchmark row: the reference provider for the
    original algorithm, the fastest of ours for ours) and ``measured_over_predicted``."""
    import pandas as pd

    m = pd.read_csv(measured_csv)
    m = m[m.status == "ok"]
    out = []
    for r in rows:
        sel = m[(m.kernel == r["kernel"]) & (m["mode"] == r["mode"]) & (m.x == r["N"]) & (m.batch_size == r["B"])]
        if r["algorithm"] == "original":
            sel = sel[sel.provider == "reference"]
        else:
            sel = sel[~sel.provider.str.startswith("reference")]
        r = dict(r)
        if len(sel) and r["precision"] == "fp32":
            best = sel.loc[sel.p50.astype(float).idxmin()]
            r["measured_ms"] = float(best.p50)
            r["measured_provider"] = best.provider
            r["measured_over_predicted"] = float(best.p50) / r["predicted_ms"]
        out.append(r)
    return out


def plot(rows, path: str) -> str:
    """Grouped bars: predicted ms of the original and ours per precision for the model and each
    op's forward+backward, measured fp32 p50 as markers where given (log scale: the bars span
    three decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [("himnet", "train"), ("himnet", "infer"), ("meta_linear_st", "full"),
             ("adaptive_propagate", "full"), ("adaptive_propagate_st", "full")]
    series = [(a, p) for a in ("original", "ours") for p in PRECISIONS]
    fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 3.6))
    for ax, (kernel, mode) in zip(axes, items):
        vals, meas = [], []
        for a, p in series:
            r = next(x for x in rows if x["kernel"] == kernel and x["mode"] == mode
                     and x["algorithm"] == a and x["precision"] == p)
            vals.append(r["predicted_ms"])
            meas.append(r.get("measured_ms"))
        colors = ["#c44e52"] * 3 + ["#4c72b0"] * 3
        xs = range(len(series))
        ax.bar(xs, vals, color=colors, alpha=0.8)
        for x, v in zip(xs, meas):
            if v is not None:
                ax.plot([x], [v], "k_", markersize=16, markeredgewidth=2.5)
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{'orig' if a == 'original' else 'ours'}\n{p}" for a, p in series], fontsize=7)
        ax.set_title(f"{kernel} {mode}", fontsize=9)
        ax.set_ylabel("ms (bars: predicted; black: measured fp32 p50)", fontsize=7)
    first = rows[0]
    fig.suptitle(f"Roofline prediction, {first['preset']} N={first['N']} B={first['B']}, {first['limits']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
