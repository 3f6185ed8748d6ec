"""Meta-parameter analysis of a trained HimNet (the paper's §5.6).

HimNet generates its graph-convolution parameters from a query: the temporal encoder's
query is ``cat(tod_embedding[slot], dow_embedding[day])`` (one per 5-minute slot and day of
week), the spatial encoder's is the node's row of ``node_embedding``. This module exports
those queries and the parameters they generate, projects them to 2-D (PCA through an SVD of
the centred matrix: exact and deterministic, no sklearn) and plots:

* ``temporal_pca.png``: the 7 x 288 temporal queries, coloured by hour, weekends marked;
* ``spatial_pca.png``: the node embeddings (coloured by each node's mean signal if given);
* ``hourly_similarity.png``: cosine similarity, hour against hour, of the temporal
  encoder's generated parameters (gate and update weights and biases of its first cell)
  for a weekday (Monday) and a weekend day (Sunday).

Everything is also saved in ``meta_parameters.npz``. Use it from the command line as
``himnet-fast evaluate --checkpoint best.pt --export-meta DIR`` or call
:func:`export_meta_parameters`.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, 2): projection on the two leading principal axes (SVD of the centred
    matrix; the sign of each axis is fixed so its largest loading is positive)."""
    x = x.double()
    xc = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    v = vh[:2].T if vh.shape[0] >= 2 else torch.cat([vh.T, torch.zeros_like(vh.T)], 1)
    sign = torch.sign(v[v.abs().argmax(0), torch.arange(v.shape[1])])
    return (xc @ (v * torch.where(sign == 0, torch.ones_like(sign), sign))).float()


def temporal_queries(model) -> torch.Tensor:
    """(7, 288, D_tod + D_dow): the T-axis query of every (day of week, 5-minute slot)."""
    tod = model.tod_embedding.weight.detach()             # (288, D_tod)
    dow = model.dow_embedding.weight.detach()             # (7, D_dow)
    return torch.cat([tod[None].expand(dow.shape[0], -1, -1),
                      dow[:, None].expand(-1, tod.shape[0], -1)], dim=-1)


def generated_parameters(query: torch.Tensor, cell) -> torch.Tensor:
    """(M, D) queries -> (M, P): the flattened gate and update weights and biases a GCRU cell
    generates from each query (``W = Σ_d q_d · weights_pool[d]``, ``b = q @ bias_pool``)."""
    parts = []
    for gcn in (cell.gate, cell.update):
        parts.append(query @ gcn.weights_pool.detach().reshape(gcn.weights_pool.shape[0], -1))
        if getattr(gcn, "bias_pool", None) is not None:
            parts.append(query @ gcn.bias_pool.detach())
    return torch.cat(parts, dim=-1)


def cosine_matrix(v: torch.Tensor) -> torch.Tensor:
    """(M, P) -> (M, M) cosine similarity."""
    v = torch.nn.functional.normalize(v.double(), dim=-1)
    return (v @ v.T).float()


@torch.no_grad()
def meta_parameters(model) -> dict:
    """The arrays of the analysis (numpy): ``temporal_query`` (7, 288, D_t),
    ``temporal_pca`` (7, 288, 2), ``node_embedding`` (N, D_s), ``spatial_pca`` (N, 2),
    ``hourly_params`` (7, 24, P) (temporal encoder, first cell, at each full hour) and
    ``hourly_similarity`` (7, 24, 24)."""
    q = temporal_queries(model).float().cpu()
    days, slots, d = q.shape
    t_pca = pca_2d(q.reshape(-1, d)).reshape(days, slots, 2)
    e = model.node_embedding.detach().float().cpu()
    hourly_q = q[:, ::12]                                  # (7, 24, D_t): slot 12·h is hh:00
    cell = model.encoder_t.cells[0]
    params = generated_parameters(hourly_q.reshape(-1, d), _cpu_cell(cell)).reshape(days, 24, -1)
    sim = torch.stack([cosine_matrix(params[i]) for i in range(days)])
    return {"temporal_query": q.numpy(), "temporal_pca": t_pca.numpy(), "node_embedding": e.numpy(),
            "spatial_pca": pca_2d(e).numpy(), "hourly_params": params.numpy(), "hourly_similarity": sim.numpy()}


def _cpu_cell(cell):
    class _G:  # a view of the pools on the CPU in float32, whatever the model's device/dtype
        def __init__(self, gcn):
            self.weights_pool = gcn.weights_pool.detach().float().cpu()
            bp = getattr(gcn, "bias_pool", None)
            self.bias_pool = None if bp is None else bp.detach().float().cpu()

    class _C:
        def __init__(self, c):
            self.gate, self.update = _G(c.gate), _G(c.update)

    return _C(cell)


def export_meta_parameters(model, out_dir: str, *, node_values: Optional[np.ndarray] = None,
                           plot: bool = True) -> dict:
    """Write ``meta_parameters.npz`` and (if matplotlib is installed and ``plot``) the three
    PNGs to ``out_dir``. ``node_values`` (N,) colours the spatial plot (e.g. mean flow).
    Returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    arrays = meta_parameters(model)
    if node_values is not None:
        node_values = np.asarray(node_values, dtype=np.float32)
        if node_values.shape != (arrays["node_embedding"].shape[0],):
            raise ValueError(f"node_values must have shape (N={arrays['node_embedding'].shape[0]},), "
                             f"got {node_values.shape}")
        arrays["node_values"] = node_values
    paths = {"npz": os.path.join(out_dir, "meta_parameters.npz")}
    np.savez_compressed(paths["npz"], **arrays)
    if not plot:
        return paths
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths

    tp = arrays["temporal_pca"]
    hours = np.arange(288) / 12.0
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for day in range(7):
        sc = ax.scatter(tp[day, :, 0], tp[day, :, 1], c=hours, cmap="twilight", s=8,
                        marker="^" if day >= 5 else "o", vmin=0, vmax=24)
    fig.colorbar(sc, ax=ax, label="hour of day")
    ax.set_title("Temporal meta-parameter queries (PCA); ^ = weekend")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    paths["temporal_pca"] = os.path.join(out_dir, "temporal_pca.png")
    fig.savefig(paths["temporal_pca"], dpi=100)
    plt.close(fig)

    sp = arrays["spatial_pca"]
    fig, ax = plt.subplots(figsize=(6, 5))
    if node_values is not None:
        sc = ax.scatter(sp[:, 0], sp[:, 1], c=node_values, cmap="viridis", s=14)
        fig.colorbar(sc, ax=ax, label="mean signal of the node")
    else:
        ax.scatter(sp[:, 0], sp[:, 1], s=14)
    ax.set_title("Spatial meta-parameter queries: node embeddings (PCA)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    paths["spatial_pca"] = os.path.join(out_dir, "spatial_pca.png")
    fig.savefig(paths["spatial_pca"], dpi=100)
    plt.close(fig)

    sim = arrays["hourly_similarity"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, day in zip(axes, (0, 6)):
        im = ax.imshow(sim[day], cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
        ax.set_title(DAYS[day])
        ax.set_xlabel("hour")
        ax.set_ylabel("hour")
        ax.set_xticks(range(0, 24, 3))
        ax.set_yticks(range(0, 24, 3))
    fig.colorbar(im, ax=axes, shrink=0.85, label="cosine similarity")
    fig.suptitle("Temporal encoder: parameters generated at each hour, hour against hour")
    paths["hourly_similarity"] = os.path.join(out_dir, "hourly_similarity.png")
    fig.savefig(paths["hourly_similarity"], dpi=100)
    plt.close(fig)
    return paths
