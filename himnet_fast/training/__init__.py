"""Training and evaluation of HimNet following the paper's protocol (docs/spec.md).

* :mod:`.protocol`: per-dataset presets, masked MAE / Huber losses, masked metrics, the model's
  output units (:func:`to_forecast`, :func:`teacher_labels`).
* :mod:`.config`: :class:`TrainConfig` (stored in checkpoints as a plain dict),
  :func:`build_model`, :func:`seed_everything`.
* :mod:`.loop`: :class:`Trainer` (Adam, MultiStepLR, clipping, early stopping, teacher
  forcing by ``batches_seen``, optional bf16 autocast, batches gathered on the device, each step
  one captured CUDA graph on one GPU, DDP under torchrun, Ctrl-C saves) and
  :func:`evaluate_model`.
* :mod:`.captured`: :class:`~.captured.TrainStep` (one eager training step) and
  :class:`~.captured.CapturedTrainStep` (the same step recorded once as a CUDA graph and
  replayed; also ``himnet_fast.CapturedTrainStep``).
* :mod:`.outputs`: what a run writes (metrics.json, loss curve, forecast plots) and the table
  of the model beside the baselines.
* :mod:`.baselines`: last value and historical average, printed beside the model.
* :mod:`.plots`: forecast vs truth and error by horizon (written at the end of training).
* :mod:`himnet_fast.checkpoint` (at the package root, since ``HimNet.from_checkpoint`` reads it
  too): atomic saves, RNG states as tensors, ``weights_only`` loading.
* :mod:`.interpret`: the paper's §5.6 meta-parameter analysis (export, PCA, similarity).
* :mod:`.cli`: the ``train`` and ``evaluate`` subcommands of ``himnet-fast``.
"""
from .config import TrainConfig, build_model, seed_everything
from .loop import Trainer, TrainingInterrupted, evaluate_model
from .protocol import MetricAccumulator, loss_fn, masked_mae_loss, teacher_labels, to_forecast, training_preset

__all__ = ["MetricAccumulator", "TrainConfig", "Trainer", "TrainingInterrupted", "build_model", "evaluate_model",
           "training_preset", "loss_fn", "masked_mae_loss", "seed_everything", "teacher_labels", "to_forecast"]
