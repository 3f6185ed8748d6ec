"""The windows of a :class:`~himnet_fast.data.series.TrafficData` held on the training device.

:meth:`TrafficData.batch` gathers a batch on the host, and a GPU then waits for its copy at
every step. :class:`DeviceWindows` puts the series on the device once (the model's input
channels, scaled and filled as ``TrafficData.batch`` makes them, and the raw targets) with the
window starts of every split, and gathers each batch there by indexing: a step needs no
host-to-device copy. The batches are bitwise those of ``TrafficData.batch`` (the same float32
operations on the same values).

The time features are checked here, once for the whole series, so the model can skip its
per-batch check (a host synchronisation) inside a training step.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from .series import Batch, TrafficData

__all__ = ["DeviceWindows", "check_time_features"]


def check_time_features(series: np.ndarray, what: str = "the data") -> None:
    """ValueError unless channel 1 (time of day) is in [0, 1) and channel 2 (day of week) in
    0..6 everywhere: the values the model's embeddings index with (as HimNet's own check)."""
    tod, dow = series[..., 1], series[..., 2]
    bad_tod = ~((tod >= 0) & (tod < 1))
    if bad_tod.any():
        raise ValueError(f"x[..., 1] (time of day) must be a fraction of the day in [0, 1); {what} has "
                         f"{tod[bad_tod][:4].tolist()}")
    bad_dow = ~((dow >= 0) & (dow < 7))
    if bad_dow.any():
        raise ValueError(f"x[..., 2] (day of week) must be in 0..6; {what} has {dow[bad_dow][:4].tolist()}")



class DeviceWindows:
    """``data``'s series and window starts on ``device``; :meth:`batch` gathers there.

    Memory: the series' three input channels and its raw signal, 16 bytes per (step, node)
    (400 MB for PEMS07's 28,224 steps x 883 nodes)."""

    def __init__(self, data: TrafficData, device):
        check_time_features(data.series, f"{data.name}'s series")
        self.device = torch.device(device)
        self.scaler = data.scaler
        self.in_steps, self.out_steps = data.in_steps, data.out_steps
        inputs = torch.from_numpy(np.ascontiguousarray(data.series[..., :3])).clone()
        inputs[..., 0] = self.scaler.transform(torch.from_numpy(np.ascontiguousarray(data.input_signal)))
        self.inputs = inputs.to(self.device)                                          # (T, N, 3)
        self.target = torch.from_numpy(np.ascontiguousarray(data.series[..., :1])).to(self.device)  # (T, N, 1)
        self.starts: Dict[str, torch.Tensor] = {k: torch.from_numpy(np.asarray(v.starts, dtype=np.int64)).to(self.device)
                                                for k, v in data.splits.items()}
        self._in = torch.arange(self.in_steps, device=self.device)
        self._out = self.in_steps + torch.arange(self.out_steps, device=self.device)

    def positions(self, order: np.ndarray) -> torch.Tensor:
        """An epoch's window positions on the device: one copy per epoch, not per batch."""
        return torch.from_numpy(np.asarray(order, dtype=np.int64)).to(self.device, non_blocking=True)

    def batch(self, split: str, positions: torch.Tensor) -> Batch:
        """The windows ``splits[split].starts[positions]`` (positions on the device) as a
        :class:`~himnet_fast.data.series.Batch` on the device."""
        starts = self.starts[split][positions]
        xi = starts[:, None] + self._in                      # (B, T_in)
        yi = starts[:, None] + self._out                     # (B, T_out)
        x = self.inputs[xi]                                  # (B, T_in, N, 3)
        y_cov = self.inputs[yi][..., 1:3].contiguous()       # (B, T_out, N, 2)
        target = self.target[yi]                             # (B, T_out, N, 1)
        return Batch(x, y_cov, self.scaler.transform(target), target)
