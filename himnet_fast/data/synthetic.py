"""Synthetic traffic flow with the structure of the PEMS benchmarks, for any shape.

Deterministic by seed, vectorised numpy, float32. The structure, calibrated loosely on the
real PEMS08 sample (flow 0..865 vehicles per 5 minutes, mean about 215):

* sensors fall into clusters with different regimes: inbound commuter (strong morning
  peak), outbound commuter (strong evening peak), two-way (both), arterial (flat daytime
  plateau) and low-volume;
* a daily cycle (night trough, daytime plateau, rush hours whose time jitters per sensor)
  and a weekly one (weekends: lower plateau, no rush hours, a midday bump; Friday evening
  heavier);
* day-to-day variation per cluster, smooth multiplicative noise, count noise, short
  incidents (flow drops for up to an hour);
* missing readings as zeros: isolated ones and outages of up to 3 hours.

Values are rounded to whole vehicles. PEMS07's shape (28,224 x 883) takes about 3 s and
100 MB per (T, N) float32 array.
"""
from __future__ import annotations

import numpy as np

from .series import parse_start

# regime: (plateau, morning peak, evening peak, scale of the base level)
_REGIMES = np.array([
    [0.55, 0.65, 0.20, 1.00],   # inbound commuter
    [0.55, 0.20, 0.65, 1.00],   # outbound commuter
    [0.60, 0.45, 0.45, 1.15],   # two-way freeway
    [0.80, 0.10, 0.10, 0.80],   # arterial: flat daytime plateau
    [0.60, 0.15, 0.15, 0.35],   # low volume
], dtype=np.float32)


def _bump(hours: np.ndarray, centre: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((hours - centre) / np.float32(width)) ** 2, dtype=np.float32)


def synthetic_traffic(num_steps: int, num_nodes: int, *, seed: int = 0, start="2016-07-01 00:00",
                      step_minutes: int = 5, missing_rate: float = 0.005, mean_flow: float = 215.0) -> np.ndarray:
    """Synthetic flow (num_steps, num_nodes) float32, integer-valued, zeros where missing.

    ``missing_rate`` is the target fraction of zero (missing) readings; ``mean_flow`` sets the
    overall level. The same arguments always give the same array.
    """
    if num_steps <= 0 or num_nodes <= 0:
        raise ValueError(f"num_steps and num_nodes must be positive, got {num_steps} x {num_nodes}")
    if not 0 <= missing_rate < 1:
        raise ValueError(f"missing_rate must be in [0, 1), got {missing_rate}")
    rng = np.random.default_rng(seed)
    T, N = num_steps, num_nodes
    f32 = np.float32

    t0 = parse_start(start)
    minutes = t0.hour * 60 + t0.minute + np.arange(T, dtype=np.int64) * step_minutes
    day = minutes // 1440
    hours = ((minutes % 1440) / 60.0).astype(f32)[:, None]          # (T, 1)
    dow = (t0.weekday() + day) % 7
    weekend = (dow >= 5).astype(f32)[:, None]                        # (T, 1)
    friday = (dow == 4).astype(f32)[:, None]

    # Clusters: a few per graph, each with a regime; nodes draw their own level and peak times.
    n_clusters = int(min(12, max(2, round(np.sqrt(N) / 2))))
    cluster_regime = rng.integers(0, len(_REGIMES), n_clusters)
    cluster_regime[: min(n_clusters, len(_REGIMES))] = np.arange(min(n_clusters, len(_REGIMES)))
    node_cluster = rng.integers(0, n_clusters, N)
    reg = _REGIMES[cluster_regime[node_cluster]]                     # (N, 4)
    level = (reg[:, 3] * rng.lognormal(0.0, 0.25, N)).astype(f32)
    am = (f32(8.0) + rng.normal(0, 0.35, N)).astype(f32)             # morning peak hour per node
    pm = (f32(17.5) + rng.normal(0, 0.45, N)).astype(f32)

    # Daily shape: night trough (a third of the daytime level), smooth rise around 5:30, fall
    # around 22:30, rush-hour bumps on weekdays.
    rise = 1.0 / (1.0 + np.exp(-(hours - f32(5.5)) * f32(1.4), dtype=f32))
    fall = 1.0 / (1.0 + np.exp((hours - f32(22.5)) * f32(0.9), dtype=f32))
    plateau = f32(0.3) + f32(0.7) * rise * fall                       # (T, 1)
    weekday = 1.0 - weekend
    shape = plateau * (reg[:, 0] * (1.0 - 0.25 * weekend))           # (T, N)
    shape += weekday * reg[:, 1] * _bump(hours, am, 1.1)
    shape += weekday * reg[:, 2] * (1.0 + 0.15 * friday) * _bump(hours, pm, 1.4)
    shape += weekend * f32(0.25) * _bump(hours, np.float32(13.5), 2.5)

    # Day-to-day variation per cluster, then smooth multiplicative noise (1-hour moving average).
    n_days = int(day[-1]) + 1
    daily = rng.normal(1.0, 0.05, (n_days, n_clusters)).astype(f32)
    shape *= daily[day][:, node_cluster]
    white = rng.standard_normal((T + 11, N), dtype=f32)
    c = np.cumsum(white, axis=0, dtype=f32)
    smooth = (c[11:] - np.vstack([np.zeros((1, N), f32), c[:-12]])) / f32(12.0)
    shape *= 1.0 + f32(0.08) * smooth

    flow = shape * level
    flow *= f32(mean_flow) / flow.mean(dtype=np.float64)
    flow += np.sqrt(np.maximum(flow, 0), dtype=f32) * rng.standard_normal((T, N), dtype=f32) * f32(1.5)

    # Incidents: flow drops by 30-70% for 15-60 minutes, about one per sensor-week.
    n_inc = rng.poisson(T * N / 2016)
    if n_inc:
        nodes = rng.integers(0, N, n_inc)
        starts = rng.integers(0, T, n_inc)
        lengths = rng.integers(3, 13, n_inc)
        factors = rng.uniform(0.3, 0.7, n_inc).astype(f32)
        for n, s, ln, f in zip(nodes, starts, lengths, factors):  # few events: a short loop
            flow[s:s + ln, n] *= f

    flow = np.rint(np.maximum(flow, 0), out=flow)

    # Missing readings: half the budget as isolated zeros, half as outages of 1..36 steps.
    if missing_rate > 0:
        iso = rng.random((T, N), dtype=f32) < f32(missing_rate / 2)
        flow[iso] = 0
        n_out = rng.poisson(missing_rate / 2 * T * N / 18.5)
        nodes = rng.integers(0, N, n_out)
        starts = rng.integers(0, T, n_out)
        lengths = rng.integers(1, 37, n_out)
        for n, s, ln in zip(nodes, starts, lengths):
            flow[s:s + ln, n] = 0
    return flow
