"""Data bundled with himnet_fast.

``pems08_sample.npz``: the first 1,282 five-minute steps (2016-07-01 00:00 to 2016-07-05
10:45) of the PEMS08 benchmark, 170 sensors, **real Caltrans PeMS values** of the flow
channel (vehicles per 5 minutes, integers 0..865, stored exactly as uint16; 0.4% zeros).
Recovered from a truncated public copy of ``PEMS08.npz`` (see /work/shared/data/README.md of
the project; ``_build_sample.py`` rebuilds the file). It is not the full benchmark: numbers
trained on it are not comparable with the paper's. Time features are derived from the start
time; the windows are split chronologically 6:2:2 (755 / 252 / 252 windows).
"""
from __future__ import annotations

import os

import numpy as np

SAMPLE_PATH = os.path.join(os.path.dirname(__file__), "pems08_sample.npz")


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
