"""The training loop of the paper on :class:`himnet_fast.HimNet`, resumable bit for bit.

One :class:`Trainer` owns the model, Adam, MultiStepLR, the batch order and the counters.
Per batch: forward with teacher forcing driven by ``batches_seen`` (the number of batches
trained before this one), inverse-scale the prediction, loss on raw values (masked MAE or
Huber), backward, clip the gradient norm to 5, step. Per epoch: the scheduler steps, the
validation loss (mean over batches, as the original) decides the best model and early
stopping. Under ``torchrun`` the model is wrapped in DistributedDataParallel and each rank
trains on its shard of every batch (see :class:`~himnet_fast.data.BatchOrder`).

Resuming: a checkpoint holds the model, optimizer, scheduler, every RNG state and the
counters, including how far into the current epoch training got; the epoch's batch order
is a function of (seed, epoch). A resumed run therefore continues exactly as the
uninterrupted one would have (bitwise on CPU; on GPU as far as the kernels are deterministic).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, List, Optional

import numpy as np
import torch

from ..data.sampler import BatchOrder
from ..data.series import TrafficData
from . import checkpoint as ckpt
from .baselines import baseline_metrics
from .protocol import MetricAccumulator, loss_fn, model_kwargs, training_preset


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

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # plain containers only

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def to_forecast(out: torch.Tensor, x: torch.Tensor, scaler, residual: bool = False) -> torch.Tensor:
    """Raw-unit forecast (B, T_out, N, 1) from the model's output ``out`` (same shape) and its
    input ``x`` (B, T_in, N, C) with ``x[..., 0]`` scaled.

    ``residual=False`` (the paper): ``out`` is the scaled signal. ``residual=True`` (the small
    CPU preset): ``out`` is the change from the last input step in units of the scaler's std,
    so an untrained model starts from the last-value forecast and a few minutes of training
    improve on it instead of first having to learn to copy its input.
    """
    if not residual:
        return scaler.inverse_transform(out.float())
    last = scaler.inverse_transform(x[:, -1, :, :1].float())          # (B, N, 1)
    return last[:, None] + out.float() * scaler.std


def teacher_labels(batch, scaler, residual: bool = False) -> torch.Tensor:
    """What the decoder is fed under teacher forcing: the targets in the model's output units."""
    if not residual:
        return batch.labels
    last = scaler.inverse_transform(batch.x[:, -1, :, :1].float())
    return (batch.target - last[:, None]) / scaler.std


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
def evaluate_model(model, data: TrafficData, split: str = "test", *, batch_size: int = 16, device="cpu",
                   limit_batches: Optional[int] = None, amp: bool = False, criterion: Optional[Callable] = None,
                   progress: bool = False, residual: bool = False) -> dict:
    """Masked MAE/RMSE/MAPE of ``model`` on a split, per horizon step and overall (raw units).

    Shards the windows over the ranks of an initialised process group (without padding, so
    every window counts once) and sums the statistics over the ranks. With ``criterion`` the
    result also has "loss": the mean of the per-batch losses, as the original's validation.
    """
    rank, world = _dist_info()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    order = BatchOrder(len(data.splits[split]), batch_size, shuffle=False, rank=rank, world_size=world, pad=False,
                       limit_batches=limit_batches)
    acc = MetricAccumulator(data.out_steps, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    bar = _progress(len(order), f"eval {split}", progress and rank == 0)
    for pos in order.batches(0):
        b = data.batch(split, pos).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(b.x, b.y_cov)
        pred = to_forecast(out, b.x, data.scaler, residual)
        acc.update(pred, b.target)
        if criterion is not None:
            loss_sum[0] += float(criterion(pred, b.target))
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
        if config.model.get("num_nodes", data.num_nodes) != data.num_nodes:
            # the preset's size is the benchmark's; a subset or synthetic stand-in has its own
            self.log(f"note: the preset has {config.model['num_nodes']} nodes, the data {data.num_nodes}: "
                     f"using {data.num_nodes}")
        config.model["num_nodes"] = data.num_nodes
        seed_everything(config.seed)
        if model is None:
            model = build_model(config.model, config.backend, data.in_steps, config.architecture, data)
            out_layer = getattr(model, _ZERO_INIT_OUTPUT.get(config.architecture, ""), None)
            if config.residual and isinstance(out_layer, torch.nn.Linear):
                # a zero output layer makes the untrained model exactly the last-value forecast,
                # so training starts from that baseline instead of from random changes
                with torch.no_grad():
                    out_layer.weight.zero_()
                    out_layer.bias.zero_()
        self.model = model.to(self.device)
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, eps=config.eps,
                                          weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=list(config.milestones),
                                                              gamma=config.gamma)
        self.criterion = loss_fn(config.loss)
        self.order = BatchOrder(len(data.splits["train"]), config.batch_size, shuffle=True, seed=config.seed,
                                rank=self.rank, world_size=self.world, pad=True, limit_batches=config.limit_batches)
        # counters: everything needed to continue exactly
        self.epoch = 0              # completed epochs
        self.step_in_epoch = 0      # batches of the current epoch already trained
        self.batches_seen = 0       # drives teacher forcing
        self.epoch_loss_sum = 0.0
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
    def train_batch(self, positions: np.ndarray) -> float:
        b = self.data.batch("train", positions).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp):
            out = self.net(b.x, b.y_cov, teacher_labels(b, self.data.scaler, self.config.residual), self.batches_seen)
        pred = to_forecast(out, b.x, self.data.scaler, self.config.residual)
        loss = self.criterion(pred, b.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        self.optimizer.step()
        self.batches_seen += 1
        return float(loss.detach())

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
            for pos in self.order.batches(self.epoch, skip=self.step_in_epoch):
                loss = self.train_batch(pos)
                self.epoch_loss_sum += loss
                self.step_in_epoch += 1
                done_now += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
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
                                 criterion=self.criterion, progress=self.progress, residual=cfg.residual)
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
                                 "val_mae": val["overall"]["MAE"], "lr": self.optimizer.param_groups[0]["lr"],
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
                              progress=self.progress, residual=cfg.residual)
        self.test_metrics = test
        # the naive forecasts on exactly the windows the model was tested on
        n_test = len(self.data.splits["test"])
        if cfg.limit_batches:
            n_test = min(n_test, cfg.limit_batches * (cfg.eval_batch_size or cfg.batch_size))
        self.baselines = baseline_metrics(self.data, "test", max_windows=n_test)
        self.log(f"test (best epoch {self.best_epoch}): MAE {test['overall']['MAE']:.3f}  "
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

    def _common(self) -> dict:
        return {"format": ckpt.FORMAT, "config": self.config.to_dict(),
                "data": {"name": self.data.name, "num_nodes": self.data.num_nodes, "in_steps": self.data.in_steps,
                         "out_steps": self.data.out_steps, "scaler_mean": self.data.scaler.mean,
                         "scaler_std": self.data.scaler.std}}

    def state_dict(self) -> dict:
        d = self._common()
        d.update(kind="latest", model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                 scheduler=ckpt.scheduler_state(self.scheduler), rng=ckpt.rng_state(), counters=self.counters(),
                 history=list(self.history))
        if self.best_state is not None:
            d["best_model"] = self.best_state
        return d

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
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
        return {"config": self.config.to_dict(), "data": self.data.describe(), "counters": self.counters(),
                "history": self.history, "test": getattr(self, "test_metrics", None),
                "baselines": getattr(self, "baselines", None),
                "num_parameters": sum(p.numel() for p in self.model.parameters())}

    def write_metrics(self) -> None:
        path = self._path("metrics.json")
        if path is None or self.rank != 0:
            return
        s = self.summary()
        s["counters"]["best_val"] = None if math.isinf(s["counters"]["best_val"]) else s["counters"]["best_val"]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(s, f, indent=1, allow_nan=True)
        os.replace(tmp, path)

    def plot_results(self, n_test: int) -> list:
        """forecast_vs_truth.png and error_by_horizon.png (best model, test part); needs matplotlib."""
        if self.out_dir is None or self.rank != 0 or not getattr(self, "baselines", None):
            return []
        from . import plots
        if plots._pyplot() is None:
            return []  # plot_losses already said that matplotlib is missing
        steps = [s for s in (3, 12) if s <= self.data.out_steps]
        pred = plots.predict_split(self.model, self.data, "test", steps=steps, device=self.device,
                                   batch_size=self.config.eval_batch_size or self.config.batch_size, max_windows=n_test,
                                   residual=self.config.residual)
        minutes = int(self.data.extra.get("step_minutes", 5))
        return [plots.plot_forecasts(pred, self.data, self._path("forecast_vs_truth.png"), steps=steps,
                                     title=model_label(self.config.architecture)),
                plots.plot_error_by_horizon(self.test_metrics, self.baselines, self._path("error_by_horizon.png"),
                                            step_minutes=minutes, dataset=self.data.name,
                                            title=model_label(self.config.architecture))]

    def plot_losses(self) -> Optional[str]:
        path = self._path("loss_curve.png")
        if path is None or self.rank != 0 or not self.history:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("matplotlib not installed: no plots (loss curve, forecasts, error by horizon); "
                     "pip install matplotlib, or the package's [train] extra")
            return None
        ep = [h["epoch"] for h in self.history]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ep, [h["train_loss"] for h in self.history], "-o", label="train")
        ax.plot(ep, [h["val_loss"] for h in self.history], "-o", label="validation")
        if self.best_epoch > 0:
            ax.axvline(self.best_epoch, color="gray", ls=":", label=f"best (epoch {self.best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{self.config.loss} loss (raw units)")
        ax.set_title(f"HimNet on {self.data.name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
