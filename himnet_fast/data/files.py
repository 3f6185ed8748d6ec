"""Your own series: ``himnet-fast train --data PATH`` (a T x N table, one column per sensor).

Formats, by extension:

* ``.csv`` / ``.txt``: one row per time step, one column per sensor; an optional header row
  (sensor names) and an optional first column of timestamps (any format pandas parses, e.g.
  ``2012-03-01 00:05:00``). Read with pandas when installed, else with numpy (no timestamps).
* ``.parquet``: the same table (needs pandas with pyarrow or fastparquet).
* ``.npy``: a (T, N) array, or (T, N, C) of which channel 0 is the signal.
* ``.npz``: key ``data`` (or the only array in the file), shaped as for ``.npy``; an optional
  ``timestamps`` array (datetime64, or integer seconds since the epoch).
* ``.h5`` / ``.hdf5``: the DCRNN ``metr-la.h5`` / ``pems-bay.h5`` layout, a pandas DataFrame
  (rows = 5-minute timestamps, columns = sensor ids) read with ``pandas.read_hdf`` (needs
  PyTables, ``pip install tables``).

Missing readings may be NaN or 0: NaN becomes 0, and 0 is masked out of the loss and the
metrics (the HimNet convention); the model's inputs carry each sensor's last observation
forward over them (``TrafficData.fill_missing``), so the last input step is the last observed
value. Without timestamps the time of day and day of week come from ``start`` and
``interval_minutes``. A graph (``--graph``, N x N as CSV or ``.npy``) is checked and kept in
``TrafficData.extra["adj"]``; HimNet itself learns its graph and does not use it.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np

from .series import STEPS_PER_DAY, TrafficData, from_signal

FORMATS = (".csv", ".txt", ".parquet", ".npy", ".npz", ".h5", ".hdf5")
DEFAULT_START = "2000-01-03 00:00"  # a Monday midnight, when the data carry no timestamps


def _need(module: str, what: str, install: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"reading {what} needs the '{install}' package: pip install {install}") from None


def _frame_to_arrays(df, path: str) -> Tuple[np.ndarray, Optional[np.ndarray], list]:
    """DataFrame -> (values (T, N), timestamps (T,) datetime64 or None, column names)."""
    import pandas as pd

    stamps = None
    if isinstance(df.index, pd.DatetimeIndex):
        stamps = df.index.values
    elif len(df.columns) and not pd.api.types.is_numeric_dtype(df[df.columns[0]]):
        first = df.columns[0]
        try:
            stamps = pd.to_datetime(df[first]).values
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: the first column {first!r} is neither numbers nor timestamps "
                             f"(e.g. {df[first].iloc[0]!r}): {exc}") from None
        df = df.drop(columns=[first])
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        c = bad[0]
        raise ValueError(f"{path}: column {c!r} is not numeric (e.g. {df[c].iloc[0]!r}); expected one numeric "
                         f"column per sensor after an optional timestamp column")
    return df.to_numpy(dtype=np.float64), stamps, [str(c) for c in df.columns]


def _read_csv(path: str):
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is None:  # numpy fallback: numbers only, an optional header line
        with open(path) as f:
            first = f.readline()
        try:
            [float(v) for v in first.strip().split(",") if v.strip()]
            skip = 0
        except ValueError:
            skip = 1
        try:
            return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2), None, []
        except ValueError as exc:
            raise ValueError(f"{path}: not a numeric CSV table ({exc}); timestamps need pandas") from None
    with open(path) as f:
        first = f.readline().strip().split(",")
    # a header is a first line whose cells (after an optional time column) are not all numbers
    cells = first[1:] if len(first) > 1 else first
    try:
        [float(c) for c in cells]
        header = None
    except ValueError:
        header = 0
    try:
        df = pd.read_csv(path, header=header)
    except Exception as exc:  # pandas' parser errors name the line; keep them
        raise ValueError(f"{path}: not a readable CSV table ({exc})") from None
    return _frame_to_arrays(df, path)


def read_table(path: str) -> Tuple[np.ndarray, Optional[np.ndarray], list]:
    """Read a T x N series file -> (values (T, N) float64, timestamps (T,) datetime64[ns] or
    None, sensor names or [])."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"--data {path} is a folder; give a file ({', '.join(FORMATS)}); for a HimNet/PEMS "
                         f"folder use --dataset NAME --data-dir {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".txt"):
        return _read_csv(path)
    if ext == ".parquet":
        pd = _need("pandas", "Parquet", "pandas")
        try:
            df = pd.read_parquet(path)
        except ImportError as exc:
            raise ImportError(f"reading Parquet needs pyarrow (or fastparquet): pip install pyarrow ({exc})") from None
        except Exception as exc:
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
        return _frame_to_arrays(df, path)
    if ext in (".h5", ".hdf5"):
        pd = _need("pandas", "HDF5", "pandas")
        _need("tables", "HDF5 (the DCRNN metr-la.h5 layout)", "tables")
        try:
            df = pd.read_hdf(path)
        except Exception as exc:
            raise ValueError(f"{path}: not a pandas HDF5 file with one DataFrame (the DCRNN metr-la.h5 layout: "
                             f"rows = timestamps, columns = sensors) ({exc})") from None
        return _frame_to_arrays(df, path)
    if ext in (".npy", ".npz"):
        stamps = None
        try:
            z = np.load(path, allow_pickle=False)  # never unpickle a data file
        except Exception as exc:
            raise ValueError(f"{path}: not a readable NumPy {ext} file ({exc})") from None
        if ext == ".npz":
            with z:
                keys = list(z.files)
                arrays = [k for k in keys if k != "timestamps"]
                key = "data" if "data" in keys else (arrays[0] if len(arrays) == 1 else None)
                if key is None:
                    raise ValueError(f"{path}: expected a 'data' array (or a single array); the file has {keys}")
                try:
                    arr = z[key]
                    if "timestamps" in keys:
                        ts = z["timestamps"]
                        stamps = ts.astype("datetime64[ns]") if ts.dtype.kind == "M" else \
                            ts.astype(np.int64).astype("datetime64[s]").astype("datetime64[ns]")
                except ValueError as exc:
                    raise ValueError(f"{path}: not an .npz of numeric arrays ({exc})") from None
        else:
            arr = z
        if arr.ndim == 3:
            arr = arr[..., 0]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{path}: expected a numeric (T, N) or (T, N, C) array, got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        return arr.astype(np.float64), stamps, []
    raise ValueError(f"--data {path}: unknown format {ext or '(no extension)'!r}; expected one of {', '.join(FORMATS)}")


