"""Naive forecasts printed beside the model: last value and historical average.

* **last value** (persistence): every horizon predicts the last input step (the last observed
  value where the data carry missing readings forward, as the model's inputs do).
* **historical average** (HA): the mean of the signal per (time-of-day slot, node) over the
  training steps, looked up at each target's time of day. Zeros (missing readings) are left
  out of the means; a slot never observed falls back to the node's mean, then the global mean.

Both are scored with the model's masked metrics (:class:`~himnet_fast.training.protocol.MetricAccumulator`)
on exactly the model's windows, so the comparison is like for like.

:func:`tgcn_reference_baselines` recomputes the figures the T-GCN literature quotes for
Los-loop, with T-GCN's own window sets (one set per horizon), to check this module against them.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..data.series import STEPS_PER_DAY, TrafficData
from .protocol import MetricAccumulator


def _slots(tod: np.ndarray) -> np.ndarray:
    """time-of-day fraction -> 5-minute slot 0..287 (as the model's embedding index)."""
    return np.clip((tod * STEPS_PER_DAY).astype(np.int64), 0, STEPS_PER_DAY - 1)


def ha_fit_end(data: TrafficData) -> int:
    """The steps the historical average may see: ``extra['fit_end']`` (T-GCN: the whole
    training part) or else up to the last target of the last training window."""
    if "fit_end" in data.extra:
        return int(data.extra["fit_end"])
    starts = data.splits["train"].starts
    return int(starts[-1]) + data.in_steps + data.out_steps


def ha_profile(signal: np.ndarray, tod: np.ndarray) -> np.ndarray:
    """Mean of ``signal`` (T, N) per (slot, node), zeros ignored -> (288, N) float64."""
    sig = signal.astype(np.float64)
    valid = sig != 0
    slot = _slots(tod)
    total = np.zeros((STEPS_PER_DAY, sig.shape[1]))
    count = np.zeros_like(total)
    np.add.at(total, slot, np.where(valid, sig, 0.0))
    np.add.at(count, slot, valid.astype(np.float64))
    node_count = count.sum(0)
    glob = total.sum() / max(count.sum(), 1.0)
    node_mean = np.where(node_count > 0, total.sum(0) / np.maximum(node_count, 1.0), glob)
    return np.where(count > 0, total / np.maximum(count, 1.0), node_mean[None, :])


def baseline_metrics(data: TrafficData, split: str = "test", *, max_windows: Optional[int] = None) -> Dict[str, dict]:
    """{"last value": metrics, "historical average": metrics} on ``split``'s windows (the first
    ``max_windows`` of them if given), in the format of
    :func:`~himnet_fast.training.loop.evaluate_model` (raw units, masked)."""
    series = data.series
    sig = series[..., 0]
    fit_end = ha_fit_end(data)
    profile = ha_profile(sig[:fit_end], series[:fit_end, 0, 1])
    starts = data.splits[split].starts[:max_windows]
    out = {}
    for name in ("last value", "historical average"):
        acc = MetricAccumulator(data.out_steps)
        for lo in range(0, len(starts), 256):  # bounded memory on long series
            st = starts[lo:lo + 256]
            yi = st[:, None] + data.in_steps + np.arange(data.out_steps)          # (B, T_out)
            true = sig[yi]                                                         # (B, T_out, N)
            if name == "last value":  # the last observed value when the inputs carry it forward
                pred = np.broadcast_to(data.input_signal[st + data.in_steps - 1][:, None], true.shape)
            else:
                pred = profile[_slots(series[yi, 0, 1])]
            acc.update(torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float64)),
                       torch.from_numpy(true.astype(np.float64)))
        out[name] = acc.compute()
    return out


