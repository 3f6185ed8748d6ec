"""Training and evaluation of HimNet following the paper's protocol (docs/spec.md).

* :mod:`.protocol`: per-dataset presets, masked MAE / Huber losses, masked metrics.
* :mod:`.trainer`: :class:`Trainer` (Adam, MultiStepLR, clipping, early stopping, teacher
  forcing by ``batches_seen``, optional bf16 autocast, DDP under torchrun) and
  :func:`evaluate_model`.
* :mod:`.baselines`: last value and historical average, printed beside the model.
* :mod:`.plots`: forecast vs truth and error by horizon (written at the end of training).
* :mod:`.checkpoint`: atomic saves, RNG states as tensors, ``weights_only`` loading.
* :mod:`.interpret`: the paper's §5.6 meta-parameter analysis (export, PCA, similarity).
* :mod:`.cli`: the ``train`` and ``evaluate`` subcommands of ``himnet-fast``.
"""
from .protocol import MetricAccumulator, loss_fn, masked_mae_loss, training_preset
from .trainer import (TrainConfig, Trainer, TrainingInterrupted, build_model, evaluate_model, seed_everything,
                      teacher_labels, to_forecast)

__all__ = ["MetricAccumulator", "TrainConfig", "Trainer", "TrainingInterrupted", "build_model", "evaluate_model",
           "training_preset", "loss_fn", "masked_mae_loss", "seed_everything", "teacher_labels", "to_forecast"]
