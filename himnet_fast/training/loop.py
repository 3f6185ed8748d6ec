"""The training loop of the paper on :class:`himnet_fast.HimNet`, resumable bit for bit.

One :class:`Trainer` owns the model, Adam, MultiStepLR, the batch order and the counters.
Per batch: the teacher-forcing coins drawn on the host from ``batches_seen`` (the number of
batches trained before this one), forward, inverse-scale the prediction, loss on raw values
(masked MAE or Huber), backward, clip the gradient norm to 5, step. The batches are gathered on
the device (:class:`~himnet_fast.data.device.DeviceWindows`); on one CUDA device the step is
replayed as one CUDA graph (:class:`~himnet_fast.training.captured.CapturedTrainStep`; eager
with ``capture=False``, on CPU and under DDP), and nothing in it waits for the device. Per
epoch: the scheduler steps, the validation loss (mean over batches, as the original) decides
the best model and early stopping. Under ``torchrun`` the model is wrapped in DistributedDataParallel and each rank
trains on its shard of every batch (see :class:`~himnet_fast.data.BatchOrder`).

Resuming: a checkpoint holds the model, optimizer, scheduler, every RNG state and the
counters, including how far into the current epoch training got; the epoch's batch order
is a function of (seed, epoch). A resumed run therefore continues exactly as the
uninterrupted one would have (bitwise on CPU; on GPU as far as the kernels are deterministic).

What defines a run (TrainConfig, the model) is in :mod:`.config`; the files and tables a run
writes are in :mod:`.outputs`.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Callable, List, Optional

import torch

from ..data.device import DeviceWindows
from ..data.sampler import BatchOrder
from ..data.series import Batch, TrafficData
from .. import checkpoint as ckpt
from . import outputs
from .baselines import baseline_metrics
from .captured import CapturedTrainStep, TrainStep
from .config import TrainConfig, build_run_model, seed_everything
from .protocol import MetricAccumulator, _normalise_loss, loss_fn, teacher_labels, to_forecast


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal; disabled when not wanted or stderr is not a TTY (logs get the
    per-epoch lines only)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


@torch.no_grad()
def _device_batches(windows: DeviceWindows, split: str, order: BatchOrder, epoch: int, skip: int = 0):
    """The batches of ``order`` gathered on the device: the epoch's positions are copied there
    once, each batch is a slice of them."""
    positions = windows.positions(order.indices(epoch))
    bs = order.batch_size
    for b in range(skip, len(order)):
        yield windows.batch(split, positions[b * bs:(b + 1) * bs])


@torch.no_grad()
def evaluate_model(model, data: TrafficData, split: str = "test", *, batch_size: int = 16, device="cpu",
                   limit_batches: Optional[int] = None, amp: bool = False, criterion: Optional[Callable] = None,
                   progress: bool = False, residual: bool = False, windows: Optional[DeviceWindows] = None) -> dict:
    """Masked MAE/RMSE/MAPE of ``model`` on a split, per horizon step and overall (raw units).

    Shards the windows over the ranks of an initialised process group (without padding, so
    every window counts once) and sums the statistics over the ranks. With ``criterion`` the
    result also has "loss": the mean of the per-batch losses, as the original's validation.
    The batches are gathered on the device (``windows``, made here if not given); nothing is
    read back to the host until the sums are.
    """
    rank, world = _dist_info()
    device = torch.device(device)
    windows = windows if windows is not None else DeviceWindows(data, device)
    was_training = model.training
    model.eval()
    order = BatchOrder(len(data.splits[split]), batch_size, shuffle=False, rank=rank, world_size=world, pad=False,
                       limit_batches=limit_batches)
    acc = MetricAccumulator(data.out_steps, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    bar = _progress(len(order), f"eval {split}", progress and rank == 0)
    for b in _device_batches(windows, split, order, 0):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(b.x, b.y_cov)
        pred = to_forecast(out, b.x, data.scaler, residual)
        acc.update(pred, b.target)
        if criterion is not None:
            loss_sum[0] += criterion(pred, b.target).double()
            loss_sum[1] += 1
        bar.update(1)
    bar.close()
    acc.all_reduce()
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(loss_sum)
    model.train(was_training)
    result = acc.compute()
    if criterion is not None:
        result["loss"] = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else math.nan
    return result


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Trainer.fit`: the run was saved to ``path`` (None when the trainer
    has no ``out_dir``) after the last completed batch and can be resumed from it."""

    def __init__(self, path: Optional[str]):
        super().__init__(path)
        self.path = path


