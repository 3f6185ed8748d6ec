"""Datasets by name: :func:`load_dataset` resolves ``--dataset NAME`` (with ``--data-dir``,
``--synthetic`` or the bundled files) to a :class:`~himnet_fast.data.TrafficData`.

It sits above the loaders it dispatches to (:mod:`.series`, :mod:`.synthetic`, :mod:`.bundled`),
so none of them imports it back.
"""
from __future__ import annotations

import os
from typing import Optional

from .bundled import load_losloop, load_pems08_sample
from .series import DATASET_INFO, TrafficData, canonical_name, from_signal, load_himnet_dir, load_pems_npz
from .synthetic import synthetic_traffic


def _positive_or_none(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def load_dataset(name: str = "LOSLOOP", data_dir: Optional[str] = None, *, synthetic: bool = False,
                 num_steps: Optional[int] = None, num_nodes: Optional[int] = None, seed: int = 0) -> TrafficData:
    """Resolve a dataset by name.

    * ``synthetic``: :func:`~himnet_fast.data.synthetic_traffic` with the dataset's shape and
      start (``num_steps``/``num_nodes`` override the shape).
    * ``data_dir``: the HimNet format (``data.npz`` + ``index.npz``) in ``data_dir`` or
      ``data_dir/NAME``, else a raw ``NAME.npz`` (any case) in ``data_dir`` or ``data_dir/NAME``.
    * neither: the bundled real data (``LOSLOOP``, ``PEMS08_SAMPLE``).
    """
    key = canonical_name(name)
    info = DATASET_INFO[key]
    if synthetic:
        _positive_or_none("num_steps", num_steps)
        _positive_or_none("num_nodes", num_nodes)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        T = num_steps or info["num_steps"]
        N = num_nodes or info["num_nodes"]
        sig = synthetic_traffic(T, N, seed=seed, start=info["start"])
        return from_signal(sig, start=info["start"], ratios=info["split"], name=f"{key}(synthetic {T}x{N})",
                           source=f"synthetic seed {seed}", protocol=info.get("protocol", "himnet"),
                           fill_missing=info.get("fill_missing", False))
    if data_dir is None:
        if key == "PEMS08_SAMPLE":
            return load_pems08_sample()
        if key == "LOSLOOP":
            return load_losloop()
        raise ValueError(f"dataset {key} needs --data-dir (or --synthetic); bundled: LOSLOOP, PEMS08_SAMPLE")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} is not a directory")
    for d in (data_dir, os.path.join(data_dir, key), os.path.join(data_dir, name)):
        if os.path.isfile(os.path.join(d, "data.npz")) and os.path.isfile(os.path.join(d, "index.npz")):
            return load_himnet_dir(d, name=key)
    for d in (data_dir, os.path.join(data_dir, key), os.path.join(data_dir, name)):
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            if f.lower() == key.lower() + ".npz":
                return load_pems_npz(os.path.join(d, f), start=info["start"], ratios=info["split"], name=key)
    raise FileNotFoundError(f"no {key} data under {data_dir!r}: expected data.npz + index.npz (HimNet format) "
                            f"or {key}.npz (raw PEMS) in it or in its {key}/ subfolder")
