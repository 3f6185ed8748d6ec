"""A whole training step recorded as one CUDA graph and replayed per batch.

At PEMS07 size every kernel of a HimNet training step is microseconds of work, and eagerly the
GPU waits on Python and launch overhead (thousands of launches per step). :class:`CapturedTrainStep`
records forward, loss, backward, gradient clipping and the optimizer step once, for fixed input
shapes, over static input buffers, and replays them: one launch per step, no host work. The
step is sync-free by construction (the library's ops read no device data on the host, the
losses and clipping use no ``.item()``), which is what makes it capturable.

Usage::

    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [30, 40])   # changes the lr tensor in place
    def loss_fn(model, x, y_cov, labels, target, teacher_forcing):
        out = model(x, y_cov, labels, teacher_forcing=teacher_forcing)
        return (out - target).abs().mean()
    step = CapturedTrainStep(model, opt, loss_fn, batch_size=16, clip_grad_norm=5.0)
    for batches_seen, (x, y_cov, labels, target) in enumerate(batches):   # tensors on the model's device
        mask = model.teacher_forcing_mask(batches_seen, "cuda")          # this batch's coins
        loss = step(x, y_cov, labels, target, mask)   # the first call captures (after a warm-up)

Rules and limits:

* The model is on a CUDA device; the optimizer is ``Adam``/``AdamW`` with ``capturable=True``
  and a tensor learning rate (so a scheduler can change it between replays).
* The input shapes are fixed at the first call (the first input's dim 0 is the batch: it must
  be ``batch_size``); a call with other shapes raises ``ValueError``. A last partial batch runs
  through :meth:`eager`, the same step without the graph, on the same model and optimizer.
* The graph reads the parameters', gradients' and optimizer state's memory: in-place changes
  (``load_state_dict``, the scheduler) are seen by the next replay; a replaced parameter is not,
  and the next call raises ``RuntimeError`` (build a new step).
* Anything the step draws on the host must be an input: HimNet's teacher-forcing coins are
  drawn per batch by the caller (``model.teacher_forcing_mask(batches_seen, device)``) and passed
  as a tensor, so the replay uses this batch's draws.
* The warm-up before capture runs real steps on the first batch (kernels compiled, optimizer
  state created); the parameters, buffers, optimizer state and RNG states are restored after
  it, so the captured run equals the eager one step for step.
* Under DistributedDataParallel the trainer runs the eager step (docs/training.md).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["TrainStep", "CapturedTrainStep"]

_ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class TrainStep:
    """One eager training step: zero the gradients, ``loss_fn(model, *inputs)``, backward,
    clip the gradients' total norm (if ``clip_grad_norm``), optimizer step; returns the loss
    (detached, on the device: nothing waits for it)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 clip_grad_norm: Optional[float] = None):
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm!r}")
        self.model, self.optimizer, self.loss_fn, self.clip_grad_norm = model, optimizer, loss_fn, clip_grad_norm

    def _step(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        loss = self.loss_fn(self.model, *inputs)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
        loss.backward()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self._step(inputs)


class CapturedTrainStep(TrainStep):
    """Forward, loss, backward, gradient clipping and the optimizer step of ``model`` as one
    CUDA graph (module docstring).

    Args:
        model: the module being trained, on a CUDA device.
        optimizer: ``torch.optim.Adam`` or ``AdamW`` over the model's parameters, built with
            ``capturable=True`` and a tensor ``lr``.
        loss_fn: ``loss_fn(model, *inputs) -> loss`` (a scalar tensor): the forward and loss,
            reading only its tensor inputs (they are the graph's static buffers).
        batch_size: dim 0 of the first input (the batch).
        clip_grad_norm: clip the gradients' total norm to this (``clip_grad_norm_``); None: no clipping.
        warmup: eager steps before capture (>= 1).
        pool: a memory pool handle shared with other graphs (``torch.cuda.graph_pool_handle()``).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 batch_size: int, *, clip_grad_norm: Optional[float] = None, warmup: int = 3, pool=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("batch_size", batch_size), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        super().__init__(model, optimizer, loss_fn, clip_grad_norm=clip_grad_norm)
        params = list(model.parameters())
        devices = {p.device for p in params}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            hint = "" if torch.cuda.is_available() else " (no CUDA device is available here)"
            raise RuntimeError(f"CapturedTrainStep needs the model's parameters on one CUDA device, got "
                               f"{sorted(map(str, devices))}{hint}: move it with model.cuda(), or train eagerly")
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"optimizer must be torch.optim.Adam or AdamW (capturable=True), got "
                            f"{type(optimizer).__name__}")
        for group in optimizer.param_groups:
            if not group.get("capturable", False):
                raise ValueError("the optimizer must be built with capturable=True: its step then runs on the "
                                 "device, without host synchronisation, and can be recorded in the graph")
            if not isinstance(group["lr"], torch.Tensor):
                raise ValueError("the optimizer's lr must be a tensor (e.g. lr=torch.tensor(1e-3)): a float is "
                                 "frozen into the graph, so a scheduler could not change it")
        owned = {id(p) for p in params}
        if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimizer updates tensors that are not parameters of the model")
        self.batch_size, self.warmup, self.pool = batch_size, warmup, pool
        self.device = next(iter(devices))
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_inputs: List[torch.Tensor] = []
        self.static_loss: Optional[torch.Tensor] = None
        self._params = [(id(p), p.data_ptr()) for p in params]

    def eager(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The same step without the graph (any batch size): for a last partial batch."""
        # Once captured, the graph owns the gradient buffers: zero them in place, keep them.
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        return self._step(inputs)

    # ------------------------------------------------------------------ capture
    def _check_inputs(self, inputs) -> None:
        if not inputs:
            raise ValueError("the step needs at least one input tensor")
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"input {i} must be a torch.Tensor, got {type(t).__name__}")
        lead = inputs[0]
        if lead.dim() == 0 or lead.shape[0] != self.batch_size:
            raise ValueError(f"input 0 has batch {lead.shape[0] if lead.dim() else 'none'} (shape "
                             f"{tuple(lead.shape)}), but the step is captured for batch_size={self.batch_size}: "
                             "run a partial batch with .eager(...)")
        if self.graph is not None:
            if len(inputs) != len(self.static_inputs):
                raise ValueError(f"the step was captured with {len(self.static_inputs)} inputs, got {len(inputs)}")
            for i, (t, s) in enumerate(zip(inputs, self.static_inputs)):
                if t.shape != s.shape or t.dtype != s.dtype:
                    raise ValueError(f"input {i} has shape {tuple(t.shape)} and dtype {t.dtype}; the step was "
                                     f"captured for {tuple(s.shape)} {s.dtype}")
            if [(id(p), p.data_ptr()) for p in self.model.parameters()] != self._params:
                raise RuntimeError("a parameter of the model was replaced (or moved) after capture: the graph "
                                   "still updates the old tensors; build a new CapturedTrainStep")

    def _state_snapshot(self):
        params = [t.detach().clone() for t in self.model.parameters()]
        buffers = [t.detach().clone() for t in self.model.buffers()]
        opt = {id(p): {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
               for p, s in self.optimizer.state.items()}
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device))
        return params, buffers, opt, rng

    @torch.no_grad()
    def _restore(self, snapshot) -> None:
        """Undo the warm-up in place (the graph will read these very tensors): parameters,
        buffers, the optimizer state as it was (a fresh Adam state is zeros), the RNGs."""
        params, buffers, opt, rng = snapshot
        for t, v in zip(self.model.parameters(), params):
            t.copy_(v)
        for t, v in zip(self.model.buffers(), buffers):
            t.copy_(v)
        for p, state in self.optimizer.state.items():
            before = opt.get(id(p), {})
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if k in before:
                    v.copy_(before[k])
                elif k in _ADAM_STATE_KEYS:
                    v.zero_()
                else:
                    raise RuntimeError(f"cannot restore the optimizer's {k!r} state after the warm-up")
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], self.device)

    def _capture(self, inputs: Sequence[torch.Tensor]) -> None:
        self.static_inputs = [t.detach().to(self.device).clone() for t in inputs]
        snapshot = self._state_snapshot()
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                for _ in range(self.warmup):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._step(self.static_inputs)
            current.wait_stream(side)
            self._restore(snapshot)
            # Gradients are created inside the capture, from the graph's pool: each replay's
            # backward writes them afresh (no accumulation across steps, no zero_grad needed).
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    self.static_loss = self._step(self.static_inputs)
            except Exception as exc:
                raise RuntimeError(f"capturing the training step as a CUDA graph failed ({type(exc).__name__}: "
                                   f"{exc}); train eagerly (the trainer's --no-capture) or see "
                                   "himnet_fast.training.captured for the rules") from exc
        self.graph = graph

    # ------------------------------------------------------------------ replay
    def __call__(self, *inputs: torch.Tensor, clone: bool = True) -> torch.Tensor:
        """Run one step on ``inputs`` (copied into the static buffers; the first call captures)
        and return its loss (a new tensor, or the static buffer with ``clone=False``: the next
        call overwrites it). Nothing waits for the device."""
        self._check_inputs(inputs)
        if self.graph is None:
            self._capture(inputs)  # the captured run itself is not replayed: replay this batch now
        else:
            for s, t in zip(self.static_inputs, inputs):
                s.copy_(t, non_blocking=True)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.static_loss.clone() if clone else self.static_loss

    def __repr__(self) -> str:
        state = "captured" if self.graph is not None else "not captured yet"
        return (f"CapturedTrainStep(batch_size={self.batch_size}, clip_grad_norm={self.clip_grad_norm}, "
                f"device={self.device}, {state})")
