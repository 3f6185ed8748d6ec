"""What a training run writes and prints: metrics.json, the loss curve, the forecast and
error-by-horizon plots, and the table of the model beside the naive baselines.

Each function takes what it reports explicitly; :class:`~himnet_fast.training.loop.Trainer`
calls the file writers on rank 0, the CLI prints :func:`comparison_table`. matplotlib is
optional: without it the plots are skipped and :func:`plot_losses` says so once.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, List, Optional

from .config import model_label


def write_metrics(path: str, summary: dict) -> None:
    """``summary`` (see ``Trainer.summary``) as JSON at ``path``, replaced atomically so a
    reader never sees half a file. An infinite best validation loss (no epoch finished yet)
    is written as null."""
    counters = summary["counters"]
    counters["best_val"] = None if math.isinf(counters["best_val"]) else counters["best_val"]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def plot_losses(path: str, history: List[dict], best_epoch: int, loss_name: str, dataset_name: str,
                log: Callable[[str], None]) -> Optional[str]:
    """loss_curve.png: training and validation loss per epoch, the best epoch marked; ``path``,
    or None without matplotlib (logged)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plots (loss curve, forecasts, error by horizon); "
            "pip install matplotlib, or the package's [train] extra")
        return None
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [h["train_loss"] for h in history], "-o", label="train")
    ax.plot(ep, [h["val_loss"] for h in history], "-o", label="validation")
    if best_epoch > 0:
        ax.axvline(best_epoch, color="gray", ls=":", label=f"best (epoch {best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{loss_name} loss (raw units)")
    ax.set_title(f"HimNet on {dataset_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_results(out_dir: str, model, data, config, test_metrics: dict, baselines: dict, n_test: int,
                 device) -> list:
    """forecast_vs_truth.png and error_by_horizon.png in ``out_dir`` for ``model`` on the first
    ``n_test`` test windows (``config``: the run's TrainConfig); [] without matplotlib."""
    from . import plots
    if plots._pyplot() is None:
        return []  # plot_losses already said that matplotlib is missing
    steps = [s for s in (3, 12) if s <= data.out_steps]
    pred = plots.predict_split(model, data, "test", steps=steps, device=device,
                               batch_size=config.eval_batch_size or config.batch_size, max_windows=n_test,
                               residual=config.residual)
    minutes = int(data.extra.get("step_minutes", 5))
    return [plots.plot_forecasts(pred, data, os.path.join(out_dir, "forecast_vs_truth.png"), steps=steps,
                                 title=model_label(config.architecture)),
            plots.plot_error_by_horizon(test_metrics, baselines, os.path.join(out_dir, "error_by_horizon.png"),
                                        step_minutes=minutes, dataset=data.name,
                                        title=model_label(config.architecture))]


def comparison_table(metrics: dict, baselines: dict, data, architecture: str = "himnet") -> str:
    """The model's masked metrics beside the naive baselines' (computed on the same windows) at
    the reported horizon steps, as printed after training and by ``evaluate``."""
    from ..data.series import REPORT_STEPS
    from .baselines import format_comparison

    return format_comparison(metrics, baselines, steps=REPORT_STEPS,
                             step_minutes=int(data.extra.get("step_minutes", 5)), model_name=model_label(architecture))
