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

The readers live in :mod:`himnet_fast.data.bundled` (the data layer reads these files by path
and never imports this package); they are re-exported here.
"""
from ..data.bundled import (LOSLOOP_PATH, SAMPLE_PATH, load_losloop, load_pems08_sample, losloop_arrays,
                           pems08_sample_flow)

__all__ = ["LOSLOOP_PATH", "SAMPLE_PATH", "load_losloop", "load_pems08_sample", "losloop_arrays",
           "pems08_sample_flow"]
