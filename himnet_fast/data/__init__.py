"""Data for training and evaluating HimNet: loaders (HimNet ``data.npz``/``index.npz`` and raw
``PEMS0X.npz``), lazily gathered windows, the training-set scaler, a deterministic sharded batch
order and a synthetic traffic generator.

Every loader returns a :class:`TrafficData`: the series ``(T, N, 3)`` float32 (signal, time of
day in [0, 1), day of week 0..6; 0 where a reading is missing), the window start indices of each
split, and the :class:`StandardScaler` fitted on the training inputs. Windows are never
materialised: a batch gathers its ``(B, 12, N, 3)`` inputs from the series when it is drawn, with
missing readings carried forward where the data ask for it (``fill_missing``).
:class:`~himnet_fast.data.device.DeviceWindows` holds the same series on the training device and
gathers the same batches there (the trainer's and the evaluation's batches: no host-to-device
copy per step), checking the time features once for the whole series.

:func:`forecast` (``HimNet.forecast``) turns raw readings and their timestamps into a forecast in
the same units; :func:`to_forecast` converts a model's output to raw units.

Modules import downward only: ``series`` (the core) <- ``files``, ``synthetic``, ``bundled``,
``sampler``, ``forecast`` <- ``catalog`` (:func:`load_dataset`), and ``device`` imports ``series``
only; nothing here imports the model, training or ``himnet_fast.datasets`` (which re-exports
:mod:`.bundled`).
"""
from .series import (DATASET_INFO, Batch, StandardScaler, TrafficData, WindowSplit, carry_forward, load_himnet_dir,
                     load_pems_npz, split_windows, time_features, traffic_data)
from .sampler import BatchOrder
from .synthetic import synthetic_traffic
from .catalog import load_dataset
from .forecast import Forecast, forecast, to_forecast

__all__ = ["DATASET_INFO", "Batch", "BatchOrder", "Forecast", "StandardScaler", "TrafficData", "WindowSplit",
           "carry_forward", "forecast", "load_dataset", "load_himnet_dir", "load_pems_npz", "split_windows",
           "synthetic_traffic", "time_features", "to_forecast", "traffic_data"]
