"""Forecasts in the units of the data: from raw readings and their timestamps to the model's
inputs, and from the model's output back to readings.

:func:`forecast` is what ``HimNet.forecast`` runs: it takes a T x N history of raw readings
(NaN or 0 where a reading is missing) with their timestamps, builds the input window exactly as
the training pipeline does (missing readings filled as the model was trained, the signal
z-scored with the training scaler, time of day and day of week from the timestamps, the future
time features of the forecast steps), runs the model once and returns the forecast in the
readings' units with its timestamps. The model is duck-typed: anything called as
``model(x, y_cov)`` with HimNet's tensors, carrying the attributes that
``HimNet.from_checkpoint`` sets (``scaler``, ``checkpoint_info``) or given them as arguments.

:func:`to_forecast` converts the model's output to raw units (residual or not); training,
evaluation and the plots use the same function.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from .files import stamps_to_features
from .series import StandardScaler, carry_forward


def to_forecast(out: torch.Tensor, x: torch.Tensor, scaler, residual: bool = False) -> torch.Tensor:
    """Raw-unit forecast (B, T_out, N, 1) from the model's output ``out`` (same shape) and its
    input ``x`` (B, T_in, N, C) with ``x[..., 0]`` scaled.

    ``residual=False`` (the paper): ``out`` is the scaled signal. ``residual=True`` (the small
    CPU preset): ``out`` is the change from the last input step in units of the scaler's std,
    so an untrained model starts from the last-value forecast and a few minutes of training
    improve on it instead of first having to learn to copy its input. With missing readings
    carried forward (``TrafficData.fill_missing``) the last input step is the last observed value.
    """
    if not residual:
        return scaler.inverse_transform(out.float())
    last = scaler.inverse_transform(x[:, -1, :, :1].float())          # (B, N, 1)
    return last[:, None] + out.float() * scaler.std


class Forecast(NamedTuple):
    """``values`` (out_steps, N) float32 in the units of the history; ``timestamps``
    (out_steps,) datetime64[m], the time of each forecast step. Unpacks as a pair."""

    values: np.ndarray
    timestamps: np.ndarray


def _as_minutes(timestamps, what: str = "timestamps") -> np.ndarray:
    """datetime-likes (datetime64, pandas, datetime, ISO strings) -> datetime64[m] (T,), local
    wall time (a time zone is dropped: the model's time features are wall-clock times)."""
    tz = getattr(timestamps, "tz", None)
    if tz is not None and hasattr(timestamps, "tz_localize"):
        timestamps = timestamps.tz_localize(None)
    t = np.asarray(timestamps)
    if t.dtype == object:
        t = np.array([v.replace(tzinfo=None) if getattr(v, "tzinfo", None) is not None else v for v in t.ravel()],
                     dtype=object).reshape(t.shape)
    if t.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of datetimes, got shape {t.shape}")
    if t.dtype.kind in "iufb":
        raise ValueError(f"{what} must be datetimes (numpy datetime64, pandas or datetime objects, or "
                         f"'YYYY-MM-DD HH:MM' strings), got numbers ({t.dtype})")
    try:
        fine = t.astype("datetime64[ns]")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} must be datetimes (numpy datetime64, pandas or datetime objects, or "
                         f"'YYYY-MM-DD HH:MM' strings): {exc}") from None
    if np.isnat(fine).any():
        raise ValueError(f"{what}[{int(np.argmax(np.isnat(fine)))}] is missing (NaT)")
    minutes = fine.astype("datetime64[m]")
    off = np.nonzero(minutes.astype("datetime64[ns]") != fine)[0]
    if len(off):
        raise ValueError(f"{what} must fall on whole minutes; {what}[{off[0]}] is {fine[off[0]]}")
    return minutes


def _as_history(history) -> np.ndarray:
    if isinstance(history, torch.Tensor):
        history = history.detach().cpu().numpy()
    try:
        values = np.asarray(history, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"history must be a (T, N) array of numbers (NaN for a missing reading): {exc}") from None
    if values.ndim != 2:
        raise ValueError(f"history must have shape (T, N): one row per time step, one column per sensor; got "
                         f"shape {values.shape}" + (" (a single sensor: history.reshape(-1, 1))"
                                                   if values.ndim == 1 else ""))
    if np.isinf(values).any():
        t, n = np.argwhere(np.isinf(values))[0]
        raise ValueError(f"history has an infinite value at row {t}, sensor {n}; use NaN for a missing reading")
    return values


