"""``build_model(name, num_nodes, ...)``: one constructor for every forecaster of the package.

Every model it returns has the common forecaster signature::

    y = model(x, y_cov=None, labels=None, batches_seen=None)
    # x (B, T, N, C), C >= input_dim: the first input_dim channels are the model's input
    #   (the library's windows are [signal, time of day, day of week]; input_dim=1 -> signal)
    # -> y (B, horizon, N, output_dim), in the units of x[..., 0] (scaled)

``y_cov``, ``labels`` and ``batches_seen`` are what HimNet needs (future time features, teacher
forcing); these models have no decoder and ignore them, so a trainer can call every model alike.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .agcrn import AGCRN
from .hyperst import HyperSTGCGRU, HyperSTLSTMD, HyperSTLSTMG

__all__ = ["build_model", "MODEL_NAMES", "needs_attributes"]

_HYPERST = {"hyperst-lstm-g": HyperSTLSTMG, "hyperst-lstm-d": HyperSTLSTMD, "hyperst-gcgru": HyperSTGCGRU}
MODEL_NAMES = ("agcrn",) + tuple(_HYPERST)


def needs_attributes(name: str) -> bool:
    """Whether ``build_model(name, ...)`` needs static ``attributes`` (N, A) (HyperST-Net)."""
    return _check_name(name) in _HYPERST


def _check_name(name) -> str:
    key = str(name).lower().replace("_", "-")
    if key not in MODEL_NAMES:
        raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")
    return key


def build_model(name: str, num_nodes: int, *, attributes=None, backend: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a forecaster by name.

    Args:
        name: "agcrn", "hyperst-lstm-g", "hyperst-lstm-d" or "hyperst-gcgru".
        num_nodes: N.
        attributes: (N, A) static per-node attributes, required by the HyperST models (see
            :func:`himnet_fast.models.spatial_attributes`), refused by AGCRN.
        backend: kernel backend (None picks the fastest that can run).
        **kwargs: the model's constructor arguments. Common names work for all models:
            ``input_dim``, ``output_dim``, ``horizon`` (alias ``out_steps``), ``hidden_dim``
            (AGCRN's ``rnn_units``), ``num_layers``; AGCRN also takes ``embed_dim``, ``cheb_k``;
            HyperST ``spatial_dim``, plus ``query_dim`` (LSTM-G) or ``embed_dim``, ``cheb_k``
            (GCGRU).
    """
    key = _check_name(name)
    kw = dict(kwargs)
    if "out_steps" in kw:
        if "horizon" in kw:
            raise ValueError("give horizon or out_steps (its alias), not both")
        kw["horizon"] = kw.pop("out_steps")
    if key == "agcrn":
        if attributes is not None:
            raise ValueError("agcrn takes no attributes (it learns its node embedding); pass attributes=None")
        if "hidden_dim" in kw:
            if "rnn_units" in kw:
                raise ValueError("give hidden_dim or rnn_units (its alias), not both")
            kw["rnn_units"] = kw.pop("hidden_dim")
        return AGCRN(num_nodes=num_nodes, backend=backend, **kw)
    if attributes is None:
        raise ValueError(f"{key} needs attributes: a (num_nodes={num_nodes}, A) tensor of static per-node "
                         "attributes, e.g. himnet_fast.models.spatial_attributes(coords, adjacency)")
    return _HYPERST[key](num_nodes, attributes, backend=backend, **kw)
