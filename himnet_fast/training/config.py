"""What defines a training run: :class:`TrainConfig`, the model it builds, and the seeding.

:class:`TrainConfig` is stored in every checkpoint as the plain dict of :meth:`TrainConfig.to_dict`
and read back by :meth:`TrainConfig.from_dict`, so a run can be resumed or evaluated from its
checkpoint alone. :func:`build_model` turns ``config.model`` (and ``config.architecture``) into
the network (:func:`build_run_model`: as a fresh run starts it); :func:`model_label` is the name
printed for it.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

import numpy as np
import torch

from .protocol import model_kwargs, training_preset


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in checkpoints as a plain dict)."""

    dataset: str = "PEMS08_SAMPLE"
    data_source: dict = field(default_factory=dict)  # how the data was loaded (load_dataset kwargs)
    model: dict = field(default_factory=dict)   # HimNet constructor arguments
    max_epochs: int = 200
    batch_size: int = 16
    eval_batch_size: Optional[int] = None       # default: batch_size (as the original)
    lr: float = 1e-3
    eps: float = 1e-3
    weight_decay: float = 0.0
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1
    clip_grad: float = 5.0
    patience: int = 20
    loss: str = "huber"
    amp: bool = False                           # bf16 autocast for the forward
    capture: bool = True                        # on a GPU: the step as one CUDA graph (CapturedTrainStep)
    seed: int = 0
    limit_batches: Optional[int] = None         # per epoch, for train, val and test (smoke runs)
    save_every: Optional[int] = None            # also write checkpoint.pt every k batches
    backend: Optional[str] = None
    residual: bool = False                      # the model predicts the change from the last input step
    architecture: str = "himnet"                # or a name of himnet_fast.models.MODEL_NAMES

    @classmethod
    def from_preset(cls, dataset: str, **overrides) -> "TrainConfig":
        """The paper's settings for ``dataset`` (see protocol.training_preset), then ``overrides``
        (None values are ignored; model-size keys go into ``model``)."""
        p = training_preset(dataset)
        model = model_kwargs(p)
        cfg = cls(dataset=dataset, model=model, max_epochs=p["max_epochs"], batch_size=p["batch_size"],
                  lr=p["lr"], eps=p["eps"], weight_decay=p["weight_decay"], milestones=list(p["milestones"]),
                  gamma=p["gamma"], clip_grad=p["clip_grad"], patience=p["patience"], loss=p["loss"],
                  residual=bool(p.get("residual", False)))
        names = {f.name for f in fields(cls)}
        for k, v in overrides.items():
            if v is None:
                continue
            if k in names:
                setattr(cfg, k, v)
            elif k in model:
                cfg.model[k] = v
            else:
                raise TypeError(f"unknown training setting {k!r}")
        return cfg

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first setting that cannot run (a count below 1, a
        negative or non-finite rate, ...); returns self."""
        def count(name, value, low=1, optional=False):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")

        def number(name, value, positive=False):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")

        count("max_epochs", self.max_epochs)
        count("batch_size", self.batch_size)
        count("eval_batch_size", self.eval_batch_size, optional=True)
        count("patience", self.patience)
        count("limit_batches", self.limit_batches, optional=True)
        count("save_every", self.save_every, optional=True)
        count("seed", self.seed, low=0)
        if self.seed >= 2 ** 32:  # numpy's global RNG (teacher forcing) takes 32-bit seeds
            raise ValueError(f"seed must be below 2**32, got {self.seed}")
        number("lr", self.lr)
        number("eps", self.eps)
        number("weight_decay", self.weight_decay)
        number("gamma", self.gamma, positive=True)
        number("clip_grad", self.clip_grad)
        if not isinstance(self.milestones, (list, tuple)) or not all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.milestones):
            raise ValueError(f"milestones must be a list of epochs >= 1, got {self.milestones!r}")
        for key in ("hidden_dim", "tf_decay_steps"):
            if key in self.model:
                count(key, self.model[key])
        return self

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # plain containers only

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


MODEL_LABELS = {"himnet": "HimNet", "agcrn": "AGCRN", "hyperst-lstm-g": "HyperST-LSTM-G",
                "hyperst-lstm-d": "HyperST-LSTM-D", "hyperst-gcgru": "HyperST-GCGRU", "sba": "SBATransformer"}


# The output layer zeroed for a residual run (the others start from their own initialisation,
# as measured in bench/results/cpu/losloop-models/).
_ZERO_INIT_OUTPUT = {"himnet": "out_proj", "sba": "head"}


def model_label(architecture: str) -> str:
    """The printed name of a run's model."""
    return MODEL_LABELS.get(architecture, architecture)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # teacher forcing draws from numpy's global RNG
    torch.manual_seed(seed)


def build_model(model_config: dict, backend: Optional[str] = None, in_steps: Optional[int] = 12,
                architecture: str = "himnet", data=None):
    """The model of a run from ``config.model`` (HimNet constructor arguments); it accepts
    inputs of ``in_steps`` steps only (the windows it is trained on).

    ``architecture`` other than "himnet" builds that model of :mod:`himnet_fast.models` with
    the run's hidden size and horizon on the signal channel; the HyperST models take their
    static attributes (coordinates, distances to the 4 nearest neighbours) from ``data``'s
    graph and sensor coordinates."""
    if architecture == "himnet":
        from ..nn.himnet import HimNet

        return HimNet(**model_config, backend=backend, in_steps=in_steps)
    if architecture == "sba":
        from ..sba import SBATransformer

        extra = getattr(data, "extra", None) or {}
        if "adj" not in extra:
            raise ValueError("--model sba needs the sensors' graph for its partitions and positional "
                             "encoding (the bundled LOSLOOP data has one; --graph for your own data)")
        return SBATransformer(model_config["num_nodes"], np.asarray(extra["adj"]), in_steps=in_steps or 12,
                              out_steps=model_config.get("out_steps", 12), d_model=4 * model_config.get("hidden_dim", 16))
    from ..models import build_model as build_family, needs_attributes, spatial_attributes

    attributes = None
    if needs_attributes(architecture):
        extra = getattr(data, "extra", None) or {}
        if not all(k in extra for k in ("adj", "lat", "lon")):
            raise ValueError(f"--model {architecture} needs the sensors' coordinates and road graph (the bundled "
                             "LOSLOOP data has them); this dataset has "
                             f"{', '.join(k for k in ('adj', 'lat', 'lon') if k in extra) or 'neither'}")
        coords = np.stack([np.asarray(extra["lat"], dtype=np.float64), np.asarray(extra["lon"], dtype=np.float64)], 1)
        attributes = spatial_attributes(coords, np.asarray(extra["adj"], dtype=np.float64))
    return build_family(architecture, model_config["num_nodes"], attributes=attributes, backend=backend,
                        input_dim=1, output_dim=model_config.get("output_dim", 1),
                        horizon=model_config.get("out_steps", 12), hidden_dim=model_config.get("hidden_dim", 64))


def build_run_model(config: "TrainConfig", data):
    """The model a fresh run starts from: :func:`build_model` of ``config`` for ``data``, its
    output layer zeroed when the run is residual."""
    model = build_model(config.model, config.backend, data.in_steps, config.architecture, data)
    out_layer = getattr(model, _ZERO_INIT_OUTPUT.get(config.architecture, ""), None)
    if config.residual and isinstance(out_layer, torch.nn.Linear):
        # a zero output layer makes the untrained model exactly the last-value forecast,
        # so training starts from that baseline instead of from random changes
        with torch.no_grad():
            out_layer.weight.zero_()
            out_layer.bias.zero_()
    return model
