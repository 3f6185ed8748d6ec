"""Plots written at the end of training: forecast against truth, and error by horizon.

matplotlib is optional (``pip install matplotlib`` or the ``train`` extra); without it the
functions return None and the trainer says so once.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..data.series import TrafficData


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


@torch.no_grad()
def predict_split(model, data: TrafficData, split: str = "test", *, steps: Sequence[int] = (3, 12),
                  batch_size: int = 32, device="cpu", max_windows: Optional[int] = None,
                  residual: bool = False) -> np.ndarray:
    """Raw-unit forecasts of every window of ``split`` at the horizon ``steps`` (1-based):
    (S, len(steps), N) float32. Window ``i`` forecasts step ``starts[i] + in_steps - 1 + h``."""
    from .protocol import to_forecast

    was = model.training
    model.eval()
    n = len(data.splits[split]) if max_windows is None else min(max_windows, len(data.splits[split]))
    idx = [h - 1 for h in steps]
    out = []
    for lo in range(0, n, batch_size):
        b = data.batch(split, np.arange(lo, min(n, lo + batch_size))).to(device)
        pred = to_forecast(model(b.x, b.y_cov), b.x, data.scaler, residual)    # (B, T_out, N, 1)
        out.append(pred[:, idx, :, 0].cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, len(steps), data.num_nodes), np.float32)


def plot_forecasts(pred: np.ndarray, data: TrafficData, path: str, *, split: str = "test",
                   steps: Sequence[int] = (3, 12), nodes: Optional[Sequence[int]] = None,
                   title: str = "HimNet") -> Optional[str]:
    """Truth and forecasts at ``steps`` along the split's time axis for a few sensors.

    ``pred`` (S, len(steps), N) from :func:`predict_split`. ``nodes`` default: three sensors
    with the largest variance on the split (the interesting ones: congestion)."""
    plt = _pyplot()
    if plt is None:
        return None
    starts = data.splits[split].starts[: pred.shape[0]]
    sig = data.series[..., 0]
    t_lo, t_hi = int(starts[0]), int(starts[-1]) + data.in_steps + data.out_steps
    if nodes is None:
        nodes = np.argsort(-sig[t_lo:t_hi].std(0))[:3].tolist()
    minutes = int(data.extra.get("step_minutes", 5))
    hours = lambda t: (np.asarray(t) - t_lo) * minutes / 60.0  # noqa: E731
    fig, axes = plt.subplots(len(nodes), 1, figsize=(10, 2.6 * len(nodes)), sharex=True, squeeze=False)
    for ax, n in zip(axes[:, 0], nodes):
        truth = sig[t_lo:t_hi, n].astype(np.float64)
        truth = np.where(truth == 0, np.nan, truth)  # 0 marks a missing reading
        ax.plot(hours(np.arange(t_lo, t_hi)), truth, color="black", lw=1.2, label="truth")
        for j, h in enumerate(steps):
            ax.plot(hours(starts + data.in_steps - 1 + h), pred[:, j, n], lw=1.0,
                    label=f"forecast {h * minutes} min ahead")
        ax.set_ylabel(f"sensor {n}")
    axes[-1, 0].set_xlabel(f"hours since the start of the {split} part")
    axes[0, 0].legend(loc="lower left", fontsize=8, ncol=len(steps) + 1)
    fig.suptitle(f"{title} on {data.name}, {split} part: forecast vs truth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_error_by_horizon(model_metrics: dict, baselines: Dict[str, dict], path: str, *, step_minutes: int = 5,
                          title: str = "HimNet", dataset: str = "") -> Optional[str]:
    """MAE and RMSE per horizon step of the model and the baselines (raw units)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    cols = [(title, model_metrics)] + list(baselines.items())
    for ax, key in zip(axes, ("MAE", "RMSE")):
        for name, m in cols:
            x = [(i + 1) * step_minutes for i in range(len(m["steps"]))]
            ax.plot(x, [s[key] for s in m["steps"]], "-o", ms=3, label=name, lw=2 if name == title else 1)
        ax.set_xlabel("horizon (minutes)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Test error by horizon{' on ' + dataset if dataset else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
