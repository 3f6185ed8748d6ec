"""One epoch of the trainer, as ``himnet-fast train`` runs it, against the same loop running the
original model.

Providers, each in its own process (peak memory is that run's alone):

* ``captured``: the trainer's default on a GPU, every step one CUDA graph (CapturedTrainStep);
* ``eager``: the same with ``--no-capture``;
* ``original``: the same loop (device batches, Adam, clipping, teacher forcing) with the
  original model (:class:`himnet_fast.reference.RefHimNet`, eager).

Data: synthetic series of PEMS07's shape (883 sensors; ``--steps`` 5-minute steps), the PEMS07
preset's model and batch size. Reported per provider: the epoch's training time (the batches
only: the first epoch's capture and warm-up are in ``first_batch_s``), seconds per batch, the
peak allocated GPU memory (peak RSS growth on CPU), and the epoch's mean training loss (the
three must agree closely: the same seed, data and draws).

    python bench/bench_train_epoch.py --device cuda --batches 200 --out bench/results/gpu-X/train_epoch
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

PROVIDERS = ("captured", "eager", "original")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(provider: str, device: str, steps: int, batches: int, nodes: int) -> dict:
    import torch

    from himnet_fast.data import load_dataset
    from himnet_fast.reference import RefHimNet
    from himnet_fast.training import TrainConfig, Trainer

    data = load_dataset("PEMS07", synthetic=True, num_steps=steps, num_nodes=nodes, seed=0)
    cfg = TrainConfig.from_preset("PEMS07", max_epochs=1, limit_batches=batches, capture=provider == "captured")
    cfg.model["num_nodes"] = data.num_nodes
    model = None
    if provider == "original":
        torch.manual_seed(cfg.seed)
        model = RefHimNet(**cfg.model)
    dev = torch.device(device)
    rss0 = _peak_rss_mib()
    tr = Trainer(data, cfg, device=dev, progress=False, log=lambda m: None, model=model)
    tr.model.train()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    batches_iter = iter(tr.batches(0))
    t0 = time.perf_counter()
    tr.train_batch(next(batches_iter))      # the first batch: captures (captured), warms up (all)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for batch in batches_iter:
        tr.train_batch(batch)
        n += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else _peak_rss_mib() - rss0
    return {"provider": provider, "device": device, "nodes": data.num_nodes, "batch_size": cfg.batch_size,
            "batches": n + 1, "first_batch_s": round(first, 4), "epoch_train_s": round(seconds, 3),
            "s_per_batch": round(seconds / max(n, 1), 5), "peak_mib": round(mem, 1),
            "mean_loss": round(tr.epoch_loss_sum / (n + 1), 6)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--steps", type=int, default=4000, help="synthetic 5-minute steps (default 4000)")
    p.add_argument("--nodes", type=int, default=883)
    p.add_argument("--batches", type=int, default=200, help="batches of the epoch (default 200)")
    p.add_argument("--out", default=None, help="folder for train_epoch.csv / .md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.device, a.steps, a.batches, a.nodes)))
        return 0
    rows = []
    for provider in a.providers.split(","):
        if provider not in PROVIDERS:
            p.error(f"--providers: {provider!r} is not one of {PROVIDERS}")
        cmd = [sys.executable, __file__, "--worker", provider, "--device", a.device, "--steps", str(a.steps),
               "--nodes", str(a.nodes), "--batches", str(a.batches)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"provider": provider, "device": a.device, "error": out.stderr.strip().splitlines()[-1:]})
            print(f"{provider}: failed: {out.stderr.strip()[-400:]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{provider}: {row['s_per_batch'] * 1e3:.1f} ms/batch, epoch {row['epoch_train_s']:.1f} s "
              f"({row['batches']} batches), first batch {row['first_batch_s']:.2f} s, peak {row['peak_mib']:.0f} MiB, "
              f"mean loss {row['mean_loss']}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        commit = os.environ.get("HIMNET_FAST_GIT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
        import torch
        meta = {"commit": commit, "torch": torch.__version__, "host": platform.node(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
        keys = sorted({k for r in rows for k in r} | set(meta))
        with open(os.path.join(a.out, "train_epoch.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({**meta, **r})
        with open(os.path.join(a.out, "train_epoch.md"), "w") as f:
            f.write(f"One epoch of the trainer ({a.batches} batches, PEMS07 shape, {a.nodes} nodes), "
                    f"{meta['gpu']}, torch {meta['torch']}, commit {commit}\n\n")
            f.write("| provider | ms / batch | epoch (s) | first batch (s) | peak MiB | mean loss |\n|---|---|---|---|---|---|\n")
            for r in rows:
                if "error" in r:
                    f.write(f"| {r['provider']} | failed: {r['error']} | | | | |\n")
                else:
                    f.write(f"| {r['provider']} | {r['s_per_batch'] * 1e3:.1f} | {r['epoch_train_s']:.1f} | "
                            f"{r['first_batch_s']:.2f} | {r['peak_mib']:.0f} | {r['mean_loss']} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
