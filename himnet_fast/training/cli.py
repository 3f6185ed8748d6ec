"""``himnet-fast train`` and ``himnet-fast evaluate``.

    himnet-fast train                                   # bundled Los-loop (real, complete), CPU, minutes
    himnet-fast train --data my_speeds.csv [--graph adj.csv] [--start-time "2024-01-01 00:00" --interval 5]
    himnet-fast train --dataset PEMS08 --data-dir data/ --device cuda
    himnet-fast train --dataset PEMS07 --synthetic --steps 2000 --epochs 1
    torchrun --nproc_per_node 4 -m himnet_fast train --dataset PEMS07 --data-dir data/
    himnet-fast train --resume runs/LOSLOOP/checkpoint.pt
    himnet-fast evaluate --checkpoint runs/LOSLOOP/best.pt [--export-meta DIR]
    himnet-fast evaluate --checkpoint original_state_dict.pt --dataset PEMS08 --data-dir data/

Heavy imports (torch, numpy) happen inside the handlers so ``himnet-fast info`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from .._argtypes import POSITIVE as _POSITIVE, SEED as _SEED, positive_float as _positive_float


def _interval(text: str) -> int:
    """argparse type: minutes between steps, dividing a day (the time-of-day slots need it)."""
    value = _POSITIVE(text)
    if 1440 % value:
        raise argparse.ArgumentTypeError(f"expected a number of minutes dividing a day (1440), got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser, dataset_default) -> None:
    p.add_argument("--dataset", default=dataset_default,
                   help="LOSLOOP (bundled, the default: complete real Los-loop, T-GCN protocol), PEMS08_SAMPLE "
                        "(bundled), or METRLA, PEMSBAY, PEMS03, PEMS04, PEMS07, PEMS08 with --data-dir")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-dir", help="folder with data.npz + index.npz (HimNet format) or NAME.npz (raw PEMS), "
                                        "directly or in a NAME/ subfolder")
    src.add_argument("--synthetic", action="store_true", help="synthetic traffic of the dataset's shape")
    src.add_argument("--data", metavar="PATH",
                     help="your own T x N series (one column per sensor): .csv, .parquet, .npy, .npz or .h5 "
                          "(DCRNN metr-la.h5 layout); optional timestamp column; NaN or 0 = missing (masked)")
    p.add_argument("--graph", metavar="PATH", help="--data: optional N x N graph (CSV or .npy), checked and kept")
    p.add_argument("--start-time", help="--data without timestamps: time of the first step, 'YYYY-MM-DD HH:MM' "
                                        "(default 2000-01-03 00:00, a Monday)")
    p.add_argument("--interval", type=_interval, help="--data without timestamps: minutes between steps (default 5)")
    p.add_argument("--protocol", choices=("tgcn", "himnet"),
                   help="--data: tgcn (default: train on the first 70%% of steps, validate on the next 10%%, test "
                        "on the last 20%%) or himnet (windows split 7:1:2)")
    p.add_argument("--steps", type=_POSITIVE, help="synthetic: number of 5-minute steps (default: the dataset's)")
    p.add_argument("--nodes", type=_POSITIVE, help="synthetic: number of sensors (default: the dataset's)")
    p.add_argument("--data-seed", type=_SEED, default=0, help="synthetic: generator seed")
    p.add_argument("--limit-batches", type=_POSITIVE,
                   help="at most K batches per epoch and per evaluation (smoke runs)")
    p.add_argument("--batch-size", type=_POSITIVE, help="batch size (default: the preset's, 16)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--backend", help="himnet_fast backend: auto, torch, triton, cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--threads", type=_POSITIVE,
                   help="CPU threads for torch (default: 1 for LOSLOOP, PEMS08_SAMPLE and --data, whose small "
                        "models gain little from more and lose several times on a busy machine; else torch's)")


def add_subcommands(sub) -> None:
    t = sub.add_parser("train", help="train HimNet with the paper's protocol",
                       description="Train HimNet with the paper's protocol (Adam, MultiStepLR, clipping, early "
                                   "stopping, teacher forcing). Writes OUT/checkpoint.pt (latest), OUT/best.pt, "
                                   "OUT/metrics.json and OUT/loss_curve.png. Under torchrun: DDP.")
    _add_data_args(t, None)
    t.add_argument("--epochs", type=_POSITIVE, help="maximum epochs (default: the preset's; 200 for the benchmarks)")
    t.add_argument("--out", help="output folder (default: runs/DATASET); an existing run is not overwritten "
                                 "unless --overwrite")
    t.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one")
    t.add_argument("--resume", metavar="FILE", help="continue the run saved in FILE (a checkpoint.pt, or its folder)")
    t.add_argument("--seed", type=_SEED, help="seed of the weights, batch order and teacher forcing (default 0)")
    t.add_argument("--amp", action="store_true", help="bf16 autocast for the forward")
    t.add_argument("--no-capture", action="store_true",
                   help="on a GPU, run every training step eagerly instead of replaying it as one captured CUDA "
                        "graph (the default there; CPU runs are always eager)")
    t.add_argument("--model", choices=("himnet", "agcrn", "hyperst-lstm-g", "hyperst-lstm-d", "hyperst-gcgru", "sba"),
                   help="which forecaster to train (default himnet; the others are in himnet_fast.models and "
                        "use the signal channel; the HyperST models need sensor coordinates and a graph, sba a graph)")
    t.add_argument("--hidden-dim", type=_POSITIVE, help="override the preset's hidden size")
    t.add_argument("--lr", type=_positive_float, help="override the preset's learning rate")
    t.add_argument("--tf-decay-steps", type=_POSITIVE, help="override the preset's teacher-forcing decay")
    t.add_argument("--patience", type=_POSITIVE, help="early-stopping patience (default 20)")
    t.add_argument("--save-every", type=_POSITIVE, help="also write checkpoint.pt every K batches")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="masked MAE/RMSE/MAPE per horizon of a checkpoint",
                       description="Evaluate a himnet_fast checkpoint (best.pt / checkpoint.pt) or a raw state_dict "
                                   "of the original HimNet (then give the data with --dataset/--data-dir).")
    e.add_argument("--checkpoint", required=True, metavar="FILE")
    _add_data_args(e, None)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    e.add_argument("--export-meta", metavar="DIR", help="export the meta-parameters and their plots (paper §5.6)")
    e.set_defaults(func=_evaluate)


class UserError(Exception):
    """A mistake in the command line or the files it names: reported in one line, exit status 2."""


def _device(arg):
    import torch

    if not arg:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise UserError(f"--device {arg!r}: expected cpu, cuda or cuda:K") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if not torch.version.cuda else "no CUDA device is visible"
            raise UserError(f"--device {arg}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {arg}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"--device {arg!r}: expected cpu, cuda or cuda:K")
    return device


def _check_backend(name, device):
    """Fail now, in one line, rather than at the first op of the first batch."""
    if name is None:
        return
    from .. import _backend

    try:
        b = _backend.normalize_backend(name)
    except ValueError as exc:
        raise UserError(f"--backend {name!r}: {exc}") from None
    if b is not None and b not in _backend.available_backends(device):
        report = _backend.backend_report() if device.type == ("cuda" if __import__("torch").cuda.is_available()
                                                              else "cpu") else {}
        why = report.get(b, f"not available on {device}")
        raise UserError(f"--backend {name}: cannot run on {device}: {why} "
                        f"(available: {', '.join(_backend.available_backends(device))})")


def _init_distributed(device_arg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (NCCL on GPUs, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _device(device_arg)
    device = _device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _load_data(args, name, source=None):
    """(TrafficData, source dict stored in the checkpoint to load the same data again)."""
    from ..data.catalog import load_dataset

    source = dict(source or {})
    if args.data:
        source = {"data_path": os.path.abspath(args.data), "graph": args.graph and os.path.abspath(args.graph),
                  "start": args.start_time, "interval_minutes": args.interval, "protocol": args.protocol or "tgcn"}
    elif args.data_dir or args.synthetic:  # flags win over what a checkpoint remembers
        source = {"data_dir": args.data_dir, "synthetic": bool(args.synthetic), "num_steps": args.steps,
                  "num_nodes": args.nodes, "seed": args.data_seed}
    elif args.graph or args.start_time or args.interval or args.protocol:
        raise UserError("--graph, --start-time, --interval and --protocol go with --data PATH")
    if "data_path" in source:
        from ..data.files import load_series_file
        if not os.path.exists(source["data_path"]):
            raise UserError(f"--data {source['data_path']}: no such file")
        return load_series_file(source["data_path"], start=source.get("start"),
                                interval_minutes=source.get("interval_minutes"), graph=source.get("graph"),
                                protocol=source.get("protocol", "tgcn")), source
    if source.get("data_dir") and not os.path.isdir(source["data_dir"]):
        raise UserError(f"--data-dir {source['data_dir']}: no such folder")
    return load_dataset(name, **source), source


RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.json", "loss_curve.png", "forecast_vs_truth.png",
             "error_by_horizon.png")


def _existing_run(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in ("checkpoint.pt", "best.pt", "metrics.json"))


def _clear_run(folder: str) -> None:
    """--overwrite: remove the previous run's files (only those a run writes), so none of them
    is left to be mistaken for the new run's."""
    for f in RUN_FILES:
        path = os.path.join(folder, f)
        if os.path.isfile(path):
            os.remove(path)


