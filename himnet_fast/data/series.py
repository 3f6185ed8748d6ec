"""Traffic series, split windows and the training-set scaler.

Conventions (HimNet/STAEformer): the series is ``(T, N, 3)`` float32 with channel 0 the
signal (flow or speed), channel 1 the time of day as a fraction of the day in [0, 1) and
channel 2 the day of week 0..6 (Monday = 0). A window starting at ``s`` has inputs
``series[s : s + 12]`` and targets ``series[s + 12 : s + 24]``; HimNet's ``index.npz`` stores
it as the row ``[s, s + 12, s + 24]``.

Missing readings are 0 in ``series[..., 0]`` (NaN in a file becomes 0): the masked losses and
metrics leave those targets out. What the model is fed for them depends on the data: the
paper's benchmarks keep the original convention (a 0 input, so results stay comparable), while
``fill_missing`` data (your own series, Los-loop) carry each sensor's last observation forward
(:func:`carry_forward`), so an input never sees a value from after its own step and the last
input step of a window is the last *observed* value.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

STEPS_PER_DAY = 288  # HimNet's tod_embedding has 288 rows: one per 5-minute slot
SPLITS = ("train", "val", "test")

# Shapes and start times of the benchmarks (from the public data files' README); "split" is the
# chronological train:val:test ratio of the windows. PEMS08_SAMPLE is the bundled real sample.
DATASET_INFO: Dict[str, dict] = {
    "METRLA": dict(num_nodes=207, num_steps=34272, start="2012-03-01 00:00", split=(0.7, 0.1, 0.2)),
    "PEMSBAY": dict(num_nodes=325, num_steps=52116, start="2017-01-01 00:00", split=(0.7, 0.1, 0.2)),
    "PEMS03": dict(num_nodes=358, num_steps=26208, start="2018-09-01 00:00", split=(0.6, 0.2, 0.2)),
    "PEMS04": dict(num_nodes=307, num_steps=16992, start="2018-01-01 00:00", split=(0.6, 0.2, 0.2)),
    "PEMS07": dict(num_nodes=883, num_steps=28224, start="2017-05-01 00:00", split=(0.6, 0.2, 0.2)),
    "PEMS08": dict(num_nodes=170, num_steps=17856, start="2016-07-01 00:00", split=(0.6, 0.2, 0.2)),
    "PEMS08_SAMPLE": dict(num_nodes=170, num_steps=1282, start="2016-07-01 00:00", split=(0.6, 0.2, 0.2)),
    # T-GCN protocol: "split" are step boundaries (train steps < 70%, validation 70-80%, test the
    # last 20%), see split_windows_by_steps. Bundled (himnet_fast/datasets/losloop.npz).
    # fill_missing: inputs carry the last observation forward (the bundled file is complete; a
    # synthetic stand-in is not).
    "LOSLOOP": dict(num_nodes=207, num_steps=2016, start="2012-03-01 00:00", split=(0.7, 0.8), protocol="tgcn",
                    fill_missing=True),
}

# Horizons reported beside the overall metrics (steps of the 12 predicted): 15/30/45/60 min.
REPORT_STEPS = (3, 6, 9, 12)


def canonical_name(name: str) -> str:
    """'pems08', 'PEMS-08', 'metr-la' -> the DATASET_INFO key; unknown names raise ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.upper().replace("-", "").replace(" ", "").replace("_", "")
    key = {"PEMS08SAMPLE": "PEMS08_SAMPLE", "LOS": "LOSLOOP"}.get(key, key)
    if key not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASET_INFO)}")
    return key


