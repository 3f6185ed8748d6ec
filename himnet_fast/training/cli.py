"""``himnet-fast train`` and ``himnet-fast evaluate``.

    himnet-fast train                                   # real PEMS08 sample (bundled), CPU, minutes
    himnet-fast train --dataset PEMS08 --data-dir data/ --device cuda
    himnet-fast train --dataset PEMS07 --synthetic --steps 2000 --epochs 1
    torchrun --nproc_per_node 4 -m himnet_fast train --dataset PEMS07 --data-dir data/
    himnet-fast train --resume runs/PEMS08_SAMPLE/checkpoint.pt
    himnet-fast evaluate --checkpoint runs/PEMS08_SAMPLE/best.pt [--export-meta DIR]
    himnet-fast evaluate --checkpoint original_state_dict.pt --dataset PEMS08 --data-dir data/

Heavy imports (torch, numpy) happen inside the handlers so ``himnet-fast info`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _add_data_args(p: argparse.ArgumentParser, dataset_default) -> None:
    p.add_argument("--dataset", default=dataset_default,
                   help="METRLA, PEMSBAY, PEMS03, PEMS04, PEMS07, PEMS08 or PEMS08_SAMPLE (the bundled real "
                        "sample, the default)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-dir", help="folder with data.npz + index.npz (HimNet format) or NAME.npz (raw PEMS), "
                                        "directly or in a NAME/ subfolder")
    src.add_argument("--synthetic", action="store_true", help="synthetic traffic of the dataset's shape")
    p.add_argument("--steps", type=int, help="synthetic: number of 5-minute steps (default: the dataset's)")
    p.add_argument("--nodes", type=int, help="synthetic: number of sensors (default: the dataset's)")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")
    p.add_argument("--limit-batches", type=int, help="at most K batches per epoch and per evaluation (smoke runs)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the preset's, 16)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--backend", help="himnet_fast backend: auto, torch, triton, cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_subcommands(sub) -> None:
    t = sub.add_parser("train", help="train HimNet with the paper's protocol",
                       description="Train HimNet with the paper's protocol (Adam, MultiStepLR, clipping, early "
                                   "stopping, teacher forcing). Writes OUT/checkpoint.pt (latest), OUT/best.pt, "
                                   "OUT/metrics.json and OUT/loss_curve.png. Under torchrun: DDP.")
    _add_data_args(t, None)
    t.add_argument("--epochs", type=int, help="maximum epochs (default: the preset's; 200 for the benchmarks)")
    t.add_argument("--out", help="output folder (default: runs/DATASET)")
    t.add_argument("--resume", metavar="FILE", help="continue the run saved in FILE (a checkpoint.pt)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--amp", action="store_true", help="bf16 autocast for the forward")
    t.add_argument("--hidden-dim", type=int, help="override the preset's hidden size")
    t.add_argument("--tf-decay-steps", type=int, help="override the preset's teacher-forcing decay")
    t.add_argument("--patience", type=int, help="early-stopping patience (default 20)")
    t.add_argument("--save-every", type=int, help="also write checkpoint.pt every K batches")
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


def _device(arg):
    import torch

    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    from ..data.series import load_dataset

    source = dict(source or {})
    if args.data_dir or args.synthetic:  # flags win over what a checkpoint remembers
        source = {"data_dir": args.data_dir, "synthetic": bool(args.synthetic), "num_steps": args.steps,
                  "num_nodes": args.nodes, "seed": args.data_seed}
    return load_dataset(name, **source), source


def _train(args) -> int:
    import torch

    from ..training.trainer import TrainConfig, Trainer

    device = _init_distributed(args.device)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    log = print if rank == 0 else (lambda msg: None)
    progress = not args.no_progress
    if args.resume:
        from . import checkpoint as ckpt
        state = ckpt.load(args.resume)
        if not ckpt.is_training_checkpoint(state):
            raise SystemExit(f"--resume {args.resume}: not a himnet_fast training checkpoint")
        cfg = state["config"]
        data, _ = _load_data(args, args.dataset or cfg["dataset"], cfg.get("data_source"))
        out = args.out or os.path.dirname(os.path.abspath(args.resume))
        trainer = Trainer.resume(args.resume, data, device=device, out_dir=out, progress=progress, log=log,
                                 max_epochs=args.epochs, patience=args.patience, limit_batches=args.limit_batches,
                                 save_every=args.save_every)
        log(f"resumed {args.resume}: epoch {trainer.epoch}, batch {trainer.step_in_epoch} of the next epoch, "
            f"{trainer.batches_seen} batches seen")
    else:
        name = args.dataset or "PEMS08_SAMPLE"
        data, source = _load_data(args, name)
        cfg = TrainConfig.from_preset(name, max_epochs=args.epochs, batch_size=args.batch_size,
                                      limit_batches=args.limit_batches, seed=args.seed, amp=args.amp or None,
                                      hidden_dim=args.hidden_dim, tf_decay_steps=args.tf_decay_steps,
                                      patience=args.patience, save_every=args.save_every, backend=args.backend,
                                      data_source=source)
        out = args.out or os.path.join("runs", data.name.split("(")[0])
        trainer = Trainer(data, cfg, device=device, out_dir=out, progress=progress, log=log)
    log(data.describe())
    log(f"model: {sum(p.numel() for p in trainer.model.parameters()):,} parameters {trainer.config.model}; "
        f"device {device}; {trainer.world} process(es); output {out}")
    summary = trainer.fit()
    if rank == 0 and summary.get("test"):
        from .protocol import format_metrics
        print(format_metrics(summary["test"]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _evaluate(args) -> int:
    import torch

    from . import checkpoint as ckpt
    from .protocol import format_metrics
    from .trainer import build_model, evaluate_model

    device = _device(args.device)
    state = ckpt.load(args.checkpoint)
    if ckpt.is_training_checkpoint(state):
        cfg = state["config"]
        name = args.dataset or cfg["dataset"]
        data, _ = _load_data(args, name, cfg.get("data_source"))
        model_cfg = dict(cfg["model"])
        weights = state["model"]
        batch = args.batch_size or cfg.get("eval_batch_size") or cfg["batch_size"]
        meta = state["data"]
        if abs(meta["scaler_mean"] - data.scaler.mean) > 1e-4 * max(1.0, abs(meta["scaler_mean"])):
            print(f"warning: the checkpoint was trained with scaler mean {meta['scaler_mean']:.4f}, this data gives "
                  f"{data.scaler.mean:.4f}: is it the same dataset?", file=sys.stderr)
    elif ckpt.is_raw_state_dict(state):
        # The original code saves a bare state_dict: the sizes come from its shapes, the data from flags.
        model_cfg = ckpt.infer_model_config(state)
        name = args.dataset or "PEMS08_SAMPLE"
        data, _ = _load_data(args, name)
        weights = state
        batch = args.batch_size or 16
    else:
        raise SystemExit(f"{args.checkpoint}: neither a himnet_fast checkpoint nor a HimNet state_dict")
    if model_cfg["num_nodes"] != data.num_nodes:
        raise SystemExit(f"{args.checkpoint} has {model_cfg['num_nodes']} nodes but {data.name} has {data.num_nodes}")
    model = build_model(model_cfg, args.backend).to(device)
    model.load_state_dict(weights, strict=True)
    print(data.describe())
    metrics = evaluate_model(model, data, args.split, batch_size=batch, device=device, limit_batches=args.limit_batches,
                             progress=not args.no_progress)
    print(f"{args.split} split, masked metrics (entries with true value 0 ignored):")
    print(format_metrics(metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    if args.export_meta:
        from .interpret import export_meta_parameters
        train_starts = data.splits["train"].starts
        node_mean = data.series[: train_starts[-1] + data.in_steps, :, 0].mean(0)
        paths = export_meta_parameters(model, args.export_meta, node_values=node_mean)
        print("meta-parameters: " + ", ".join(paths.values()))
    return 0