def _resume_path(arg: str) -> str:
    path = os.path.join(arg, "checkpoint.pt") if os.path.isdir(arg) else arg
    if not os.path.isfile(path):
        raise UserError(f"--resume {arg}: no such checkpoint file")
    return path


def _print_comparison(summary, data, architecture: str = "himnet") -> None:
    from .outputs import comparison_table

    print(f"test, masked metrics{' (' + data.extra['units'] + ')' if data.extra.get('units') else ''}; "
          f"baselines on the same windows:")
    print(comparison_table(summary["test"], summary["baselines"], data, architecture))


# Small models on small data: more threads gain little and lost several times per batch on a
# busy machine (measured), so these runs default to one.
_ONE_THREAD = ("LOSLOOP", "PEMS08_SAMPLE", "custom")


def _set_threads(args, device, dataset: str, recorded: Optional[int] = None) -> None:
    """--threads if given, else the thread count ``recorded`` in the checkpoint a run continues,
    else one thread for the small CPU runs (``dataset`` in _ONE_THREAD) and torch's default otherwise."""
    import torch

    from ..data.series import canonical_name

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif recorded is not None:
        torch.set_num_threads(int(recorded))
    elif device.type == "cpu":
        try:
            dataset = "custom" if dataset == "custom" else canonical_name(dataset)
        except ValueError:
            return  # an unknown name is reported when the data are loaded
        if dataset in _ONE_THREAD:
            torch.set_num_threads(1)