def model_window(history, timestamps, *, num_nodes: int, in_steps: int, out_steps: int, scaler: StandardScaler,
                 step_minutes: Optional[int] = None, fill_missing: bool = True, fill_values=None):
    """The model's inputs for a forecast after the last row of ``history``.

    ``history`` (T, N) raw readings, NaN or 0 where missing; ``timestamps`` (T,) increasing, on
    a grid of ``step_minutes`` (inferred as the smallest gap when None); rows absent from the
    grid count as missing. The last ``in_steps`` grid steps up to the last timestamp are the
    window; missing readings are carried forward from the last observation (from anywhere in
    ``history``; ``fill_values`` (N,) before a sensor's first one, default the scaler's mean)
    or, with ``fill_missing=False``, are 0 as in the original's training data.

    Returns ``(x (1, in_steps, N, 3), y_cov (1, out_steps, N, 2), future (out_steps,) datetime64[m])``,
    float32 tensors on the CPU, built as :meth:`TrafficData.batch` builds a window.
    """
    values = _as_history(history)
    T, N = values.shape
    if N != num_nodes:
        raise ValueError(f"history has {N} columns; the model forecasts {num_nodes} sensors (one column per "
                         f"sensor, in the order of its training data)")
    if timestamps is None:
        index = getattr(history, "index", None)
        if index is None or np.asarray(index).dtype.kind not in "MO":
            raise ValueError("timestamps are required: one datetime per row of history (or a pandas DataFrame "
                             "indexed by time)")
        timestamps = index
    t = _as_minutes(timestamps)
    if len(t) != T:
        raise ValueError(f"timestamps has {len(t)} entries; history has {T} rows (one timestamp per row)")
    if T == 0:
        raise ValueError("history is empty; the model needs the last readings before the forecast")
    gaps = np.diff(t.astype(np.int64))
    if len(gaps) and (gaps <= 0).any():
        i = int(np.argmax(gaps <= 0))
        raise ValueError(f"timestamps must increase; timestamps[{i + 1}] ({t[i + 1]}) is not after "
                         f"timestamps[{i}] ({t[i]})")
    if step_minutes is None:
        if not len(gaps):
            raise ValueError("a single timestamp does not give the interval between readings; pass step_minutes")
        step_minutes = int(gaps.min())
    if isinstance(step_minutes, bool) or not isinstance(step_minutes, (int, np.integer)) or step_minutes <= 0 \
            or 1440 % step_minutes:
        raise ValueError(f"step_minutes must be a positive number of minutes dividing a day, got {step_minutes!r}")
    step = int(step_minutes)
    minutes = t.astype(np.int64)
    back = (minutes[-1] - minutes)                       # minutes before the last reading
    off = np.nonzero(back % step)[0]
    if len(off):
        raise ValueError(f"timestamps must lie on the model's {step}-minute grid ending at the last one "
                         f"({t[-1]}); timestamps[{off[0]}] ({t[off[0]]}) does not")
    span = int(back[0] // step) + 1                      # grid steps from the first reading to the last
    if span < in_steps:
        raise ValueError(f"history covers {span} step(s) of {step} minutes ({t[0]} to {t[-1]}); the model "
                         f"needs the last {in_steps} steps before the forecast (missing readings may be NaN)")
    grid = np.full((span, N), np.nan)
    grid[span - 1 - back // step] = values
    missing = np.isnan(grid) | (grid == 0)
    if fill_missing:
        init = np.full(N, scaler.mean) if fill_values is None else np.asarray(fill_values, dtype=np.float64)
        if init.shape != (N,):
            raise ValueError(f"fill_values must have one value per sensor ({N}), got shape {init.shape}")
        signal = carry_forward(np.where(missing, 0.0, grid), missing, init)[-in_steps:]
    else:
        signal = np.where(missing, 0.0, grid)[-in_steps:].astype(np.float32)
    stamps = t[-1] - np.arange(in_steps - 1, -1, -1) * np.timedelta64(step, "m")
    future = t[-1] + np.arange(1, out_steps + 1) * np.timedelta64(step, "m")
    tod, dow = stamps_to_features(stamps)
    ftod, fdow = stamps_to_features(future)
    x = torch.empty(1, in_steps, N, 3)
    x[0, :, :, 0] = torch.from_numpy(np.ascontiguousarray(signal, dtype=np.float32))
    x[0, :, :, 1] = torch.from_numpy(tod)[:, None]
    x[0, :, :, 2] = torch.from_numpy(dow)[:, None]
    x[..., 0] = scaler.transform(x[..., 0])
    y_cov = torch.empty(1, out_steps, N, 2)
    y_cov[0, :, :, 0] = torch.from_numpy(ftod)[:, None]
    y_cov[0, :, :, 1] = torch.from_numpy(fdow)[:, None]
    return x, y_cov, future


@torch.no_grad()
def forecast(model, history, timestamps=None, *, scaler: Optional[StandardScaler] = None,
             residual: Optional[bool] = None, step_minutes: Optional[int] = None,
             fill_missing: Optional[bool] = None, fill_values=None) -> Forecast:
    """The model's forecast after the last row of ``history``, in the units of ``history``.

    ``history`` (T, N): raw readings, one column per sensor in the order of the training data,
    NaN (or 0) where a reading is missing, covering at least the model's ``in_steps`` steps
    before the forecast (earlier rows only feed the carry-forward of missing readings).
    ``timestamps`` (T,): their times (datetime64, pandas, datetime or ISO strings; a pandas
    DataFrame's DatetimeIndex when omitted), increasing, on the model's step grid.

    The other arguments default to what ``HimNet.from_checkpoint`` attaches to the model
    (``model.scaler``, ``model.checkpoint_info``): the training scaler, whether the output is a
    residual change, the step in minutes, and how missing inputs were filled in training
    (carried forward, before a sensor's first reading its training mean; or 0, the original's
    convention). A checkpoint that does not record the fill carries readings forward for a
    residual model (a 0 would be taken as the last value) and feeds 0 otherwise, as the
    original was trained.

    Returns a :class:`Forecast` ``(values (out_steps, N) float32, timestamps (out_steps,))``.
    """
    info = dict(getattr(model, "checkpoint_info", None) or {})
    scaler = scaler if scaler is not None else getattr(model, "scaler", None)
    if scaler is None and "scaler_mean" in info:
        scaler = StandardScaler(info["scaler_mean"], info["scaler_std"])
    if scaler is None:
        raise ValueError("the model carries no scaler (it was not loaded with from_checkpoint from a himnet_fast "
                         "training checkpoint); pass scaler=StandardScaler(mean, std) of its training data")
    if residual is None:
        residual = bool(info.get("residual", False))
    if fill_missing is None:
        fill_missing = bool(info["fill_missing"]) if "fill_missing" in info else residual
    if fill_values is None:
        fill_values = info.get("fill_values")
    if step_minutes is None:
        step_minutes = info.get("step_minutes")
    num_nodes = getattr(model, "num_nodes", None) or info.get("num_nodes")
    in_steps = getattr(model, "in_steps", None) or info.get("in_steps") or 12
    out_steps = getattr(model, "out_steps", None) or info.get("out_steps") or 12
    if num_nodes is None:
        raise ValueError("cannot tell how many sensors the model forecasts: it has no num_nodes attribute")
    x, y_cov, future = model_window(history, timestamps, num_nodes=int(num_nodes), in_steps=int(in_steps),
                                    out_steps=int(out_steps), scaler=scaler, step_minutes=step_minutes,
                                    fill_missing=fill_missing, fill_values=fill_values)
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if param is not None:
        x, y_cov = x.to(param.device), y_cov.to(param.device)
        if param.dtype.is_floating_point and param.dtype != x.dtype:
            x, y_cov = x.to(param.dtype), y_cov.to(param.dtype)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        out = model(x, y_cov)
    finally:
        if was_training:
            model.train()
    pred = to_forecast(out, x, scaler, residual)
    return Forecast(pred[0, :, :, 0].float().cpu().numpy(), future)
