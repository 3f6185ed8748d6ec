"""Checkpoints: atomic writes, RNG states as plain tensors, ``weights_only`` loading.

A checkpoint must never be able to run code, so it holds only tensors and primitive
containers and is always read with ``torch.load(..., weights_only=True)``. The RNG states
are converted accordingly: numpy's MT19937 state becomes a uint32 key tensor plus ints and a
float, Python's ``random`` state a list of ints.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict

import numpy as np
import torch

FORMAT = "himnet_fast.train/1"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the same directory, fsync it, then ``os.replace``.

    The rename is atomic on POSIX and Windows, so ``path`` holds either the previous complete
    file or the new complete file, whatever happens during the save (an exception, a full
    disk, a kill). The temp file is removed when the save fails.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 & ~umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # persist the rename itself (POSIX); directories cannot be opened on Windows
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load(path: str, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a clear error for a missing or unsafe file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise ValueError(f"{path}: refusing to load: it holds Python objects beyond tensors and primitive "
                             f"containers, which could run code ({str(exc).splitlines()[0]})") from exc
        raise ValueError(f"{path}: not a readable torch checkpoint ({exc})") from exc


def rng_state() -> Dict[str, Any]:
    """The torch (CPU and CUDA), numpy global and Python ``random`` states, as tensors/lists."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:  # a different number of GPUs: restore what matches
            for i, s in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)


def scheduler_state(scheduler) -> dict:
    """MultiStepLR's state with its ``Counter`` of milestones as a plain dict (weights_only
    loads plain containers only)."""
    state = dict(scheduler.state_dict())
    if "milestones" in state:
        state["milestones"] = {int(k): int(v) for k, v in state["milestones"].items()}
    return state


def load_scheduler_state(scheduler, state: dict) -> None:
    from collections import Counter

    state = dict(state)
    if "milestones" in state:
        state["milestones"] = Counter({int(k): int(v) for k, v in state["milestones"].items()})
    scheduler.load_state_dict(state)


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def is_raw_state_dict(obj: Any) -> bool:
    """A bare ``state_dict`` of the original model (or of himnet_fast.HimNet)."""
    return isinstance(obj, dict) and "node_embedding" in obj and all(isinstance(v, torch.Tensor) for v in obj.values())


def infer_model_config(state: dict, ycov_dim: int = 2) -> dict:
    """HimNet constructor arguments from a bare state_dict's shapes.

    ``node_embedding`` (N, D_s), ``tod_embedding.weight`` (288, D_tod), ``dow_embedding.weight``
    (7, D_dow), ``st_proj.weight`` (D_st, H), ``out_proj.weight`` (O, H); the decoder's first
    gate pool (D_st, K·(O + ycov + H), 2H) gives K, the encoder's (D_s, K·(C + H), 2H) gives C.
    ``ycov_dim`` cannot be told apart from K and is taken as given (HimNet uses 2).
    """
    need = ["node_embedding", "tod_embedding.weight", "dow_embedding.weight", "st_proj.weight", "out_proj.weight",
            "encoder_s.cells.0.gate.weights_pool", "decoder.cells.0.gate.weights_pool"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a HimNet state_dict: missing {missing}")
    n, d_s = state["node_embedding"].shape
    d_st, h = state["st_proj.weight"].shape
    o = state["out_proj.weight"].shape[0]
    dec_rows = state["decoder.cells.0.gate.weights_pool"].shape[1]
    enc_rows = state["encoder_s.cells.0.gate.weights_pool"].shape[1]
    k, rem = divmod(dec_rows, o + ycov_dim + h)
    if rem or k < 2 or enc_rows % k:
        raise ValueError(f"cannot infer cheb_k from decoder rows {dec_rows} (output {o} + ycov {ycov_dim} + hidden {h})")
    layers = len({key.split(".")[2] for key in state if key.startswith("encoder_s.cells.")})
    return dict(num_nodes=int(n), input_dim=int(enc_rows // k - h), output_dim=int(o), hidden_dim=int(h),
                num_layers=layers, cheb_k=int(k), ycov_dim=ycov_dim,
                tod_embedding_dim=int(state["tod_embedding.weight"].shape[1]),
                dow_embedding_dim=int(state["dow_embedding.weight"].shape[1]), node_embedding_dim=int(d_s),
                st_embedding_dim=int(d_st))
