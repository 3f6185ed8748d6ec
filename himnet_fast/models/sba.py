"""SBATransformer: the SBA (Spatial Balance Attention) forecaster.

Per node, the input window is embedded linearly and a Laplacian-eigenvector positional encoding
is added; then ``blocks`` SBA blocks, each (pre-norm) intra-part attention + inter-part attention
over mean-pooled part tokens (broadcast back to the part's nodes), residual, then a feed-forward
residual; parts grow with depth (fewer, larger parts deeper: multi-scale). A linear head maps
each node to ``out_steps`` values. Memory per block is O(B * N * M) for parts of at most M nodes,
so it grows linearly in N at fixed part size.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..ops.block_attention import block_attention, inter_attention, part_mean
from ..partition import Partition, partition_graph


def _edges(num_nodes, adjacency, edge_index):
    if adjacency is not None and edge_index is not None:
        raise ValueError("give adjacency or edge_index, not both")
    if adjacency is not None:
        a = adjacency.detach().cpu().numpy() if torch.is_tensor(adjacency) else np.asarray(adjacency)
        if a.shape != (num_nodes, num_nodes):
            raise ValueError(f"adjacency must be (N, N)=({num_nodes}, {num_nodes}), got {a.shape}")
        return np.stack(np.nonzero(a)).astype(np.int64)
    if edge_index is not None:
        ei = edge_index.detach().cpu().numpy() if torch.is_tensor(edge_index) else np.asarray(edge_index)
        if ei.ndim != 2 or ei.shape[0] != 2:
            raise ValueError(f"edge_index must be (2, E), got {ei.shape}")
        return ei.astype(np.int64)
    return None


def laplacian_pe(num_nodes: int, edge_index: Optional[np.ndarray], k: int, *,
                 dense_max: int = 2048, iters: int = 200, seed: int = 0) -> torch.Tensor:
    """(N, k) eigenvectors of the k smallest non-trivial eigenvalues of the normalised Laplacian.

    ``L = I - D^-1/2 A D^-1/2`` of the symmetrised, unweighted graph. Exact (dense ``eigh``)
    up to ``dense_max`` nodes; above that, scipy's ``eigsh`` when scipy is installed, else a
    cheap approximation: orthogonal (subspace) iteration on ``(I + D^-1/2 A D^-1/2)/2`` with the
    trivial vector ``D^1/2 1`` projected out. Signs are fixed (largest-magnitude entry
    positive, the first of near-ties; see :func:`fix_signs`) so the encoding is deterministic. Zeros without edges or when ``k == 0``.
    Columns beyond N-1 eigenvectors are zero.
    """
    pe = torch.zeros(num_nodes, k, dtype=torch.float32)
    if k == 0 or edge_index is None or num_nodes < 2:
        return pe
    src, dst = edge_index
    keep = src != dst
    src, dst = np.concatenate([src[keep], dst[keep]]), np.concatenate([dst[keep], src[keep]])
    if src.size == 0:
        return pe
    key = np.unique(src * num_nodes + dst)
    src, dst = key // num_nodes, key % num_nodes
    deg = np.bincount(src, minlength=num_nodes).astype(np.float64)
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1)), 0.0)
    w = dinv[src] * dinv[dst]
    kk = min(k, num_nodes - 1)
    if num_nodes <= dense_max:
        s = np.zeros((num_nodes, num_nodes))
        s[src, dst] = w
        vals, vecs = np.linalg.eigh(np.eye(num_nodes) - s)
        vecs = vecs[:, 1:1 + kk]
    else:
        vecs = None
        try:
            import scipy.sparse as sp
            from scipy.sparse.linalg import eigsh
            L = sp.identity(num_nodes) - sp.csr_matrix((w, (src, dst)), shape=(num_nodes, num_nodes))
            vals, v = eigsh(L, k=kk + 1, sigma=-1e-3, which="LM")
            vecs = v[:, np.argsort(vals)][:, 1:1 + kk]
        except ImportError:
            pass
        if vecs is None:
            S = torch.sparse_coo_tensor(torch.from_numpy(np.stack([src, dst])), torch.from_numpy(w),
                                        (num_nodes, num_nodes), check_invariants=True).coalesce()
            triv = torch.from_numpy(np.sqrt(deg))
            triv = triv / triv.norm()
            g = torch.Generator().manual_seed(seed)
            Y = torch.randn(num_nodes, kk, generator=g, dtype=torch.float64)
            for _ in range(iters):
                Y = 0.5 * (Y + torch.sparse.mm(S, Y))
                Y = Y - triv[:, None] * (triv @ Y)[None, :]
                Y, _ = torch.linalg.qr(Y)
            # Rayleigh-Ritz: order by eigenvalue of S (largest = smallest of L)
            H = Y.T @ torch.sparse.mm(S, Y)
            ev, U = torch.linalg.eigh(H)
            vecs = (Y @ U).flip(-1).numpy()
    pe[:, :kk] = torch.from_numpy(fix_signs(vecs)).float()
    return pe


def fix_signs(vecs: np.ndarray, rtol: float = 1e-3) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry is positive.

    Eigenvectors of symmetric graphs often have two entries of equal magnitude and opposite
    sign (a path graph's Fiedler vector is antisymmetric), so a plain ``argmax`` would pick
    whichever one rounding favoured and the sign would differ between solvers and BLAS builds.
    Entries within ``rtol`` of the column maximum count as tied; the first of them decides.
    """
    vecs = np.asarray(vecs, dtype=np.float64)
    mag = np.abs(vecs)
    tied = mag >= (1.0 - rtol) * mag.max(0, keepdims=True)
    first = tied.argmax(0)                       # first True per column
    sign = np.sign(vecs[first, np.arange(vecs.shape[1])])
    sign[sign == 0] = 1.0
    return vecs * sign


