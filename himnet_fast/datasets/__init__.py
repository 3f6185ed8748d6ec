"""Data bundled with himnet_fast.

``losloop.npz`` (the default dataset, 600 KB): **Los-loop**, the complete T-GCN benchmark:
2,016 five-minute steps (7 days, 2012-03-01 00:00 to 2012-03-07 23:55, Thursday to
Wednesday) of real traffic speed (mph) at 207 loop detectors of the METR-LA network (Los
Angeles County highways), with their weighted road graph (207 x 207, 2,833 non-zeros) and
coordinates. Speeds are stored as uint16 multiples of 1/512 mph (error <= 0.001 mph, see
``_build_losloop.py``, which rebuilds the file from the public CSVs). The files have no
timestamps: the start time comes from the dataset's description.

``pems08_sample.npz``: the first 1,282 five-minute steps (2016-07-01 00:00 to 2016-07-05
10:45) of the PEMS08 benchmark, 170 sensors, **real Caltrans PeMS values** of the flow
channel (vehicles per 5 minutes, integers 0..865, stored exactly as uint16; 0.4% zeros).
Recovered from a public copy of ``PEMS08.npz`` cut off after 1.3 MB (sqOsias/ASTGCN-2
``data/PEMS08/pems08.npz``; ``_build_sample.py`` rebuilds the file). It is not the full
benchmark: numbers trained on it are not comparable with the paper's. Time features are derived from the start
time; the windows are split chronologically 6:2:2 (755 / 252 / 252 windows).
"""
from __future__ import annotations

import os

import numpy as np

SAMPLE_PATH = os.path.join(os.path.dirname(__file__), "pems08_sample.npz")
LOSLOOP_PATH = os.path.join(os.path.dirname(__file__), "losloop.npz")


def losloop_arrays() -> dict:
    """The bundled Los-loop files as arrays: ``speed`` (2016, 207) float32 mph, ``adj``
    (207, 207) float32 weighted graph (diagonal 1), ``sensor_ids`` (207,) int64, ``lat``/``lon``
    (207,) float64, ``start`` str, ``step_minutes`` int."""
    with np.load(LOSLOOP_PATH, allow_pickle=False) as z:
        n = int(z["num_nodes"])
        speed = (z["speed_q"].astype(np.float64) / float(z["speed_scale"])).astype(np.float32)
        adj = np.zeros((n, n), dtype=np.float32)
        adj[z["adj_row"].astype(np.int64), z["adj_col"].astype(np.int64)] = z["adj_w"]
        return {"speed": speed, "adj": adj, "sensor_ids": z["sensor_ids"], "lat": z["lat"], "lon": z["lon"],
                "start": str(z["start"]), "step_minutes": int(z["step_minutes"])}


def load_losloop():
    """Los-loop as :class:`himnet_fast.data.TrafficData` (name ``LOSLOOP``) with the T-GCN
    protocol: train on steps [0, 1411), validate on [1411, 1612), test on the last 20 %
    [1612, 2016) (1,388 / 178 / 381 windows of 12 + 12 steps). ``extra`` holds the graph and the
    coordinates."""
    from ..data.series import DATASET_INFO, from_signal

    a = losloop_arrays()
    return from_signal(a["speed"], start=a["start"], step_minutes=a["step_minutes"],
                       ratios=DATASET_INFO["LOSLOOP"]["split"], protocol="tgcn", name="LOSLOOP",
                       source="bundled Los-loop speed (T-GCN benchmark, complete)",
                       extra={"adj": a["adj"], "lat": a["lat"], "lon": a["lon"], "sensor_ids": a["sensor_ids"],
                              "units": "mph"})


def pems08_sample_flow() -> np.ndarray:
    """The bundled real flow, (1282, 170) float32."""
    with np.load(SAMPLE_PATH, allow_pickle=False) as z:
        return z["flow"].astype(np.float32)


def load_pems08_sample():
    """The bundled sample as :class:`himnet_fast.data.TrafficData` (name ``PEMS08_SAMPLE``)."""
    from ..data.series import from_signal

    with np.load(SAMPLE_PATH, allow_pickle=False) as z:
        flow = z["flow"].astype(np.float32)
        start = str(z["start"])
        step = int(z["step_minutes"])
    return from_signal(flow, start=start, step_minutes=step, ratios=(0.6, 0.2, 0.2), name="PEMS08_SAMPLE",
                       source="bundled real PEMS08 flow, first 1282 steps")
