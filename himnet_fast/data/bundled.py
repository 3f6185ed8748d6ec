"""The data files bundled in ``himnet_fast/datasets/`` (Los-loop and the PEMS08 sample), read
into :class:`~himnet_fast.data.TrafficData`.

This module reads the files by path, so the data layer never imports the ``himnet_fast.datasets``
package (which re-exports these functions): the imports stay one-way, ``datasets`` -> ``data``.
What the files hold and where they come from is described in ``himnet_fast/datasets/__init__.py``.
"""
from __future__ import annotations

import os

import numpy as np

from .series import DATASET_INFO, TrafficData, from_signal

DATASETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets")
SAMPLE_PATH = os.path.join(DATASETS_DIR, "pems08_sample.npz")
LOSLOOP_PATH = os.path.join(DATASETS_DIR, "losloop.npz")


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


def load_losloop() -> TrafficData:
    """Los-loop as :class:`~himnet_fast.data.TrafficData` (name ``LOSLOOP``) with the T-GCN
    protocol: train on steps [0, 1411), validate on [1411, 1612), test on the last 20 %
    [1612, 2016) (1,388 / 178 / 381 windows of 12 + 12 steps). ``extra`` holds the graph and the
    coordinates. The series is complete; ``fill_missing`` only matters for a forecast from
    readings with gaps."""
    a = losloop_arrays()
    info = DATASET_INFO["LOSLOOP"]
    return from_signal(a["speed"], start=a["start"], step_minutes=a["step_minutes"], ratios=info["split"],
                       protocol="tgcn", name="LOSLOOP", source="bundled Los-loop speed (T-GCN benchmark, complete)",
                       extra={"adj": a["adj"], "lat": a["lat"], "lon": a["lon"], "sensor_ids": a["sensor_ids"],
                              "units": "mph"}, fill_missing=info["fill_missing"])


def pems08_sample_flow() -> np.ndarray:
    """The bundled real flow, (1282, 170) float32."""
    with np.load(SAMPLE_PATH, allow_pickle=False) as z:
        return z["flow"].astype(np.float32)


def load_pems08_sample() -> TrafficData:
    """The bundled sample as :class:`~himnet_fast.data.TrafficData` (name ``PEMS08_SAMPLE``); a
    missing reading is a 0 input, as in the PEMS08 benchmark it is cut from."""
    with np.load(SAMPLE_PATH, allow_pickle=False) as z:
        flow = z["flow"].astype(np.float32)
        start = str(z["start"])
        step = int(z["step_minutes"])
    return from_signal(flow, start=start, step_minutes=step, ratios=(0.6, 0.2, 0.2), name="PEMS08_SAMPLE",
                       source="bundled real PEMS08 flow, first 1282 steps")