class SBABlock(nn.Module):
    """One SBA block over a fixed partition: x (B, N, d) -> (B, N, d)."""

    def __init__(self, partition: Partition, d_model: int, heads: int, ff_mult: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.heads = heads
        self.register_buffer("index", partition.index.clone(), persistent=False)
        self.register_buffer("mask", partition.mask.clone(), persistent=False)
        self.register_buffer("membership", partition.membership.clone(), persistent=False)
        self.partition = partition
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.qkv_inter = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_mult * d_model), nn.GELU(),
                                nn.Linear(ff_mult * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def _split(self, t):
        # (B, P, M, d) -> (B*H, P, M, d/H): heads folded into the batch for block_attention
        B, P, M, d = t.shape
        return t.reshape(B, P, M, self.heads, d // self.heads).permute(0, 3, 1, 2, 4).reshape(
            B * self.heads, P, M, d // self.heads)

    def _merge(self, t, B):
        BH, P, M, dh = t.shape
        return t.reshape(B, self.heads, P, M, dh).permute(0, 2, 3, 1, 4).reshape(B, P, M, self.heads * dh)

    def forward(self, x):
        B, N, d = x.shape
        h = self.norm1(x)
        hp = self.partition.to_parts(h)                              # (B, P, M, d)
        q, k, v = self.qkv(hp).chunk(3, -1)
        intra = self._merge(block_attention(self._split(q), self._split(k), self._split(v), self.mask), B)
        intra = self.partition.from_parts(intra)                     # (B, N, d)
        tok = part_mean(hp, self.mask)                               # (B, P, d)
        qi, ki, vi = self.qkv_inter(tok).chunk(3, -1)
        P = tok.shape[1]
        fold = lambda t: t.reshape(B, P, self.heads, d // self.heads).transpose(1, 2).reshape(B * self.heads, P, -1)
        inter = inter_attention(fold(qi), fold(ki), fold(vi), self.mask.any(1))
        inter = inter.reshape(B, self.heads, P, -1).transpose(1, 2).reshape(B, P, d)
        inter = inter.index_select(1, self.membership)               # broadcast to the part's nodes
        x = x + self.drop(self.proj(intra + inter))
        return x + self.drop(self.ff(self.norm2(x)))


class SBATransformer(nn.Module):
    """SBA forecaster: x (B, in_steps, N, C) -> (B, out_steps, N, 1).

    Args:
        num_nodes: N.
        adjacency: optional (N, N) adjacency (nonzero = edge), or give ``edge_index`` (2, E).
            Used for METIS partitions and the Laplacian PE.
        coords: optional (N, k) coordinates: partition fallback when there are no edges.
        in_steps, out_steps, input_dim: window lengths and the channels of x used (first
            ``input_dim``; HimNet's data puts the value in channel 0 and time features after).
        d_model, heads, blocks: width, attention heads, number of SBA blocks.
        parts: parts per block, non-increasing (subgraphs grow with depth); default picks
            parts of about 16, 64, 256, ... nodes.
        pe_dim: Laplacian eigenvectors used as positional encoding (0 disables it).
    """

    def __init__(self, num_nodes: int, adjacency=None, *, edge_index=None, coords=None,
                 in_steps: int = 12, out_steps: int = 12, input_dim: int = 1, d_model: int = 64,
                 heads: int = 4, blocks: int = 3, parts: Optional[Sequence[int]] = None,
                 pe_dim: int = 8, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        for name, val in (("num_nodes", num_nodes), ("in_steps", in_steps), ("out_steps", out_steps),
                          ("input_dim", input_dim), ("d_model", d_model), ("heads", heads),
                          ("blocks", blocks)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not isinstance(pe_dim, int) or pe_dim < 0:
            raise ValueError(f"pe_dim must be an int >= 0, got {pe_dim!r}")
        if parts is None:
            parts = [max(1, min(num_nodes, math.ceil(num_nodes / (16 * 4 ** i)))) for i in range(blocks)]
        parts = [int(p) for p in parts]
        if len(parts) != blocks:
            raise ValueError(f"parts must give one part count per block ({blocks}), got {parts}")
        if any(p < 1 or p > num_nodes for p in parts) or any(a < b for a, b in zip(parts, parts[1:])):
            raise ValueError(f"parts must be non-increasing counts in [1, N={num_nodes}] "
                             f"(subgraphs grow with depth), got {parts}")
        self.num_nodes, self.in_steps, self.out_steps, self.input_dim = num_nodes, in_steps, out_steps, input_dim
        self.parts = tuple(parts)
        ei = _edges(num_nodes, adjacency, edge_index)
        has_edges = ei is not None and bool((ei[0] != ei[1]).any())
        self.embed = nn.Linear(in_steps * input_dim, d_model)
        self.register_buffer("pe", laplacian_pe(num_nodes, ei, pe_dim, seed=seed))
        self.pe_proj = nn.Linear(pe_dim, d_model) if pe_dim else None
        cache = {}
        blks = []
        for p in parts:
            if p not in cache:
                cache[p] = partition_graph(p, edge_index=ei if has_edges else None, num_nodes=num_nodes,
                                           coords=coords, seed=seed)
            blks.append(SBABlock(cache[p], d_model, heads, dropout=dropout))
        self.blocks = nn.ModuleList(blks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, out_steps)

    def forward(self, x: torch.Tensor, y_cov=None, labels=None, batches_seen=None) -> torch.Tensor:
        """x (B, in_steps, N, C) -> (B, out_steps, N, 1). The other arguments are HimNet's call
        signature (``model(x, y_cov, labels, batches_seen)``) and are unused."""
        if x.dim() != 4 or x.shape[1] != self.in_steps or x.shape[2] != self.num_nodes \
                or x.shape[3] < self.input_dim:
            raise ValueError(f"x must be (B, in_steps={self.in_steps}, N={self.num_nodes}, "
                             f"C>={self.input_dim}), got {tuple(x.shape)}")
        B = x.shape[0]
        h = x[..., :self.input_dim].permute(0, 2, 1, 3).reshape(B, self.num_nodes, -1)
        h = self.embed(h)
        if self.pe_proj is not None:
            h = h + self.pe_proj(self.pe.to(h.dtype))
        for blk in self.blocks:
            h = blk(h)
        out = self.head(self.norm(h))                                 # (B, N, out_steps)
        return out.transpose(1, 2).unsqueeze(-1)
