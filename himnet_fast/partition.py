"""Graph partitioning, for Spatial Balance Attention (SBA) and the partitioned adaptive graph.

The sensor graph is split into ``P`` parts with METIS (``pymetis``); nodes are reordered so
each part is a contiguous run, and the parts are laid out padded to the largest part size
``M`` with a boolean mask, so attention can run on a dense ``(B, P, M, d)`` tensor. Without
edges (coordinates only, or nothing) a deterministic fallback is used: recursive coordinate
bisection when coordinates are given, else contiguous chunks of node-id order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional

import numpy as np
import torch

_INSTALL_HINT = "pip install himnet_fast[sba]"


def _import_pymetis():
    try:
        import pymetis
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(
            "METIS partitioning needs the optional package pymetis: "
            f"`{_INSTALL_HINT}` (or `pip install pymetis`). Without it, pass method='rcb' "
            "(coordinates) or method='chunks'.") from exc
    return pymetis


class PartitionLayout(NamedTuple):
    """A partition's index tensors on one device, as the partitioned graph ops read them."""

    index: torch.Tensor     # (P*M,) long: original node at each padded slot (0 on padding)
    mask: torch.Tensor      # (P, M) bool: real slots
    slot: torch.Tensor      # (N,) long: padded slot of each original node
    counts: torch.Tensor    # (P,) long: part sizes, at least 1 (a divisor for part means)
    nonempty: torch.Tensor  # (P,) bool


@dataclass
class Partition:
    """A partition of N nodes into P contiguous, padded parts.

    Attributes:
        order: (N,) long. ``order[i]`` is the original node at position ``i`` of the reordered
            graph; part ``p`` occupies positions ``offsets[p]:offsets[p+1]``.
        inverse: (N,) long. ``inverse[order] == arange(N)``: position of each original node.
        offsets: (P+1,) long, cumulative part sizes.
        sizes: (P,) long, part sizes (a part may be empty).
        index: (P, M) long, original node at slot ``m`` of part ``p`` (0 on padding slots).
        mask: (P, M) bool, True on real nodes, False on padding.
        membership: (N,) long, the part of each original node.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor
    membership: torch.Tensor
    # Device copies of the index tensors, made once per device: a GPU caller would otherwise
    # copy them host-to-device at every use (a synchronising copy that CUDA graphs cannot hold).
    _layouts: Dict[str, PartitionLayout] = field(default_factory=dict, init=False, repr=False, compare=False)

    def layout(self, device) -> PartitionLayout:
        """The :class:`PartitionLayout` on ``device`` (cached)."""
        key = str(torch.device(device))
        if key not in self._layouts:
            M = self.max_size
            slot = self.membership * M + (self.inverse - self.offsets[self.membership])
            self._layouts[key] = PartitionLayout(*(t.to(device) for t in (
                self.index.reshape(-1), self.mask, slot, self.sizes.clamp(min=1), self.sizes > 0)))
        return self._layouts[key]

    @property
    def num_nodes(self) -> int:
        return int(self.order.numel())

    @property
    def num_parts(self) -> int:
        return int(self.sizes.numel())

    @property
    def max_size(self) -> int:
        return int(self.mask.shape[1])

    def to_parts(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N, d) -> (..., P, M, d), zeros on padding slots."""
        if x.dim() < 2 or x.shape[-2] != self.num_nodes:
            raise ValueError(f"x must be (..., N={self.num_nodes}, d), got {tuple(x.shape)}")
        lay = self.layout(x.device)
        out = x.index_select(-2, lay.index)
        out = out.reshape(*x.shape[:-2], self.num_parts, self.max_size, x.shape[-1])
        return out * lay.mask.to(x.dtype).unsqueeze(-1)

    def from_parts(self, y: torch.Tensor) -> torch.Tensor:
        """(..., P, M, d) -> (..., N, d): the real slots, back in original node order."""
        P, M = self.num_parts, self.max_size
        if y.dim() < 3 or y.shape[-3] != P or y.shape[-2] != M:
            raise ValueError(f"y must be (..., P={P}, M={M}, d), got {tuple(y.shape)}")
        flat = y.reshape(*y.shape[:-3], P * M, y.shape[-1])
        return flat.index_select(-2, self.layout(y.device).slot)


def _from_membership(membership: np.ndarray, num_parts: int) -> Partition:
    membership = np.asarray(membership, dtype=np.int64)
    n = membership.shape[0]
    # stable sort: inside a part nodes keep their original (id) order -> deterministic
    order = np.argsort(membership, kind="stable")
    sizes = np.bincount(membership, minlength=num_parts)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    m = max(1, int(sizes.max()))
    index = np.zeros((num_parts, m), dtype=np.int64)
    mask = np.zeros((num_parts, m), dtype=bool)
    for p in range(num_parts):
        s = int(sizes[p])
        index[p, :s] = order[offsets[p]:offsets[p] + s]
        mask[p, :s] = True
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    t = torch.from_numpy
    return Partition(order=t(order), inverse=t(inverse), offsets=t(offsets), sizes=t(sizes),
                     index=t(index), mask=t(mask), membership=t(membership))


def _edges_to_csr(edge_index: np.ndarray, n: int):
    """Symmetrised, deduplicated, self-loop-free CSR (xadj, adjncy) for METIS."""
    src, dst = edge_index
    keep = src != dst
    src, dst = src[keep], dst[keep]
    s = np.concatenate([src, dst])
    d = np.concatenate([dst, src])
    key = np.unique(s * n + d)
    s, d = key // n, key % n
    xadj = np.concatenate([[0], np.cumsum(np.bincount(s, minlength=n))]).astype(np.int64)
    return xadj, d.astype(np.int64)


