"""The runner behind ``himnet-fast bench`` and ``himnet-fast scale``.

It plans jobs (kernel x provider x graph size, and for the model one job per mode), skips the
providers that cannot run here with a reason row, runs every other job in its own process
(:mod:`himnet_fast.benchmark.worker`) under a memory limit and a time limit, and turns a
process killed by the OS into an "oom" row and one past its time limit into a "timeout" row,
so a sweep always finishes. Results go to a long-format CSV (rewritten after every job), a
markdown report and PNG plots in the output directory.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .schema import COLUMNS, make_row


@dataclass
class RunConfig:
    """Everything one ``bench``/``scale`` invocation measures.

    ``kind`` is "bench" (one graph size) or "scale" (a sweep over ``nodes``); ``what`` lists
    "himnet" and/or op names; ``modes`` are the model's modes (ops always run forward,
    backward and full).
    """

    kind: str
    preset: str
    nodes: List[int]
    batch_size: int
    device: str
    providers: List[str]
    what: List[str]
    modes: List[str]
    out: str
    repeats: int = 3
    warmup: int = 1
    memory_limit_gb: Optional[float] = None
    timeout_s: Optional[float] = None
    check: bool = True
    check_max_nodes: int = 1024
    check_nodes: int = 256
    threads: Optional[int] = None
    command: str = ""
    stem: str = field(default="")

    def __post_init__(self):
        if self.kind not in ("bench", "scale"):
            raise ValueError(f"kind must be 'bench' or 'scale', got {self.kind!r}")
        if not self.nodes or any(int(n) < 1 for n in self.nodes):
            raise ValueError(f"nodes must be a non-empty list of positive ints, got {self.nodes}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.stem:
            self.stem = f"{self.kind}_{self.preset}_{self.device}_b{self.batch_size}"


def plan(cfg: RunConfig) -> List[dict]:
    """Job specs in run order: per graph size, the model first, then the ops."""
    from . import providers as P

    jobs = []
    for n in cfg.nodes:
        for what in cfg.what:
            if what == P.MODEL:
                groups = [[m] for m in cfg.modes]   # a process per mode: separate memory peaks
            else:
                groups = [list(P.OP_MODES)]
            for provider in cfg.providers:
                if provider == "flex" and what == P.MODEL:
                    continue  # FlexAttention is a propagation kernel, not a model provider
                for modes in groups:
                    jobs.append(dict(what=what, provider=provider, modes=modes, preset=cfg.preset,
                                     num_nodes=int(n), batch_size=cfg.batch_size, device=cfg.device,
                                     repeats=cfg.repeats, warmup=cfg.warmup,
                                     memory_limit_gb=cfg.memory_limit_gb, check=cfg.check,
                                     check_max_nodes=cfg.check_max_nodes, check_nodes=cfg.check_nodes,
                                     threads=cfg.threads))
    return jobs


def _job_rows(job: dict, env: dict, preset_name: str, status: str, reason: str) -> List[dict]:
    return [make_row(kernel=job["what"], provider=job["provider"], mode=m, x_name="N", x=job["num_nodes"],
                     batch_size=job["batch_size"], preset=preset_name, status=status, reason=reason,
                     load_avg=os.getloadavg()[0], **env)
            for m in job["modes"]]


def run_job(job: dict, timeout_s: Optional[float], workdir: str) -> tuple:
    """Run one job in a fresh process. Returns (rows it wrote, return code, stderr tail,
    timed_out)."""
    tag = f"{job['what']}-{job['provider']}-{job['num_nodes']}-{'-'.join(job['modes'])}"
    spec_path = os.path.join(workdir, tag + ".json")
    out_path = os.path.join(workdir, tag + ".jsonl")
    err_path = os.path.join(workdir, tag + ".stderr")
    with open(spec_path, "w") as f:
        json.dump(job, f)
    if os.path.exists(out_path):
        os.remove(out_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "himnet_fast.benchmark.worker", spec_path, out_path]
    timed_out = False
    with open(err_path, "w") as err:
        # A new session, so a timeout can end the worker and whatever it started (compile
        # workers) by its process group, and nothing else.
        proc = subprocess.Popen(cmd, stdout=err, stderr=err, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    rows = []
    if os.path.exists(out_path):
        with open(out_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    with open(err_path) as f:
        tail = [line.rstrip() for line in f.read().splitlines() if line.strip()][-3:]
    return rows, rc, " | ".join(tail)[-400:], timed_out


def execute(cfg: RunConfig, log=print) -> "object":
    """Run every job of ``cfg``; write CSV, markdown and plots into ``cfg.out``. Returns the
    results as a pandas DataFrame."""
    import pandas as pd
    import torch

    from ..presets import get_preset
    from . import metrics, report
    from . import providers as P

    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, CUDA runtime {torch.version.cuda or 'none'})")
    preset = get_preset(cfg.preset)
    os.makedirs(cfg.out, exist_ok=True)
    env = metrics.environment(device)
    csv_path = os.path.join(cfg.out, cfg.stem + ".csv")
    rows: List[dict] = []
    jobs = plan(cfg)
    log(f"{cfg.kind}: {len(jobs)} jobs on {env['device']} -> {cfg.out}")
    with tempfile.TemporaryDirectory(prefix="himnet_bench_") as workdir:
        for i, job in enumerate(jobs, 1):
            label = f"[{i}/{len(jobs)}] {job['what']} {job['provider']} N={job['num_nodes']} {','.join(job['modes'])}"
            reason = P.unavailable_reason(job["provider"], device, job["what"])
            if reason:
                new = _job_rows(job, env, preset.name, "skipped", reason)
            else:
                t0 = time.perf_counter()
                new, rc, tail, timed_out = run_job(job, cfg.timeout_s, workdir)
                done = {r["mode"] for r in new}
                missing = dict(job, modes=[m for m in job["modes"] if m not in done])
                if missing["modes"]:
                    if timed_out:
                        status, why = "timeout", f"no result within --timeout-s {cfg.timeout_s:g}"
                    elif rc is not None and rc < 0 and -rc == signal.SIGKILL:
                        status, why = "oom", "worker killed by the OS (SIGKILL: out of memory)"
                    else:
                        status, why = "error", f"worker exited with code {rc}: {tail}"
                    new = new + _job_rows(missing, env, preset.name, status, why)
                label += f" ({time.perf_counter() - t0:.0f} s)"
            for r in new:
                rows.append(r)
                log(f"{label}: {_summary(r)}")
            pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(csv_path, index=False)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.to_csv(csv_path, index=False)
    md_path = report.write_markdown(df, os.path.join(cfg.out, cfg.stem + ".md"), cfg)
    try:
        pngs = report.write_plots(df, cfg.out, cfg.stem)
    except ImportError:  # a plain `pip install` has no matplotlib: keep the results, skip the plots
        pngs = []
        log("matplotlib not installed: no plots (pip install matplotlib, or the package's [bench] extra)")
    log(f"wrote {csv_path}, {md_path} and {len(pngs)} plots")
    return df


def _summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['mode']} {r['status']}: {r['reason']}"
    mem = "" if r["peak_mem_mb"] is None else f", peak +{r['peak_mem_mb']:.0f} MiB"
    return f"{r['mode']} p50 {r['p50']:.2f} ms{mem}"


def parse_list(text: str, what: str, allowed: Optional[Sequence[str]] = None) -> List[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}")
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise ValueError(f"{what}: unknown {bad}; expected some of {list(allowed)}")
    return items


def parse_nodes(text: str) -> List[int]:
    out = []
    for t in parse_list(text, "--nodes"):
        try:
            n = int(t.replace("_", ""))
        except ValueError:
            raise ValueError(f"--nodes must be comma-separated integers, got {t!r} in {text!r}") from None
        if n < 1:
            raise ValueError(f"--nodes entries must be >= 1, got {n}")
        out.append(n)
    return out
