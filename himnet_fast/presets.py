"""Dataset presets: graph sizes and the paper's model / training configuration.

One table shared by the benchmarks (``himnet-fast bench --preset NAME``) and the training
pipeline. Values follow docs/spec.md, "Training protocol of the paper". Datasets without a
paper configuration (LargeST's SD/GBA/GLA/CA and synthetic graphs) use the PEMS07 model sizes.

>>> from himnet_fast.presets import get_preset
>>> p = get_preset("pems08")
>>> p.num_nodes, p.hidden_dim, p.loss
(170, 96, 'huber')
>>> get_preset("synthetic-100000").num_nodes
100000
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Dict, Tuple

__all__ = ["Preset", "PRESETS", "get_preset", "preset_names", "synthetic"]

STEPS_PER_DAY = 288  # 5-minute steps; also the size of HimNet's time-of-day embedding table
MAX_SYNTHETIC_NODES = 100_000


@dataclass(frozen=True)
class Preset:
    """One dataset's graph size, HimNet hyper-parameters and training protocol.

    ``model_kwargs()`` gives the keyword arguments of :class:`himnet_fast.HimNet` (and of the
    reference model); the other fields are for the training pipeline.
    """

    name: str
    num_nodes: int
    hidden_dim: int = 64
    tod_embedding_dim: int = 8
    dow_embedding_dim: int = 8
    node_embedding_dim: int = 16
    st_embedding_dim: int = 16
    tf_decay_steps: int = 6000
    weight_decay: float = 1e-4
    milestones: Tuple[int, ...] = (40, 60)
    loss: str = "huber"  # "mae" (masked MAE) or "huber" (torch default delta 1.0)
    steps_per_day: int = STEPS_PER_DAY
    paper_config: bool = True  # False: sizes borrowed from PEMS07 (LargeST, synthetic)

    def model_kwargs(self, num_nodes: int | None = None) -> Dict[str, int]:
        """HimNet constructor arguments; ``num_nodes`` overrides the graph size (scaling runs)."""
        n = self.num_nodes if num_nodes is None else int(num_nodes)
        if n < 1:
            raise ValueError(f"num_nodes must be >= 1, got {n}")
        return dict(num_nodes=n, hidden_dim=self.hidden_dim, tod_embedding_dim=self.tod_embedding_dim,
                    dow_embedding_dim=self.dow_embedding_dim, node_embedding_dim=self.node_embedding_dim,
                    st_embedding_dim=self.st_embedding_dim, tf_decay_steps=self.tf_decay_steps)

    def with_nodes(self, num_nodes: int) -> "Preset":
        """The same configuration on a graph of ``num_nodes`` nodes."""
        self.model_kwargs(num_nodes)  # validates
        return dataclasses.replace(self, num_nodes=int(num_nodes))


def _pems07_sized(name: str, num_nodes: int) -> Preset:
    # No paper configuration exists for these graphs: PEMS07's model and protocol, as the
    # largest of the paper's datasets, are the closest.
    return dataclasses.replace(PRESETS["pems07"], name=name, num_nodes=num_nodes, paper_config=False)


PRESETS: Dict[str, Preset] = {
    "metrla": Preset("metrla", 207, weight_decay=5e-4, milestones=(30, 40), loss="mae"),
    "pemsbay": Preset("pemsbay", 325, weight_decay=1e-4, milestones=(25, 35), loss="mae"),
    "pems03": Preset("pems03", 358, weight_decay=3e-4, milestones=(30, 50), tf_decay_steps=4000),
    "pems04": Preset("pems04", 307, tod_embedding_dim=12, dow_embedding_dim=4, tf_decay_steps=4000,
                     weight_decay=1e-4, milestones=(30, 50)),
    "pems07": Preset("pems07", 883, weight_decay=1e-4, milestones=(40, 60)),
    "pems08": Preset("pems08", 170, hidden_dim=96, tod_embedding_dim=10, dow_embedding_dim=2,
                     node_embedding_dim=14, st_embedding_dim=10, weight_decay=0.0, milestones=(40, 60, 80)),
}
# LargeST (Liu et al., NeurIPS 2023) graph sizes.
for _name, _n in (("sd", 716), ("gba", 2352), ("gla", 3834), ("ca", 8600)):
    PRESETS[_name] = _pems07_sized(_name, _n)

_SYNTH = re.compile(r"^(?:synthetic|synth)[-_]?(\d+)$")


def synthetic(num_nodes: int) -> Preset:
    """A synthetic graph of ``num_nodes`` nodes (1..100,000) with PEMS07's model sizes."""
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool):
        raise TypeError(f"num_nodes must be an int, got {type(num_nodes).__name__}")
    if not 1 <= num_nodes <= MAX_SYNTHETIC_NODES:
        raise ValueError(f"num_nodes must be in 1..{MAX_SYNTHETIC_NODES}, got {num_nodes}")
    return _pems07_sized(f"synthetic-{num_nodes}", num_nodes)


def preset_names() -> list:
    """Named presets, plus the pattern for synthetic graphs."""
    return sorted(PRESETS) + ["synthetic-N"]


def get_preset(name: str) -> Preset:
    """Look a preset up by name (case-insensitive; "PEMS-BAY", "METR-LA" spellings accepted).

    ``synthetic-N`` (or ``synthN``) gives a synthetic graph of N nodes.
    """
    if not isinstance(name, str):
        raise TypeError(f"preset name must be a string, got {type(name).__name__}")
    low = name.strip().lower()
    m = _SYNTH.match(low)
    if m:
        return synthetic(int(m.group(1)))
    key = low.replace("-", "").replace("_", "")
    if key in PRESETS:
        return PRESETS[key]
    raise ValueError(f"unknown preset {name!r}; expected one of {preset_names()}")