def _canonical(name: str) -> str:
    from ..data.series import canonical_name

    try:
        return canonical_name(name)
    except ValueError as exc:
        raise UserError(f"--dataset: {exc}") from None


def build_trainer(data, config, **kwargs):
    """The one place the CLI builds a model and its trainer (``config.model`` holds the
    HimNet constructor arguments); a model choice plugs in here."""
    from .loop import Trainer

    try:
        return Trainer(data, config, **kwargs)
    except ValueError as exc:   # a model that cannot be built for this data (e.g. no coordinates)
        raise UserError(str(exc)) from exc


# Settings that define a run: a resumed run takes them from its checkpoint, so the flags are refused.
_RUN_SETTINGS = (("batch_size", "--batch-size"), ("lr", "--lr"), ("hidden_dim", "--hidden-dim"),
                 ("tf_decay_steps", "--tf-decay-steps"), ("seed", "--seed"), ("amp", "--amp"), ("model", "--model"),
                 ("backend", "--backend"), ("no_capture", "--no-capture"))


def _resume_device(args, path: str, runtime: dict):
    """--device if given, else the device the run used (recorded in its checkpoint)."""
    if args.device or not runtime.get("device"):
        return _init_distributed(args.device)
    try:
        return _init_distributed(runtime["device"])
    except UserError as exc:
        raise UserError(f"--resume {path}: the run trained on {runtime['device']}, which is not available here "
                        f"({str(exc).split(': ', 1)[-1]}); pass --device to continue elsewhere") from None