def _rcb(coords: np.ndarray, nodes: np.ndarray, parts: int, first: int, out: np.ndarray):
    """Recursive coordinate bisection: split along the widest axis at the part-count ratio."""
    if parts == 1:
        out[nodes] = first
        return
    left = parts // 2
    c = coords[nodes]
    axis = int(np.argmax(c.max(0) - c.min(0))) if len(nodes) else 0
    # lexsort on (node id, coordinate): ties are broken by id, so the split is deterministic
    o = np.lexsort((nodes, c[:, axis]))
    cut = int(round(len(nodes) * left / parts))
    _rcb(coords, nodes[o[:cut]], left, first, out)
    _rcb(coords, nodes[o[cut:]], parts - left, first + left, out)


def partition_graph(num_parts: int, *, adjacency=None, edge_index=None, num_nodes: Optional[int] = None,
                    coords=None, method: str = "auto", seed: int = 0) -> Partition:
    """Partition a graph into ``num_parts`` contiguous, padded parts.

    Args:
        num_parts: P, 1 <= P <= N.
        adjacency: optional (N, N) dense adjacency (numpy or torch); nonzeros are edges.
        edge_index: optional (2, E) integer edges (either direction; symmetrised here).
        num_nodes: N; needed only when neither adjacency nor coords gives it.
        coords: optional (N, k) node coordinates for the edgeless fallback.
        method: "auto" (METIS when there are edges, else "rcb" with coords, else "chunks"),
            "metis", "rcb" or "chunks".
        seed: METIS random seed (fixed, so the partition is deterministic).

    Returns:
        A :class:`Partition`.
    """
    if adjacency is not None and edge_index is not None:
        raise ValueError("give adjacency or edge_index, not both")
    if adjacency is not None:
        a = adjacency.detach().cpu().numpy() if torch.is_tensor(adjacency) else np.asarray(adjacency)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"adjacency must be a square (N, N) matrix, got shape {a.shape}")
        n = a.shape[0]
        ei = np.stack(np.nonzero(a)).astype(np.int64)
    elif edge_index is not None:
        ei = edge_index.detach().cpu().numpy() if torch.is_tensor(edge_index) else np.asarray(edge_index)
        if ei.ndim != 2 or ei.shape[0] != 2:
            raise ValueError(f"edge_index must be (2, E), got shape {ei.shape}")
        ei = ei.astype(np.int64)
        n = num_nodes if num_nodes is not None else (int(ei.max()) + 1 if ei.size else None)
    else:
        ei, n = None, None
    if coords is not None:
        c = coords.detach().cpu().numpy() if torch.is_tensor(coords) else np.asarray(coords)
        c = np.asarray(c, dtype=np.float64)
        if c.ndim == 1:
            c = c[:, None]
        if c.ndim != 2 or (n is not None and c.shape[0] != n):
            raise ValueError(f"coords must be (N, k) with N={n}, got shape {c.shape}")
        n = c.shape[0] if n is None else n
    else:
        c = None
    if n is None:
        n = num_nodes
    if n is None or n < 1:
        raise ValueError("num_nodes must be given (>= 1) when neither adjacency, edge_index nor coords is")
    if num_nodes is not None and num_nodes != n:
        raise ValueError(f"num_nodes={num_nodes} disagrees with the graph's N={n}")
    if ei is not None and ei.size and (ei.min() < 0 or ei.max() >= n):
        raise ValueError(f"edge_index entries must lie in [0, {n}), got [{ei.min()}, {ei.max()}]")
    if not isinstance(num_parts, int) or not 1 <= num_parts <= n:
        raise ValueError(f"num_parts must be an int in [1, N={n}], got {num_parts!r}")
    if method not in ("auto", "metis", "rcb", "chunks"):
        raise ValueError(f"method must be 'auto', 'metis', 'rcb' or 'chunks', got {method!r}")

    has_edges = ei is not None and bool((ei[0] != ei[1]).any())
    if method == "auto":
        method = "metis" if has_edges else ("rcb" if c is not None else "chunks")
    if method == "metis":
        if not has_edges:
            raise ValueError("method='metis' needs a graph with edges (adjacency or edge_index)")
        pymetis = _import_pymetis()
        if num_parts == 1:
            membership = np.zeros(n, dtype=np.int64)
        else:
            xadj, adjncy = _edges_to_csr(ei, n)
            if hasattr(pymetis, "CSRAdjacency"):   # pymetis >= 2025: xadj/adjncy deprecated
                graph = dict(adjacency=pymetis.CSRAdjacency(adj_starts=xadj, adjacent=adjncy))
            else:
                graph = dict(xadj=xadj, adjncy=adjncy)
            _, membership = pymetis.part_graph(num_parts, **graph, options=pymetis.Options(seed=seed))
    elif method == "rcb":
        if c is None:
            raise ValueError("method='rcb' needs coords (N, k)")
        membership = np.empty(n, dtype=np.int64)
        _rcb(c, np.arange(n), num_parts, 0, membership)
    else:
        membership = np.repeat(np.arange(num_parts), [len(a) for a in np.array_split(np.arange(n), num_parts)])
    return _from_membership(np.asarray(membership), num_parts)