def stamps_to_features(stamps: np.ndarray, path: str = "timestamps") -> Tuple[np.ndarray, np.ndarray]:
    """datetime64 (T,) -> time of day in [0, 1) on the 5-minute slot grid, day of week (Monday 0)."""
    t = np.asarray(stamps).astype("datetime64[m]")
    if np.isnat(t).any():
        raise ValueError(f"{path}: timestamp {int(np.argmax(np.isnat(t)))} is missing (NaT)")
    d = np.diff(t.astype(np.int64))
    if len(d) and (d <= 0).any():
        i = int(np.argmax(d <= 0))
        raise ValueError(f"{path}: timestamps must increase; row {i + 1} ({t[i + 1]}) is not after row {i} ({t[i]})")
    minutes = t.astype(np.int64)  # minutes since 1970-01-01 (a Thursday)
    tod = ((minutes % 1440) // 5).astype(np.float32) / np.float32(STEPS_PER_DAY)
    dow = (((minutes // 1440) + 3) % 7).astype(np.float32)
    return tod, dow


def read_graph(path: str, num_nodes: int) -> np.ndarray:
    """An N x N matrix (CSV without header, or .npy) -> float32, checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--graph {path}: no such file")
    try:
        adj = np.load(path, allow_pickle=False) if path.lower().endswith(".npy") else \
            np.loadtxt(path, delimiter=",", ndmin=2)
    except Exception as exc:
        raise ValueError(f"--graph {path}: not a numeric N x N matrix ({exc})") from None
    if adj.shape != (num_nodes, num_nodes):
        raise ValueError(f"--graph {path}: expected a {num_nodes} x {num_nodes} matrix (the series has {num_nodes} "
                         f"sensors), got shape {adj.shape}")
    if not np.isfinite(adj).all():
        raise ValueError(f"--graph {path}: has NaN/inf entries")
    return adj.astype(np.float32)


def load_series_file(path: str, *, start: Optional[str] = None, interval_minutes: Optional[int] = None,
                     graph: Optional[str] = None, protocol: str = "tgcn",
                     ratios: Optional[Sequence[float]] = None, in_steps: int = 12,
                     out_steps: int = 12) -> TrafficData:
    """``--data PATH`` -> :class:`TrafficData` (name "custom").

    Timestamps in the file win; ``start``/``interval_minutes`` are for files without them
    (defaults: 2000-01-03 00:00, a Monday, and 5 minutes; a note is added to ``source``).
    ``protocol`` "tgcn" (default; ``ratios`` = step boundaries, default (0.7, 0.8)) or
    "himnet" (window ratios, default (0.7, 0.1, 0.2)).
    """
    values, stamps, names = read_table(path)
    T, N = values.shape
    if T == 0 or N == 0:
        raise ValueError(f"{path}: the series is empty (shape {values.shape}); expected T steps x N sensors")
    if np.isinf(values).any():
        t, n = np.argwhere(np.isinf(values))[0]
        raise ValueError(f"{path}: infinite value at step {t}, sensor {n}; use NaN or 0 for a missing reading")
    missing = np.isnan(values) | (values == 0)
    if missing.all(axis=0).any():
        n = int(np.argmax(missing.all(axis=0)))
        raise ValueError(f"{path}: sensor {names[n] if names else n} has no reading at all (every value NaN or 0)")
    signal = np.nan_to_num(values, nan=0.0).astype(np.float32)
    note = ""
    if stamps is not None:
        if start is not None or interval_minutes is not None:
            raise ValueError(f"{path} has timestamps; --start-time/--interval are only for files without them")
        tod, dow = stamps_to_features(stamps, path)
        steps = np.diff(stamps.astype("datetime64[m]").astype(np.int64))
        interval = int(np.median(steps)) if len(steps) else 5
        start_s = str(stamps[0].astype("datetime64[m]")).replace("T", " ")
    else:
        interval = 5 if interval_minutes is None else int(interval_minutes)
        if interval <= 0 or 1440 % interval:
            raise ValueError(f"--interval must be a positive number of minutes dividing a day, got {interval}")
        start_s = start or DEFAULT_START
        if start is None:
            note = f"; no timestamps: assumed start {DEFAULT_START} (a Monday), every {interval} min"
        tod = dow = None
    extra = {"units": "", "sensor_names": names}
    if graph:
        extra["adj"] = read_graph(graph, N)
    if ratios is None:
        ratios = (0.7, 0.8) if protocol == "tgcn" else (0.7, 0.1, 0.2)
    return from_signal(signal, start=start_s, step_minutes=interval, ratios=ratios, name="custom",
                       in_steps=in_steps, out_steps=out_steps, protocol=protocol, tod=tod, dow=dow,
                       source=path + (f" ({note[2:]})" if note else ""), extra=extra, fill_missing=True)