def tgcn_reference_baselines(signal: np.ndarray, *, train_frac: float = 0.8, in_steps: int = 12,
                             horizons: Sequence[int] = (3, 6, 9, 12),
                             steps_per_day: int = STEPS_PER_DAY) -> dict:
    """Last value and HA as T-GCN's code evaluates Los-loop: the test part is the last
    ``1 - train_frac`` of the steps; for horizon ``h`` its windows are
    ``range(len(test) - in_steps - h)`` (T-GCN's loop, which leaves out the last window) and the
    score is at step ``h``. HA predicts every test step from the per-(slot, node) mean of the
    training part. ``signal`` (T, N) starting at midnight. Returns
    ``{"last value": {h: {"MAE", "RMSE"}}, "historical average": {"MAE", "RMSE"}}``.
    """
    x = np.asarray(signal, dtype=np.float64)
    T = x.shape[0]
    n_train = int(T * train_frac)
    test = x[n_train:]
    lv = {}
    for h in horizons:
        s = np.arange(len(test) - in_steps - h)
        err = test[s + in_steps - 1 + h] - test[s + in_steps - 1]
        lv[int(h)] = {"MAE": float(np.abs(err).mean()), "RMSE": float(np.sqrt((err ** 2).mean()))}
    slot = np.arange(T) % steps_per_day
    prof = np.stack([x[:n_train][slot[:n_train] == k].mean(0) for k in range(steps_per_day)])
    err = test - prof[slot[n_train:]]
    return {"last value": lv, "historical average": {"MAE": float(np.abs(err).mean()),
                                                     "RMSE": float(np.sqrt((err ** 2).mean()))}}


def verdicts(model: dict, baseline: dict, steps: Sequence[int], key: str = "MAE") -> Dict[str, list]:
    """Per listed horizon step, whether the model's ``key`` is lower ("beats"), equal ("ties"),
    higher ("loses") than the baseline's, or not comparable ("n/a": NaN, no valid target)."""
    out: Dict[str, list] = {"beats": [], "ties": [], "loses": [], "n/a": []}
    for s in steps:
        a, b = model["steps"][s - 1][key], baseline["steps"][s - 1][key]
        out["n/a" if not (np.isfinite(a) and np.isfinite(b)) else
            "beats" if a < b else "ties" if a == b else "loses"].append(s)
    return out


def verdict_line(model_name: str, baseline_name: str, verdict: Dict[str, list], *, step_minutes: int = 5,
                 key: str = "MAE") -> str:
    """One sentence saying at which horizons the model beats, ties or loses to one baseline."""
    n = sum(len(v) for v in verdict.values())
    phrases = {"beats": f"beats the {baseline_name}", "ties": f"ties with the {baseline_name}",
               "loses": f"loses to the {baseline_name}", "n/a": f"cannot be compared with the {baseline_name}"}
    for k, steps in verdict.items():
        if steps and len(steps) == n:
            return f"{model_name} {phrases[k]} ({key}) at every listed horizon"
    parts, named = [], False
    for k in sorted((k for k in verdict if verdict[k]), key=lambda k: min(verdict[k])):  # in horizon order
        if verdict[k]:
            when = ", ".join(str(s * step_minutes) for s in verdict[k]) + " min"
            verb = phrases[k] if not named else phrases[k].replace(f"the {baseline_name}", "it")
            parts.append(f"{verb}{f' ({key})' if not named else ''} at {when}")
            named = True
    return f"{model_name} " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])


def format_comparison(model: Optional[dict], baselines: Dict[str, dict], *, steps: Sequence[int] = (3, 6, 9, 12),
                      step_minutes: int = 5, model_name: str = "HimNet") -> str:
    """A per-horizon table: MAE / RMSE / MAPE of the model and of each baseline, then one line
    per baseline saying at which listed horizons the model beats it, ties or loses to it (MAE)."""
    cols = ([(model_name, model)] if model is not None else []) + list(baselines.items())
    steps = [s for s in steps if s <= len(next(iter(baselines.values()))["steps"])]
    head = f"{'horizon':>12} " + " ".join(f"{name[:24]:>24}" for name, _ in cols)
    sub = f"{'':>12} " + " ".join(f"{'MAE  RMSE  MAPE%':>24}" for _ in cols)
    lines = [head, sub]

    def cell(m):
        return f"{m['MAE']:7.2f} {m['RMSE']:6.2f} {m['MAPE']:6.2f}%".rjust(24)

    for s in steps:
        label = f"{s * step_minutes} min ({s})"
        lines.append(f"{label:>12} " + " ".join(cell(m["steps"][s - 1]) for _, m in cols))
    lines.append(f"{'all 12':>12} " + " ".join(cell(m["overall"]) for _, m in cols))
    if model is not None:
        for name, metrics in baselines.items():
            lines.append(verdict_line(model_name, name, verdicts(model, metrics, steps), step_minutes=step_minutes))
    return "\n".join(lines)