@dataclass(frozen=True)
class StandardScaler:
    """z-score of the signal channel: ``(v - mean) / std``."""

    mean: float
    std: float

    def transform(self, v):
        return (v - self.mean) / self.std

    def inverse_transform(self, v):
        return v * self.std + self.mean

    @staticmethod
    def fit(signal: np.ndarray, starts: np.ndarray, in_steps: int) -> "StandardScaler":
        """Mean and std of ``signal[s : s + in_steps]`` over all training windows ``s``.

        The original stacks every training input window and takes ``x[..., 0].mean()/.std()``;
        a step covered by k overlapping windows counts k times. We weight each step by its
        window count instead of stacking, which gives the same statistics in O(T·N) memory.
        ``signal`` (T, N); ``starts`` (S,) int.
        """
        if len(starts) == 0:
            raise ValueError("cannot fit the scaler: the training split has no windows")
        cover = np.zeros(signal.shape[0] + 1, dtype=np.float64)
        np.add.at(cover, starts, 1.0)
        np.add.at(cover, starts + in_steps, -1.0)
        w = np.cumsum(cover)[:-1]
        used = np.nonzero(w)[0]
        rows = signal[used].astype(np.float64)  # (T_used, N)
        w = w[used][:, None]
        total = w.sum() * signal.shape[1]
        mean = float((rows * w).sum() / total)
        std = float(np.sqrt((((rows - mean) ** 2) * w).sum() / total))
        if not np.isfinite(std) or std == 0.0:
            raise ValueError(f"the training signal has zero or non-finite std ({std}); cannot z-score it")
        return StandardScaler(mean, std)


@dataclass
class Batch:
    """One batch: ``x`` (B, T_in, N, 3) with channel 0 scaled, ``y_cov`` (B, T_out, N, 2) the
    future (tod, dow), ``labels`` (B, T_out, N, 1) scaled like the signal (teacher forcing),
    ``target`` (B, T_out, N, 1) the raw signal (loss and metrics)."""

    x: torch.Tensor
    y_cov: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.x, self.y_cov, self.labels, self.target)))

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class WindowSplit:
    """Window start indices (S,) int64 of one split of a :class:`TrafficData`."""

    name: str
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


@dataclass
class TrafficData:
    """A series with its split windows and scaler. Build it with :func:`traffic_data`.

    ``series`` (T, N, 3) float32, unscaled, 0 where a reading is missing. ``splits`` maps
    "train"/"val"/"test" to :class:`WindowSplit`. Batches are gathered lazily by :meth:`batch`.

    ``fill_missing``: the model's inputs carry each sensor's last observation forward over
    missing readings (``filled``, (T, N), kept only when something is missing; before a
    sensor's first reading, ``fill_values`` (N,): its mean over the training inputs).
    Otherwise a missing reading is a 0 input, as the original. ``num_missing`` counts the
    missing readings (zeros of ``series[..., 0]``); targets are never filled.
    """

    series: np.ndarray
    splits: Dict[str, WindowSplit]
    scaler: StandardScaler
    name: str = "custom"
    in_steps: int = 12
    out_steps: int = 12
    source: str = ""
    extra: dict = field(default_factory=dict)
    fill_missing: bool = False
    filled: Optional[np.ndarray] = None
    fill_values: Optional[np.ndarray] = None
    num_missing: int = 0

    @property
    def num_nodes(self) -> int:
        return self.series.shape[1]

    @property
    def num_steps(self) -> int:
        return self.series.shape[0]

    @property
    def input_signal(self) -> np.ndarray:
        """(T, N): what the model's inputs are made of (missing readings filled or 0)."""
        return self.filled if self.filled is not None else self.series[..., 0]

    def batch(self, split: str, positions) -> Batch:
        """Gather the windows ``splits[split].starts[positions]`` into a :class:`Batch`."""
        starts = self.splits[split].starts[np.asarray(positions, dtype=np.int64)]
        xi = starts[:, None] + np.arange(self.in_steps)                    # (B, T_in)
        yi = starts[:, None] + self.in_steps + np.arange(self.out_steps)   # (B, T_out)
        x = torch.from_numpy(self.series[xi])                              # (B, T_in, N, 3), a copy
        if self.filled is not None:
            x[..., 0] = torch.from_numpy(self.filled[xi])
        y = torch.from_numpy(self.series[yi])                              # (B, T_out, N, 3)
        x[..., 0] = self.scaler.transform(x[..., 0])
        target = y[..., :1].clone()
        labels = self.scaler.transform(target)
        return Batch(x, y[..., 1:3].contiguous(), labels, target)

    def missing_note(self) -> str:
        """How many readings are missing and what the model and the metrics make of them."""
        if self.num_missing == 0:
            return "no missing readings"
        share = 100.0 * self.num_missing / self.series[..., 0].size
        head = f"{self.num_missing:,} missing readings ({share:.2g}%)"
        if self.fill_missing:
            return f"{head}: inputs carry the last observation forward; the metrics and masked losses skip them"
        return f"{head}: 0 as inputs (the original's convention); the metrics and masked losses skip them"

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return (f"{self.name}: {self.num_steps} steps x {self.num_nodes} nodes ({sizes} windows; "
                f"scaler mean {self.scaler.mean:.3f} std {self.scaler.std:.3f}; {self.missing_note()})"
                f"{' from ' + self.source if self.source else ''}")

    def checkpoint_meta(self) -> dict:
        """What a model trained on these data needs to forecast from raw readings (stored in
        checkpoints, plain containers only): sizes, scaler, step, units and the missing-value fill."""
        return {"name": self.name, "num_nodes": self.num_nodes, "in_steps": self.in_steps,
                "out_steps": self.out_steps, "scaler_mean": self.scaler.mean, "scaler_std": self.scaler.std,
                "step_minutes": int(self.extra.get("step_minutes", 5)), "units": str(self.extra.get("units", "")),
                "fill_missing": bool(self.fill_missing),
                "fill_values": None if self.fill_values is None else [float(v) for v in self.fill_values]}


