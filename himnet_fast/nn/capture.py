"""CUDA-graph capture of the whole HimNet inference forward.

Serving a trained HimNet is a latency problem: one forecast is 24+ recurrent cell calls
(T encoder steps for each of the two encoders, ``out_steps`` decoder steps), each a handful
of small kernels, so at serving batch sizes the GPU waits on Python and launch overhead.
:class:`CapturedHimNet` records the eval forward — both encoders, every decoder step and the
output projection — once, for a fixed batch size, as a ``torch.cuda.CUDAGraph`` over static
input buffers, and replays it: one launch per forecast.

Usage::

    model = HimNet(num_nodes=883, ...).cuda().eval()
    forecast = model.capture(batch_size=16)   # or CapturedHimNet(model, 16)
    y = forecast(x, y_cov)                    # (16, out_steps, N, output_dim), a fresh tensor

Rules and limits:

* The model must be on a CUDA device and in eval mode (training mode draws teacher-forcing
  coins from numpy's RNG on the host: not capturable). Batch size, input steps (``in_steps``)
  and node count are fixed; another batch size needs another capture (share memory between
  captures with ``pool=torch.cuda.graph_pool_handle()``).
* Inputs are validated before the replay, outside the graph: shapes, and the time features
  (one host sync, :meth:`HimNet.validate_inputs`) when ``model.check_inputs`` is on — the same
  checks as the eager forward.
  They are then copied into the static buffers (any device/dtype; copied and cast).
* The graph reads the parameters' memory: in-place updates (``load_state_dict``,
  ``param.data.copy_``) are seen by the next replay; replacing a parameter tensor is not
  (capture again).
* ``clone=False`` returns the static output buffer itself: no copy, but the next replay
  overwrites it.
* Whatever backend the model uses runs inside the graph ("cuda", "triton" or "torch"); the
  kernels are the eager ones, so the captured output equals the eager output.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

__all__ = ["CapturedHimNet"]


class CapturedHimNet:
    """A HimNet eval forward captured as a CUDA graph for one batch size.

    Args:
        model: a :class:`~himnet_fast.HimNet` on a CUDA device, in eval mode.
        batch_size: B, fixed for the graph.
        in_steps: input steps T of ``x`` (default 12), fixed for the graph.
        dtype: dtype of the static input buffers (default: the model's parameter dtype).
        autocast_dtype: capture under ``torch.autocast("cuda", dtype=...)`` (e.g.
            ``torch.bfloat16``); None captures in the parameters' dtype.
        warmup: eager runs on a side stream before capture (>= 1: kernels are compiled and
            loaded, lazy state is initialised outside the graph).
        pool: a memory pool handle shared with other captures (``torch.cuda.graph_pool_handle()``).
        clone: default of :meth:`__call__`'s ``clone``.

    Calling it: ``x`` (B, in_steps, N, input_dim), ``y_cov`` (B, >= out_steps, N, ycov_dim) ->
    (B, out_steps, N, output_dim).
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, *, in_steps: int = 12,
                 dtype: Optional[torch.dtype] = None, autocast_dtype: Optional[torch.dtype] = None,
                 warmup: int = 3, pool=None, clone: bool = True):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "validate_inputs"):
            raise TypeError(f"model must be a himnet_fast.HimNet, got {type(model).__name__}")
        for name, value, low in (("batch_size", batch_size, 1), ("in_steps", in_steps, 1), ("warmup", warmup, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if model.training:
            raise RuntimeError("CUDA-graph capture needs an eval-mode model: call model.eval() first "
                               "(training mode draws teacher-forcing coins on the host, which a graph cannot replay)")
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1:
            raise RuntimeError(f"the model's parameters must be on one device, got {sorted(map(str, devices))}")
        device = devices.pop()
        if device.type != "cuda":
            hint = "" if torch.cuda.is_available() else " (and no CUDA device is available here)"
            raise RuntimeError(f"CUDA-graph capture needs the model on a CUDA device; its parameters are on "
                               f"{device}{hint}: move it with model.cuda()")

        self.model = model
        self.batch_size = batch_size
        self.in_steps = in_steps
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.clone = clone
        dtype = dtype or next(model.parameters()).dtype
        N = model.num_nodes
        # Zeros are valid inputs (time of day 0, day of week 0) for the warm-up and capture.
        self.static_x = torch.zeros(batch_size, in_steps, N, model.input_dim, dtype=dtype, device=device)
        self.static_y_cov = torch.zeros(batch_size, model.out_steps, N, model.ycov_dim, dtype=dtype, device=device)
        try:
            self.graph, self.static_output = self._capture(warmup, pool)
        except Exception as exc:
            raise RuntimeError(f"capturing the HimNet forward as a CUDA graph failed "
                               f"({type(exc).__name__}: {exc}); the eager model is unaffected") from exc

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # No cast cache: cached weight casts made during capture would be graph-private memory.
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _capture(self, warmup: int, pool) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        model = self.model
        check_inputs = model.check_inputs
        # Input validation syncs with the host; it runs in __call__, outside the graph.
        model.check_inputs = False
        try:
            with torch.cuda.device(self.device), torch.no_grad(), self._autocast():
                current = torch.cuda.current_stream()
                side = torch.cuda.Stream()
                side.wait_stream(current)
                with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                    for _ in range(warmup):
                        model(self.static_x, self.static_y_cov)
                current.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = model(self.static_x, self.static_y_cov)
        finally:
            model.check_inputs = check_inputs
        return graph, out

    def __call__(self, x: torch.Tensor, y_cov: torch.Tensor, *, clone: Optional[bool] = None) -> torch.Tensor:
        """x (B, in_steps, N, input_dim), y_cov (B, >= out_steps, N, ycov_dim) ->
        (B, out_steps, N, output_dim): a new tensor, or the static output buffer with ``clone=False``."""
        model = self.model
        if model.training:
            raise RuntimeError("the model was switched to training mode after capture; call model.eval() "
                               "(the captured graph is the eval forward)")
        for name, t in (("x", x), ("y_cov", y_cov)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() >= 1 and t.shape[0] != self.batch_size:
                raise ValueError(f"{name} has batch {t.shape[0]} (shape {tuple(t.shape)}), but this graph was "
                                 f"captured for batch_size={self.batch_size}: capture another "
                                 f"(model.capture({t.shape[0]})) or pad the batch")
        if tuple(x.shape) != tuple(self.static_x.shape):
            raise ValueError(f"x must have shape {tuple(self.static_x.shape)} (B, in_steps, N, input_dim) "
                             f"as captured, got {tuple(x.shape)}")
        if tuple(y_cov.shape[2:]) != tuple(self.static_y_cov.shape[2:]) or y_cov.shape[1] < model.out_steps:
            raise ValueError(f"y_cov must have shape (B={self.batch_size}, >= out_steps={model.out_steps}, "
                             f"N={model.num_nodes}, {model.ycov_dim}), got {tuple(y_cov.shape)}")
        if model.check_inputs:  # the time features, as the eager forward checks them (one host sync)
            model.validate_inputs(x)
        self.static_x.copy_(x)
        self.static_y_cov.copy_(y_cov[:, :model.out_steps])
        self.replay()
        keep = self.clone if clone is None else clone
        return self.static_output.clone() if keep else self.static_output

    def replay(self) -> torch.Tensor:
        """Replay on the current stream with whatever the static buffers hold (no checks);
        returns the static output buffer."""
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.static_output

    def __repr__(self) -> str:
        return (f"CapturedHimNet(batch_size={self.batch_size}, in_steps={self.in_steps}, "
                f"num_nodes={self.model.num_nodes}, device={self.device}, autocast_dtype={self.autocast_dtype})")
