"""The paper's training protocol: per-dataset presets, losses, masked metrics, and the units
of the model's output (:func:`to_forecast`, :func:`teacher_labels`; residual or not).

Values follow docs/spec.md ("Training protocol of the paper"). The per-dataset sizes and
optimiser settings have one table, ``himnet_fast.presets.PRESETS`` (shared with the
benchmarks); this module adds the settings common to every dataset and the small CPU presets,
and returns them as the plain dict a training run stores (:func:`training_preset`).
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from ..data.forecast import to_forecast  # noqa: F401  (re-exported: the model's output units live in the data layer)
from ..presets import PRESETS as _PRESETS

MODEL_KEYS = ("num_nodes", "hidden_dim", "tod_embedding_dim", "dow_embedding_dim", "node_embedding_dim",
              "st_embedding_dim", "tf_decay_steps")


def _from_table(p) -> dict:
    """The training dict of one ``himnet_fast.presets.Preset``."""
    return dict(num_nodes=p.num_nodes, hidden_dim=p.hidden_dim, tod_embedding_dim=p.tod_embedding_dim,
                dow_embedding_dim=p.dow_embedding_dim, node_embedding_dim=p.node_embedding_dim,
                st_embedding_dim=p.st_embedding_dim, tf_decay_steps=p.tf_decay_steps,
                weight_decay=p.weight_decay, milestones=list(p.milestones), loss=p.loss)


# name -> model sizes and the optimiser settings that differ between datasets, read from the
# one preset table (the paper's datasets only).
PAPER_PRESETS: Dict[str, dict] = {name.upper(): _from_table(p) for name, p in _PRESETS.items() if p.paper_config}

# Settings shared by every dataset (docs/spec.md).
COMMON = dict(lr=1e-3, eps=1e-3, gamma=0.1, batch_size=16, max_epochs=200, patience=20, clip_grad=5.0)

# The bundled 1,282-step real PEMS08 sample: PEMS08's embeddings and loss, but a model and a
# schedule sized for a few CPU minutes. 48 batches per epoch: with the paper's tf_decay_steps
# (6000) teacher forcing would stay on for the whole run and the model would never see its own
# predictions; with 40 the probability is 50% after ~150 batches (epoch 3) and ~0 by epoch 6.
SAMPLE_PRESET = dict(PAPER_PRESETS["PEMS08"], hidden_dim=32, tf_decay_steps=40, milestones=[20, 30],
                     max_epochs=8)


# Los-loop (the default dataset, T-GCN protocol) and --data series: sized so that `himnet-fast
# train` with no arguments finishes within minutes on a 2-core CPU. Speeds, as METR-LA: masked
# MAE. A 2-dim day-of-week embedding: the 7-day series has only 5 training days (Thu-Mon), so
# the test days' (Tue/Wed) rows are never trained; a small one keeps their noise small.
# residual: the model predicts the change from the last input step (to_forecast below), so
# minutes of CPU training start from the last-value forecast and improve on it.
# eps 1e-8 (Adam's default) instead of the paper's 1e-3: the masked-MAE gradients of a model
# this small are ~1e-4, so eps 1e-3 damps Adam's steps to a fraction of lr. lr 1e-2: in a
# 40-batch trial it was the only setting tried (lr 2e-3/5e-3/1e-2; MAE or MSE; zero or random
# output layer) whose validation MAE went below the last value; the others stayed on it.
# See docs/training.md for what it reaches.
SMALL_PRESET = dict(PAPER_PRESETS["METRLA"], hidden_dim=16, tod_embedding_dim=8, dow_embedding_dim=2,
                    node_embedding_dim=8, st_embedding_dim=8, tf_decay_steps=1, weight_decay=0.0,
                    milestones=[100], loss="mae", batch_size=32, max_epochs=4, residual=True, lr=1e-2, eps=1e-8)


def _normalise_loss(value) -> str:
    v = str(value).lower().replace("loss", "").replace("masked", "").replace("_", "").strip()
    if v in ("mae", "l1"):
        return "mae"
    if v in ("huber", "smoothl1"):
        return "huber"
    if v in ("mse", "l2"):
        return "mse"
    raise ValueError(f"unknown loss {value!r}; expected 'mae' (masked MAE), 'huber' or 'mse' (masked MSE)")


def training_preset(name: str) -> dict:
    """Preset of dataset ``name`` (METRLA, PEMSBAY, PEMS03/04/07/08, PEMS08_SAMPLE, LOSLOOP, or
    "custom" for ``--data``; the last two share the small CPU preset): the model
    sizes (MODEL_KEYS), ``weight_decay``, ``milestones``, ``loss`` ("mae" or "huber") and the
    COMMON settings. Returns a fresh dict."""
    from ..data.series import canonical_name

    if isinstance(name, str) and name.lower() == "custom":
        key = "CUSTOM"
    else:
        key = canonical_name(name)
    if key in ("PEMS08_SAMPLE", "LOSLOOP", "CUSTOM"):
        out = dict(COMMON)
        out.update(SAMPLE_PRESET if key == "PEMS08_SAMPLE" else SMALL_PRESET)
        if key == "CUSTOM":
            out["num_nodes"] = None  # the user's series sizes the model; there is no benchmark size to differ from
        return _copy(out)
    base = dict(PAPER_PRESETS[key])
    base["loss"] = _normalise_loss(base["loss"])
    out = dict(COMMON)
    out.update(base)
    return _copy(out)


def _copy(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()}


def model_kwargs(preset: dict) -> dict:
    """The HimNet constructor arguments of a preset."""
    return {k: preset[k] for k in MODEL_KEYS}


# ---------------------------------------------------------------------------- losses / metrics

def masked_mae_loss(pred: torch.Tensor, true: torch.Tensor, null_val: float = 0.0) -> torch.Tensor:
    """The original masked MAE: entries with ``true == null_val`` are ignored and the mask is
    rescaled by its mean, so the result is ``Σ|pred − true|·m / Σm`` (0 if nothing is valid)."""
    mask = (true != null_val).to(pred.dtype)
    denom = mask.sum()
    return torch.where(denom > 0, ((pred - true).abs() * mask).sum() / denom.clamp_min(1), denom * 0)


def masked_mse_loss(pred: torch.Tensor, true: torch.Tensor, null_val: float = 0.0) -> torch.Tensor:
    """``Σ(pred − true)²·m / Σm`` with ``m = true != null_val`` (0 if nothing is valid)."""
    mask = (true != null_val).to(pred.dtype)
    denom = mask.sum()
    return torch.where(denom > 0, ((pred - true) ** 2 * mask).sum() / denom.clamp_min(1), denom * 0)


def loss_fn(name: str):
    """"mae" -> masked MAE, "mse" -> masked MSE, "huber" -> torch's Huber loss (delta 1.0,
    mean), on raw values."""
    name = _normalise_loss(name)
    if name == "mae":
        return masked_mae_loss
    if name == "mse":
        return masked_mse_loss
    return lambda pred, true: F.huber_loss(pred, true)


class MetricAccumulator:
    """Masked MAE / RMSE / MAPE per horizon step and overall, accumulated batch by batch.

    Equal to the original's metrics on the concatenated predictions (mask ``true != 0`` rescaled
    by its mean) without keeping them: it sums, per step, the count of valid entries and
    ``|e|``, ``e²`` and ``|e / true|`` over them, in float64.
    """

    def __init__(self, out_steps: int, device=None):
        self.sums = torch.zeros(4, out_steps, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        """pred, true (B, out_steps, N, C) in raw units."""
        if pred.shape != true.shape:
            raise ValueError(f"pred and true must have the same shape, got {tuple(pred.shape)} and {tuple(true.shape)}")
        pred, true = pred.double(), true.double()
        mask = true != 0
        err = torch.where(mask, pred - true, torch.zeros_like(pred))
        dims = [d for d in range(pred.dim()) if d != 1]
        self.sums[0] += mask.sum(dims)
        self.sums[1] += err.abs().sum(dims)
        self.sums[2] += (err * err).sum(dims)
        self.sums[3] += torch.where(mask, err.abs() / true.abs().clamp_min(1e-12), err).sum(dims)

    def all_reduce(self) -> None:
        """Sum the accumulators over the ranks of the default process group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    @staticmethod
    def _metrics(s) -> dict:
        n = float(s[0])
        if n == 0:
            return {"MAE": math.nan, "RMSE": math.nan, "MAPE": math.nan}
        return {"MAE": float(s[1]) / n, "RMSE": math.sqrt(float(s[2]) / n), "MAPE": 100.0 * float(s[3]) / n}

    def compute(self) -> dict:
        """{"overall": {MAE, RMSE, MAPE (%)}, "steps": [{...} per horizon step]}; NaN where no
        entry was valid."""
        s = self.sums.cpu()
        return {"overall": self._metrics(s.sum(1)), "steps": [self._metrics(s[:, t]) for t in range(s.shape[1])]}


def format_metrics(m: dict) -> str:
    lines = [f"{'step':>7} {'MAE':>9} {'RMSE':>9} {'MAPE%':>8}"]
    for i, r in enumerate(m["steps"]):
        lines.append(f"{i + 1:>7} {r['MAE']:9.3f} {r['RMSE']:9.3f} {r['MAPE']:8.2f}")
    o = m["overall"]
    lines.append(f"{'all':>7} {o['MAE']:9.3f} {o['RMSE']:9.3f} {o['MAPE']:8.2f}")
    return "\n".join(lines)


def teacher_labels(batch, scaler, residual: bool = False) -> torch.Tensor:
    """What the decoder is fed under teacher forcing: the targets in the model's output units.

    Residual: a missing target (0) becomes no change from the last value, not the drop to 0 that
    the raw difference would feed the decoder. Not residual: the scaled targets, missing ones
    included, as the original."""
    if not residual:
        return batch.labels
    last = scaler.inverse_transform(batch.x[:, -1, :, :1].float())
    change = (batch.target - last[:, None]) / scaler.std
    return torch.where(batch.target != 0, change, torch.zeros_like(change))