def carry_forward(signal: np.ndarray, missing: np.ndarray, initial) -> np.ndarray:
    """Fill each sensor's missing readings with its last observation before them.

    ``signal`` (T, N), ``missing`` (T, N) bool, ``initial`` (N,) or a scalar: the value used
    before a sensor's first observation. Only earlier steps are read, so a filled input never
    holds a value from its future. Returns float32 (T, N).
    """
    T, N = signal.shape
    idx = np.where(missing, -1, np.arange(T, dtype=np.int64)[:, None])      # (T, N) last observed step
    np.maximum.accumulate(idx, axis=0, out=idx)
    observed = np.take_along_axis(signal, np.maximum(idx, 0), axis=0)
    init = np.broadcast_to(np.asarray(initial, dtype=np.float64), (N,))
    return np.where(idx >= 0, observed, init[None, :]).astype(np.float32)


def sensor_means(signal: np.ndarray, missing: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Each sensor's mean over its observed readings in steps [lo, hi) (float64 (N,)); the mean
    of all observed readings there for a sensor without one, then of the whole series."""
    obs, m = signal[lo:hi].astype(np.float64), ~missing[lo:hi]
    count = m.sum(0)
    total = np.where(m, obs, 0.0).sum(0)
    if count.sum() > 0:
        fallback = total.sum() / count.sum()
    else:
        every = ~missing
        fallback = float(signal[every].astype(np.float64).mean()) if every.any() else 0.0
    return np.where(count > 0, total / np.maximum(count, 1), fallback)


def parse_start(start) -> _dt.datetime:
    if isinstance(start, _dt.datetime):
        return start
    if not isinstance(start, str):
        raise TypeError(f"start must be a 'YYYY-MM-DD HH:MM' string or a datetime, got {type(start).__name__}")
    try:
        return _dt.datetime.fromisoformat(start.strip())
    except ValueError:
        raise ValueError(f"start must look like 'YYYY-MM-DD HH:MM', got {start!r}") from None


def time_features(num_steps: int, start="2016-07-01 00:00", step_minutes: int = 5) -> Tuple[np.ndarray, np.ndarray]:
    """Time of day (fraction of the day in [0, 1)) and day of week (Monday = 0) of each step.

    Returns two float32 arrays (num_steps,). ``(tod * 288).long()`` recovers the 5-minute slot
    exactly in float32 (checked for all 288 slots), as the model's embedding lookup needs.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if step_minutes <= 0 or 1440 % step_minutes:
        raise ValueError(f"step_minutes must divide a day (1440 minutes), got {step_minutes}")
    t0 = parse_start(start)
    minutes = t0.hour * 60 + t0.minute + np.arange(num_steps, dtype=np.int64) * step_minutes
    days = minutes // 1440
    tod = ((minutes % 1440) // 5).astype(np.float32) / np.float32(STEPS_PER_DAY)
    dow = ((t0.weekday() + days) % 7).astype(np.float32)
    return tod, dow


def split_windows(num_steps: int, ratios: Sequence[float] = (0.6, 0.2, 0.2), in_steps: int = 12,
                  out_steps: int = 12) -> Dict[str, np.ndarray]:
    """Chronological split of all stride-1 windows: train = round(r0·S), val = round(r1·S),
    test = the rest, S = num_steps − in − out + 1. Reproduces HimNet's index.npz files exactly
    (6:2:2 for PEMS, 7:1:2 for METRLA/PEMSBAY). Returns start indices per split."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"ratios must be three non-negative fractions summing to 1, got {tuple(ratios)}")
    total = num_steps - in_steps - out_steps + 1
    if total < 3:
        raise ValueError(f"a series of {num_steps} steps has {max(total, 0)} windows of {in_steps}+{out_steps} "
                         "steps; need at least 3 (one per split)")
    n_train = int(round(ratios[0] * total))
    n_val = int(round(ratios[1] * total))
    starts = np.arange(total, dtype=np.int64)
    return {"train": starts[:n_train], "val": starts[n_train:n_train + n_val], "test": starts[n_train + n_val:]}


def split_windows_by_steps(num_steps: int, boundaries: Sequence[float] = (0.7, 0.8), in_steps: int = 12,
                           out_steps: int = 12) -> Dict[str, np.ndarray]:
    """The T-GCN protocol: split the *steps*, then take the windows that lie entirely in each part.

    ``boundaries = (v, t)``: train steps ``[0, int(v·T))``, validation ``[int(v·T), int(t·T))``,
    test ``[int(t·T), T)``. T-GCN trains on the first 80 % of the steps and tests on the last
    20 % (``int(0.8·T)`` as its code); the validation part is carved from the end of its training
    part. No window crosses a boundary, so no test target is ever an input of a training or
    validation window. Returns stride-1 window start indices per split.
    """
    if (len(boundaries) != 2 or not 0 < boundaries[0] <= boundaries[1] < 1):
        raise ValueError(f"boundaries must be two fractions 0 < v <= t < 1, got {tuple(boundaries)}")
    cuts = [0, int(boundaries[0] * num_steps), int(boundaries[1] * num_steps), num_steps]
    need = in_steps + out_steps
    out = {}
    for name, lo, hi in zip(SPLITS, cuts[:-1], cuts[1:]):
        if hi - lo < need and not (name == "val" and hi == lo):
            raise ValueError(f"the {name} part of a {num_steps}-step series has {hi - lo} steps [{lo}, {hi}); a "
                             f"window needs {need} ({in_steps} in + {out_steps} out)")
        out[name] = np.arange(lo, max(lo, hi - need + 1), dtype=np.int64)
    return out


def traffic_data(series: np.ndarray, starts: Mapping[str, np.ndarray], *, name: str = "custom",
                 in_steps: int = 12, out_steps: int = 12, source: str = "",
                 scaler: Optional[StandardScaler] = None, fill_missing: bool = False) -> TrafficData:
    """Validate a ``(T, N, >=3)`` series and split window starts and fit the scaler on train.

    ``fill_missing``: the inputs carry each sensor's last observation forward over missing
    readings (zeros of channel 0) instead of feeding 0; the scaler is then fitted on those
    inputs. Raises ValueError for a wrong shape, NaN/inf values, time features out of range,
    missing splits, or windows that run past the end of the series.
    """
    if not isinstance(series, np.ndarray):
        raise TypeError(f"series must be a numpy array, got {type(series).__name__}")
    if series.ndim != 3 or series.shape[2] < 3:
        raise ValueError(f"series must have shape (T, N, 3) (signal, time of day, day of week), "
                         f"got {series.shape}")
    if series.shape[0] == 0 or series.shape[1] == 0:
        raise ValueError(f"series is empty: shape {series.shape}")
    series = np.ascontiguousarray(series[..., :3], dtype=np.float32)
    bad = ~np.isfinite(series)
    if bad.any():
        t, n, c = np.argwhere(bad)[0]
        raise ValueError(f"series has {int(bad.sum())} NaN/inf values (first at step {t}, node {n}, channel {c}); "
                         "fill or mask them (the metrics ignore zeros, so 0 marks a missing reading)")
    tod, dow = series[..., 1], series[..., 2]
    if tod.min() < 0 or tod.max() >= 1:
        raise ValueError(f"series[..., 1] (time of day) must be in [0, 1), got range [{tod.min()}, {tod.max()}]")
    if dow.min() < 0 or dow.max() > 6 or not np.array_equal(dow, np.floor(dow)):
        raise ValueError(f"series[..., 2] (day of week) must be integers 0..6, got range [{dow.min()}, {dow.max()}]")
    missing = [s for s in SPLITS if s not in starts]
    if missing:
        raise ValueError(f"window starts are missing split(s) {missing}; got {sorted(starts)}")
    splits = {}
    T = series.shape[0]
    for s in SPLITS:
        st = np.asarray(starts[s])
        if st.ndim != 1 or not np.issubdtype(st.dtype, np.integer):
            raise ValueError(f"{s} window starts must be a 1-D integer array, got shape {st.shape} dtype {st.dtype}")
        st = st.astype(np.int64)
        if len(st) and (st.min() < 0 or st.max() + in_steps + out_steps > T):
            raise ValueError(f"{s} windows run past the series: starts in [{st.min()}, {st.max()}] need "
                             f"start + {in_steps + out_steps} <= T = {T}")
        splits[s] = WindowSplit(s, st)
    signal = series[..., 0]
    missing = signal == 0
    num_missing = int(missing.sum())
    filled = fill_values = None
    if fill_missing:
        train = splits["train"].starts
        # the steps the scaler is fitted on: a sensor's first value, when it starts missing, is
        # its mean over the training inputs (nothing from after the step it fills, beyond them)
        lo, hi = (int(train.min()), int(train.max()) + in_steps) if len(train) else (0, T)
        fill_values = sensor_means(signal, missing, lo, hi)
        if num_missing:
            filled = carry_forward(signal, missing, fill_values)
    if scaler is None:
        scaler = StandardScaler.fit(signal if filled is None else filled, splits["train"].starts, in_steps)
    return TrafficData(series, splits, scaler, name=name, in_steps=in_steps, out_steps=out_steps, source=source,
                       fill_missing=bool(fill_missing), filled=filled, fill_values=fill_values,
                       num_missing=num_missing)


def _npz(path: str, keys: Sequence[str]):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)  # never unpickle objects from a data file
    except Exception as exc:  # zipfile/format errors have unhelpful messages on their own
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    with z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; the file has {z.files}")
        try:
            return {k: z[k] for k in keys}
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise ValueError(f"{path}: not a readable .npz of numeric arrays ({exc})") from exc


def index_to_starts(index: np.ndarray, in_steps: int = 12, out_steps: int = 12, what: str = "index") -> np.ndarray:
    """HimNet index rows ``[s, s + in, s + in + out]`` (S, 3) -> starts (S,), checked."""
    if index.ndim != 2 or index.shape[1] != 3:
        raise ValueError(f"{what} must have shape (S, 3) with rows [s, s+{in_steps}, s+{in_steps + out_steps}], "
                         f"got {index.shape}")
    if len(index) and not (np.all(index[:, 1] - index[:, 0] == in_steps)
                           and np.all(index[:, 2] - index[:, 1] == out_steps)):
        raise ValueError(f"{what} rows must be [s, s+{in_steps}, s+{in_steps + out_steps}]; first row {index[0].tolist()}")
    return index[:, 0].astype(np.int64)


def load_himnet_dir(path: str, *, name: Optional[str] = None, in_steps: int = 12, out_steps: int = 12) -> TrafficData:
    """HimNet format: ``path/data.npz`` key ``data`` (T, N, >=3) and ``path/index.npz`` keys
    train/val/test (S, 3)."""
    data = _npz(os.path.join(path, "data.npz"), ["data"])["data"]
    index = _npz(os.path.join(path, "index.npz"), list(SPLITS))
    if data.ndim != 3 or data.shape[2] < 3:
        raise ValueError(f"{path}/data.npz: 'data' must have shape (T, N, 3) (signal, tod, dow), got {data.shape}")
    starts = {s: index_to_starts(index[s], in_steps, out_steps, f"{path}/index.npz['{s}']") for s in SPLITS}
    return traffic_data(data, starts, name=name or os.path.basename(os.path.normpath(path)),
                        in_steps=in_steps, out_steps=out_steps, source=path)


def load_pems_npz(path: str, *, start="2016-07-01 00:00", step_minutes: int = 5, channel: int = 0,
                  ratios: Sequence[float] = (0.6, 0.2, 0.2), name: Optional[str] = None,
                  in_steps: int = 12, out_steps: int = 12) -> TrafficData:
    """Raw PEMS file: key ``data`` (T, N, C) or (T, N); channel ``channel`` (0 = flow) is the
    signal, time features come from ``start`` and the step, windows are split chronologically."""
    data = _npz(path, ["data"])["data"]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ValueError(f"{path}: 'data' must have shape (T, N, C) or (T, N), got {data.shape}")
    if not 0 <= channel < data.shape[2]:
        raise ValueError(f"channel must be in [0, {data.shape[2]}) for {path} with shape {data.shape}, got {channel}")
    return from_signal(data[..., channel], start=start, step_minutes=step_minutes, ratios=ratios,
                       name=name or os.path.splitext(os.path.basename(path))[0], in_steps=in_steps,
                       out_steps=out_steps, source=path)


def from_signal(signal: np.ndarray, *, start="2016-07-01 00:00", step_minutes: int = 5,
                ratios: Sequence[float] = (0.6, 0.2, 0.2), name: str = "custom", in_steps: int = 12,
                out_steps: int = 12, source: str = "", protocol: str = "himnet", tod=None, dow=None,
                extra: Optional[dict] = None, fill_missing: bool = False) -> TrafficData:
    """A (T, N) signal -> TrafficData with derived time features and a chronological split.

    ``protocol="himnet"``: ``ratios`` (train, val, test) of the windows (:func:`split_windows`).
    ``protocol="tgcn"``: ``ratios`` = the two step boundaries (:func:`split_windows_by_steps`).
    ``tod``/``dow`` (T,) override the features derived from ``start`` (real timestamps).
    ``fill_missing``: inputs carry the last observation forward (see :func:`traffic_data`).
    """
    if not isinstance(signal, np.ndarray) or signal.ndim != 2:
        raise ValueError(f"signal must be a numpy array of shape (T, N), got {getattr(signal, 'shape', type(signal))}")
    T, N = signal.shape
    if tod is None or dow is None:
        tod, dow = time_features(T, start, step_minutes)
    series = np.empty((T, N, 3), dtype=np.float32)
    series[..., 0] = signal
    series[..., 1] = np.asarray(tod, dtype=np.float32)[:, None]
    series[..., 2] = np.asarray(dow, dtype=np.float32)[:, None]
    if protocol == "himnet":
        starts = split_windows(T, ratios, in_steps, out_steps)
    elif protocol == "tgcn":
        starts = split_windows_by_steps(T, ratios, in_steps, out_steps)
    else:
        raise ValueError(f"protocol must be 'himnet' or 'tgcn', got {protocol!r}")
    data = traffic_data(series, starts, name=name, in_steps=in_steps, out_steps=out_steps, source=source,
                        fill_missing=fill_missing)
    data.extra.update(extra or {}, protocol=protocol, step_minutes=step_minutes)
    if protocol == "tgcn":
        # T-GCN's training part (train + validation steps): the historical average is fitted on it
        data.extra["fit_end"] = int(ratios[1] * T)
    return data