def _train(args) -> int:
    import torch

    from .config import TrainConfig
    from .loop import Trainer, TrainingInterrupted

    state = None
    if args.resume:
        from .. import checkpoint as ckpt
        path = _resume_path(args.resume)
        state = ckpt.load(path)
        if not ckpt.is_training_checkpoint(state) or state.get("kind") != "latest":
            raise UserError(f"--resume {path}: not a resumable himnet_fast training checkpoint (checkpoint.pt)")
        given = [flag for key, flag in _RUN_SETTINGS if getattr(args, key) not in (None, False)]
        if given:
            raise UserError(f"--resume continues the run with the settings in its checkpoint; {', '.join(given)} "
                            f"cannot change (allowed: --epochs, --patience, --limit-batches, --save-every, --out, "
                            f"--device, --threads)")
        runtime = dict(state.get("runtime") or {})
        device = _resume_device(args, path, runtime)
        # the run's own thread count; a checkpoint from before it was recorded gets the rule a fresh
        # run of its dataset follows, which is what that run used unless --threads was given
        _set_threads(args, device, state["config"]["dataset"], runtime.get("threads"))
    else:
        device = _init_distributed(args.device)
        _check_backend(args.backend, device)
        _set_threads(args, device, "custom" if args.data else (args.dataset or "LOSLOOP"))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    log = print if rank == 0 else (lambda msg: None)
    progress = not args.no_progress
    if state is not None:
        cfg = state["config"]
        data, _ = _load_data(args, args.dataset or cfg["dataset"], cfg.get("data_source"))
        out = args.out or os.path.dirname(os.path.abspath(path))
        same = os.path.abspath(out) == os.path.dirname(os.path.abspath(path))
        if not same and _existing_run(out) and not args.overwrite:
            raise UserError(f"--out {out} already holds another run; pick a new folder or add --overwrite")
        os.makedirs(out, exist_ok=True)
        if not same and args.overwrite:
            _clear_run(out)
        trainer = Trainer.resume(path, data, device=device, out_dir=out, progress=progress, log=log,
                                 max_epochs=args.epochs, patience=args.patience, limit_batches=args.limit_batches,
                                 save_every=args.save_every)
        log(f"resumed {path}: epoch {trainer.epoch}, batch {trainer.step_in_epoch} of the next epoch, "
            f"{trainer.batches_seen} batches seen")
    else:
        name = "custom" if args.data else (args.dataset or "LOSLOOP")
        out = args.out or os.path.join("runs", "custom" if args.data else _canonical(name))
        if _existing_run(out) and not args.overwrite:
            ck = os.path.join(out, "checkpoint.pt")
            resume = f"continue it with --resume {ck}, " if os.path.isfile(ck) else ""
            raise UserError(f"--out {out} already holds a run: {resume}replace it with --overwrite, "
                            f"or pick another --out")
        data, source = _load_data(args, name)
        cfg = TrainConfig.from_preset(name, max_epochs=args.epochs, batch_size=args.batch_size,
                                      limit_batches=args.limit_batches, seed=args.seed, amp=args.amp or None,
                                      hidden_dim=args.hidden_dim, tf_decay_steps=args.tf_decay_steps, lr=args.lr,
                                      patience=args.patience, save_every=args.save_every, backend=args.backend,
                                      data_source=source, architecture=args.model,
                                      capture=False if args.no_capture else None)
        os.makedirs(out, exist_ok=True)
        if args.overwrite:
            _clear_run(out)
        trainer = build_trainer(data, cfg, device=device, out_dir=out, progress=progress, log=log)
    log(data.describe())
    from .config import model_label
    sizes = (trainer.config.model if trainer.config.architecture == "himnet"
             else {"hidden_dim": trainer.config.model.get("hidden_dim")})
    log(f"model: {model_label(trainer.config.architecture)}, "
        f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters {sizes}"
        f"{' (predicts the change from the last observed value)' if trainer.config.residual else ''}; "
        f"device {device}{' (each step one captured CUDA graph)' if trainer.captures else ''}, "
        f"{torch.get_num_threads()} thread(s); {trainer.world} process(es); output {out}")
    try:
        summary = trainer.fit()
    except TrainingInterrupted as exc:
        if rank == 0:
            print(f"interrupted: the run is saved in {exc.path}; continue it with\n"
                  f"  himnet-fast train --resume {exc.path}", file=sys.stderr)
        return 130
    if rank == 0 and summary.get("test"):
        _print_comparison(summary, data, trainer.config.architecture)
        written = [f for f in RUN_FILES if os.path.isfile(os.path.join(out, f))]
        print(f"outputs in {out}: {', '.join(written)}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _evaluate(args) -> int:
    from .. import checkpoint as ckpt
    from .protocol import format_metrics
    from .config import build_model
    from .loop import evaluate_model
    from .outputs import comparison_table

    device = _device(args.device)
    _check_backend(args.backend, device)
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    state = ckpt.load(args.checkpoint)
    name = args.dataset or (state["config"]["dataset"] if ckpt.is_training_checkpoint(state) else "LOSLOOP")
    _set_threads(args, device, "custom" if args.data else name)
    if ckpt.is_training_checkpoint(state):
        cfg = state["config"]
        name = args.dataset or cfg["dataset"]
        data, _ = _load_data(args, name, cfg.get("data_source"))
        model_cfg = dict(cfg["model"])
        architecture = cfg.get("architecture", "himnet")
        weights = state["model"]
        residual = bool(cfg.get("residual", False))
        batch = args.batch_size or cfg.get("eval_batch_size") or cfg["batch_size"]
        meta = state["data"]
        if abs(meta["scaler_mean"] - data.scaler.mean) > 1e-4 * max(1.0, abs(meta["scaler_mean"])):
            print(f"warning: the checkpoint was trained with scaler mean {meta['scaler_mean']:.4f}, this data gives "
                  f"{data.scaler.mean:.4f}: is it the same dataset?", file=sys.stderr)
    elif ckpt.is_raw_state_dict(state):
        # The original code saves a bare state_dict: the sizes come from its shapes, the data from flags.
        model_cfg = ckpt.infer_model_config(state)
        name = args.dataset or "LOSLOOP"
        data, _ = _load_data(args, name)
        weights = state
        architecture = "himnet"
        residual = False
        batch = args.batch_size or 16
    else:
        raise UserError(f"{args.checkpoint}: neither a himnet_fast checkpoint nor a HimNet state_dict")
    if model_cfg["num_nodes"] != data.num_nodes:
        raise UserError(f"{args.checkpoint} has {model_cfg['num_nodes']} nodes but {data.name} has {data.num_nodes}")
    try:
        model = build_model(model_cfg, args.backend, architecture=architecture, data=data).to(device)
    except ValueError as exc:
        raise UserError(f"{args.checkpoint}: {exc}") from exc
    model.load_state_dict(weights, strict=True)
    print(data.describe())
    metrics = evaluate_model(model, data, args.split, batch_size=batch, device=device, limit_batches=args.limit_batches,
                             residual=residual,
                             progress=not args.no_progress)
    print(f"{args.split} split, masked metrics (entries with true value 0 ignored):")
    print(format_metrics(metrics))
    from .baselines import baseline_metrics
    n = len(data.splits[args.split]) if not args.limit_batches else min(len(data.splits[args.split]),
                                                                        args.limit_batches * batch)
    print("beside the baselines (same windows):")
    print(comparison_table(metrics, baseline_metrics(data, args.split, max_windows=n), data, architecture))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    if args.export_meta:
        from .interpret import export_meta_parameters
        train_starts = data.splits["train"].starts
        node_mean = data.input_signal[: train_starts[-1] + data.in_steps].mean(0)
        paths = export_meta_parameters(model, args.export_meta, node_values=node_mean)
        print("meta-parameters: " + ", ".join(paths.values()))
    return 0