class _DeferSigint:
    """Turns the first SIGINT into a flag checked between batches, so the saved checkpoint is
    never one with a half-applied optimizer step; a second Ctrl-C interrupts at once. Only the
    main thread can install signal handlers; elsewhere this does nothing."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        print("\nCtrl-C: saving a checkpoint after this batch (press again to abort without saving)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class Trainer:
    """Train ``model`` on ``data`` with ``config``; write checkpoints and metrics to ``out_dir``.

    Build a fresh run with ``Trainer(data, config, ...)`` (seeds everything, then builds the
    model) and a resumed one with :meth:`Trainer.resume`.
    """

    def __init__(self, data: TrafficData, config: TrainConfig, *, device="cpu", out_dir: Optional[str] = None,
                 progress: bool = True, model=None, log: Callable[[str], None] = print):
        self.data, self.config = data, config
        self.device = torch.device(device)
        self.out_dir = out_dir
        self.progress = progress
        self.rank, self.world = _dist_info()
        self._log = log
        config.validate()
        preset_nodes = config.model.get("num_nodes")
        if preset_nodes is not None and preset_nodes != data.num_nodes:
            # the preset's size is the benchmark's; a subset or synthetic stand-in has its own
            self.log(f"note: the {config.dataset} preset has {preset_nodes} nodes, the data {data.num_nodes}: "
                     f"using {data.num_nodes}")
        config.model["num_nodes"] = data.num_nodes
        if data.num_missing and _normalise_loss(config.loss) == "huber":
            self.log(f"note: the Huber loss (the paper's) is not masked: it trains on the {data.num_missing:,} "
                     f"missing readings of {data.name} as targets of 0 too; the metrics leave them out")
        seed_everything(config.seed)
        if model is None:
            model = build_run_model(config, data)
        self.model = model.to(self.device)
        # The series and its windows live on the device; their time features are checked there,
        # once, so the model's per-batch check (a host synchronisation) is off inside the step.
        self.windows = DeviceWindows(data, self.device)
        if hasattr(self.model, "check_inputs"):
            self.model.check_inputs = False
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids)
        # On one GPU each step is one CUDA graph (CapturedTrainStep): Adam then runs capturable,
        # with its learning rate a device tensor that the scheduler changes in place.
        self.captures = bool(config.capture) and self.device.type == "cuda" and self.world == 1
        lr = torch.tensor(config.lr, device=self.device) if self.captures else config.lr
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, eps=config.eps,
                                          weight_decay=config.weight_decay, capturable=self.captures)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=list(config.milestones),
                                                              gamma=config.gamma)
        self.criterion = loss_fn(config.loss)
        self.order = BatchOrder(len(data.splits["train"]), config.batch_size, shuffle=True, seed=config.seed,
                                rank=self.rank, world_size=self.world, pad=True, limit_batches=config.limit_batches)
        # counters: everything needed to continue exactly
        self.epoch = 0              # completed epochs
        self.step_in_epoch = 0      # batches of the current epoch already trained
        self.batches_seen = 0       # drives teacher forcing
        self._epoch_loss = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device
        clip = config.clip_grad or None
        self.step = (CapturedTrainStep(self.model, self.optimizer, self._loss, config.batch_size, clip_grad_norm=clip)
                     if self.captures else TrainStep(self.net, self.optimizer, self._loss, clip_grad_norm=clip))
        self.best_val = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: List[dict] = []
        self.best_state = None

    # ------------------------------------------------------------------ logging / files
    def log(self, msg: str) -> None:
        if self.rank == 0:
            self._log(msg)

    def _path(self, name: str) -> Optional[str]:
        return None if self.out_dir is None else os.path.join(self.out_dir, name)

    # ------------------------------------------------------------------ training
    @property
    def epoch_loss_sum(self) -> float:
        """Sum of this epoch's batch losses so far (read from the device: a synchronisation)."""
        return float(self._epoch_loss)

    @epoch_loss_sum.setter
    def epoch_loss_sum(self, value: float) -> None:
        self._epoch_loss.fill_(value)

    def _loss(self, model, x, y_cov, labels, target, *teacher_forcing) -> torch.Tensor:
        """Forward (teacher forcing by the given mask), raw-unit forecast, loss: what a step
        differentiates, reading only its tensor arguments (a captured step's static buffers)."""
        b = Batch(x, y_cov, labels, target)
        kwargs = {"teacher_forcing": teacher_forcing[0]} if teacher_forcing else {}
        # No autocast weight cache: its casts would be allocations private to a captured graph.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp, cache_enabled=False):
            out = model(x, y_cov, teacher_labels(b, self.data.scaler, self.config.residual), self.batches_seen,
                        **kwargs)
        return self.criterion(to_forecast(out, x, self.data.scaler, self.config.residual), target)

    def _teacher_forcing(self) -> list:
        """[this batch's teacher-forcing mask] for a model with teacher forcing (the numpy coins,
        drawn here on the host before the step), else []."""
        if getattr(self.model, "use_teacher_forcing", False) and hasattr(self.model, "teacher_forcing_mask"):
            return [self.model.teacher_forcing_mask(self.batches_seen, self.device)]
        return []

    def batches(self, epoch: int, skip: int = 0):
        """The training batches of ``epoch`` after the first ``skip``, gathered on the device."""
        return _device_batches(self.windows, "train", self.order, epoch, skip)

    def train_batch(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on ``batch`` (on the device); returns the loss as a device tensor
        (no synchronisation). A captured step replays its graph; a batch of another size (the
        last of an epoch) runs the same step eagerly."""
        inputs = [batch.x, batch.y_cov, batch.labels, batch.target] + self._teacher_forcing()
        if isinstance(self.step, CapturedTrainStep):
            full = len(batch) == self.step.batch_size
            loss = self.step(*inputs, clone=False) if full else self.step.eager(*inputs)
        else:
            loss = self.step(*inputs)
        self._epoch_loss += loss
        self.batches_seen += 1
        return loss

    def fit(self, *, stop_after_batches: Optional[int] = None) -> dict:
        """Train until max_epochs or early stopping; returns the metrics summary.

        ``stop_after_batches`` interrupts after that many training batches of this call
        (writing checkpoint.pt first), as a kill would between two saves; for tests and for
        time-boxed jobs. Returns the partial summary in that case.
        """
        with _DeferSigint() as sigint:
            summary = self._fit(stop_after_batches, sigint)
        if summary is None:
            self.save_checkpoint()
            self.write_metrics()
            raise TrainingInterrupted(self._path("checkpoint.pt"))
        return summary

    def _fit(self, stop_after_batches, sigint) -> Optional[dict]:
        """The loop of :meth:`fit`; None when interrupted by Ctrl-C (state consistent)."""
        cfg = self.config
        self.model.train()
        done_now = 0
        while self.epoch < cfg.max_epochs and not self.stopped_early:
            t0 = time.perf_counter()
            n_batches = len(self.order)
            bar = _progress(n_batches - self.step_in_epoch, f"epoch {self.epoch + 1}", self.progress and self.rank == 0)
            for batch in self.batches(self.epoch, skip=self.step_in_epoch):
                loss = self.train_batch(batch)
                self.step_in_epoch += 1
                done_now += 1
                bar.update(1)
                if not bar.disable and self.step_in_epoch % 25 == 0:  # reading the loss waits for the device
                    bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
                if cfg.save_every and self.step_in_epoch % cfg.save_every == 0 and self.step_in_epoch < n_batches:
                    self.save_checkpoint()
                if stop_after_batches is not None and done_now >= stop_after_batches:
                    bar.close()
                    self.save_checkpoint()
                    return self.summary()
                if sigint.hit:
                    bar.close()
                    return None
            bar.close()
            train_loss = self.epoch_loss_sum / max(1, n_batches)
            if self.world > 1:  # the mean over ranks, so every rank logs and stores the same history
                import torch.distributed as dist
                t = torch.tensor([train_loss], dtype=torch.float64, device=self.device)
                dist.all_reduce(t)
                train_loss = float(t) / self.world
            with warnings.catch_warnings():
                # After resuming at an epoch boundary no optimizer.step() has run in this process
                # yet, and torch warns about the (correct) order; the epoch's steps did happen.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                self.scheduler.step()
            t_train = time.perf_counter() - t0
            val = evaluate_model(self.model, self.data, "val", batch_size=cfg.eval_batch_size or cfg.batch_size,
                                 device=self.device, limit_batches=cfg.limit_batches, amp=cfg.amp,
                                 criterion=self.criterion, progress=self.progress, residual=cfg.residual,
                                 windows=self.windows)
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_loss_sum = 0.0
            improved = val["loss"] < self.best_val
            if improved:
                self.best_val, self.best_epoch, self.bad_epochs = val["loss"], self.epoch, 0
            else:
                self.bad_epochs += 1
                self.stopped_early = self.bad_epochs >= cfg.patience
            self.history.append({"epoch": self.epoch, "train_loss": train_loss, "val_loss": val["loss"],
                                 "val_mae": val["overall"]["MAE"], "lr": float(self.optimizer.param_groups[0]["lr"]),
                                 "batches_seen": self.batches_seen, "train_seconds": t_train,
                                 "epoch_seconds": time.perf_counter() - t0})
            self.log(f"epoch {self.epoch:3d}  train loss {train_loss:.4f}  val loss {val['loss']:.4f}  "
                     f"val MAE {val['overall']['MAE']:.3f}  lr {self.history[-1]['lr']:.1e}  "
                     f"{self.history[-1]['epoch_seconds']:.1f}s{'  *best*' if improved else ''}")
            if improved:
                self.save_best()
            self.save_checkpoint()
            self.write_metrics()
            if sigint.hit:
                return None
        if self.stopped_early:
            self.log(f"early stop: no validation improvement for {cfg.patience} epochs")
        return self.finish()

    def finish(self) -> dict:
        """Test the best model, write metrics.json and the loss curve; returns the summary."""
        cfg = self.config
        if self.best_state is not None:
            current = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.best_state)
        else:
            current = None
        test = evaluate_model(self.model, self.data, "test", batch_size=cfg.eval_batch_size or cfg.batch_size,
                              device=self.device, limit_batches=cfg.limit_batches, amp=cfg.amp,
                              progress=self.progress, residual=cfg.residual, windows=self.windows)
        self.test_metrics = test
        # the naive forecasts on exactly the windows the model was tested on
        n_test = len(self.data.splits["test"])
        if cfg.limit_batches:
            n_test = min(n_test, cfg.limit_batches * (cfg.eval_batch_size or cfg.batch_size))
        self.baselines = baseline_metrics(self.data, "test", max_windows=n_test)
        which = (f"best epoch {self.best_epoch}" if self.best_state is not None else
                 "the last model: no epoch had a finite validation loss")
        self.log(f"test ({which}): MAE {test['overall']['MAE']:.3f}  "
                 f"RMSE {test['overall']['RMSE']:.3f}  MAPE {test['overall']['MAPE']:.2f}%")
        self.write_metrics()
        self.plot_losses()
        self.plot_results(n_test)
        if current is not None:
            self.model.load_state_dict(current)
        return self.summary()

    # ------------------------------------------------------------------ state
    def counters(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "batches_seen": self.batches_seen,
                "epoch_loss_sum": self.epoch_loss_sum, "best_val": self.best_val, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early,
                "order_seed": self.order.seed, "world_size": self.world}

    def runtime(self) -> dict:
        """Where and how the run executes (not part of its definition, but a resumed run should
        match it: two threads instead of one made the small presets' epochs several times slower)."""
        return {"device": str(self.device), "threads": torch.get_num_threads(), "world_size": self.world}

    def _common(self) -> dict:
        return {"format": ckpt.FORMAT, "config": self.config.to_dict(), "data": self.data.checkpoint_meta(),
                "runtime": self.runtime()}

    def state_dict(self) -> dict:
        d = self._common()
        d.update(kind="latest", model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                 scheduler=ckpt.scheduler_state(self.scheduler), rng=ckpt.rng_state(), counters=self.counters(),
                 history=list(self.history))
        if self.best_state is not None:
            d["best_model"] = self.best_state
        return d

    def _match_lr_form(self) -> None:
        """A loaded optimizer state brings its learning rates in the form of the run that saved
        it; a captured step needs device tensors (changed in place by the scheduler), an eager
        one plain floats (a device tensor lr would make Adam's foreach path refuse to run)."""
        for group in self.optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if key in group:
                    value = float(group[key])
                    group[key] = torch.tensor(value, device=self.device) if self.captures else value

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._match_lr_form()
        ckpt.load_scheduler_state(self.scheduler, state["scheduler"])
        c = state["counters"]
        if c["world_size"] != self.world:
            raise ValueError(f"checkpoint was written by a run with {c['world_size']} process(es); this run has "
                             f"{self.world}: the batch order would differ")
        self.epoch, self.step_in_epoch, self.batches_seen = c["epoch"], c["step_in_epoch"], c["batches_seen"]
        self.epoch_loss_sum, self.best_val, self.best_epoch = c["epoch_loss_sum"], c["best_val"], c["best_epoch"]
        self.bad_epochs, self.stopped_early = c["bad_epochs"], c["stopped_early"]
        self.history = list(state["history"])
        self.best_state = state.get("best_model")
        ckpt.set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        path = self._path("checkpoint.pt")
        if path is not None and self.rank == 0:
            ckpt.atomic_save(self.state_dict(), path)

    def save_best(self) -> None:
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        path = self._path("best.pt")
        if path is not None and self.rank == 0:
            d = self._common()
            d.update(kind="best", model=self.best_state, epoch=self.epoch, val_loss=self.best_val)
            ckpt.atomic_save(d, path)

    @classmethod
    def resume(cls, path: str, data: TrafficData, *, device="cpu", out_dir: Optional[str] = None,
               progress: bool = True, log: Callable[[str], None] = print, **overrides) -> "Trainer":
        """Continue the run saved in ``path``. ``overrides`` may change ``max_epochs``,
        ``patience`` or ``limit_batches`` only, so the continued run stays the same run."""
        state = ckpt.load(path)
        if not ckpt.is_training_checkpoint(state) or state.get("kind") != "latest":
            raise ValueError(f"{path} is not a training checkpoint (checkpoint.pt) that can be resumed")
        config = TrainConfig.from_dict(state["config"])
        for k, v in overrides.items():
            if v is None:
                continue
            if k not in ("max_epochs", "patience", "limit_batches", "save_every"):
                raise ValueError(f"cannot change {k!r} when resuming; only max_epochs, patience, limit_batches")
            setattr(config, k, v)
        meta = state["data"]
        if meta["num_nodes"] != data.num_nodes:
            raise ValueError(f"{path} was trained on {meta['num_nodes']} nodes; the data has {data.num_nodes}")
        if not (math.isclose(meta["scaler_mean"], data.scaler.mean, rel_tol=1e-6)
                and math.isclose(meta["scaler_std"], data.scaler.std, rel_tol=1e-6)):
            raise ValueError(f"{path} was trained on different data (scaler mean/std {meta['scaler_mean']:.4f}/"
                             f"{meta['scaler_std']:.4f}, now {data.scaler.mean:.4f}/{data.scaler.std:.4f})")
        trainer = cls(data, config, device=device, out_dir=out_dir, progress=progress, log=log)
        trainer.load_state_dict(state)
        return trainer

    # ------------------------------------------------------------------ outputs
    def summary(self) -> dict:
        return {"config": self.config.to_dict(), "data": self.data.describe(), "runtime": self.runtime(),
                "counters": self.counters(),
                "history": self.history, "test": getattr(self, "test_metrics", None),
                "baselines": getattr(self, "baselines", None),
                "num_parameters": sum(p.numel() for p in self.model.parameters())}

    def write_metrics(self) -> None:
        path = self._path("metrics.json")
        if path is not None and self.rank == 0:
            outputs.write_metrics(path, self.summary())

    def plot_results(self, n_test: int) -> list:
        """forecast_vs_truth.png and error_by_horizon.png (best model, test part); needs matplotlib."""
        if self.out_dir is None or self.rank != 0 or not getattr(self, "baselines", None):
            return []
        return outputs.plot_results(self.out_dir, self.model, self.data, self.config, self.test_metrics,
                                    self.baselines, n_test, self.device)

    def plot_losses(self) -> Optional[str]:
        path = self._path("loss_curve.png")
        if path is None or self.rank != 0 or not self.history:
            return None
        return outputs.plot_losses(path, self.history, self.best_epoch, self.config.loss, self.data.name, self.log)
