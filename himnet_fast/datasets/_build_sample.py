"""Rebuild ``pems08_sample.npz`` from the recovered partial PEMS08 file (provenance record).

    python -m himnet_fast.datasets._build_sample PEMS08/partial/PEMS08_first1282steps.npz

Keeps the flow channel only (integer vehicles per 5 minutes, 0..865) as uint16, which is
exact, and stores it with ``np.savez_compressed`` together with the start time.
"""
from __future__ import annotations

import os
import sys

import numpy as np


def build(src: str, dst: str) -> None:
    data = np.load(src, allow_pickle=False)["data"]
    flow = data[..., 0]
    if not np.array_equal(flow, np.rint(flow)) or flow.min() < 0 or flow.max() > np.iinfo(np.uint16).max:
        raise ValueError("flow is not integer-valued in the uint16 range; it cannot be stored exactly")
    np.savez_compressed(dst, flow=flow.astype(np.uint16), start=np.array("2016-07-01 00:00"),
                        step_minutes=np.array(5))


if __name__ == "__main__":
    build(sys.argv[1], os.path.join(os.path.dirname(__file__), "pems08_sample.npz"))
