"""Partitioned adaptive graph: HimNet's ``softmax(relu(E Eᵀ))`` restricted to graph parts plus
pooled inter-part terms, so the graph product costs O(N·(M+P)) instead of O(N²).

For node ``i`` in part ``p`` (a :class:`~himnet_fast.sba.partition.Partition`), the scores are

* ``relu(e_i · e_j)`` for every real node ``j`` of part ``p`` (``i`` itself included), and
* ``relu(e_i · ē_q)`` for every other non-empty part ``q``, ``ē_q`` the mean embedding of the
  real nodes of ``q``;

one softmax runs over that union (padding slots and empty parts are masked out, never scored
as zero), and the product is ``(A v)_i = Σ_{j∈p} a_ij v_j + Σ_{q≠p} a_iq v̄_q`` with ``v̄_q``
the mean of ``v`` over the real nodes of ``q``. Rows are stochastic; with one part the operator
is exactly the adaptive graph. As an N×N matrix it is ``a_ij`` inside the part and
``a_{i,q} / |q|`` on each node ``j`` of another part ``q``
(:func:`partitioned_adaptive_graph_reference` builds it so, step by step, for the tests).

The torch implementation streams over chunks of parts: one chunk's scores
``(G, parts, M, M+P)`` stay within ``$HIMNET_FAST_CHUNK_MB`` (one part at least), and backward
recomputes them chunk by chunk (flash-attention style), so neither ``P·M·M`` nor ``N·P`` scores
ever exist at once; saved state is O(N·(D+W)).
"""
from __future__ import annotations


import torch

from .._checks import check_same_device, check_tensor
from ..ops._common import cast, chunk_bytes, compute_dtype, no_autocast
from .partition import Partition

__all__ = ["partitioned_adaptive_matmul", "partitioned_adaptive_graph_reference", "check_partition"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def check_partition(partition, num_nodes: int, name: str = "partition") -> Partition:
    """``partition`` must be a :class:`Partition` of exactly ``num_nodes`` nodes."""
    if not isinstance(partition, Partition):
        raise ValueError(f"{name} must be a himnet_fast.sba.Partition (from partition_graph), "
                         f"got {type(partition).__name__}")
    if partition.num_nodes != num_nodes:
        raise ValueError(f"{name} covers {partition.num_nodes} nodes, expected N={num_nodes} "
                         f"(the embedding's node count)")
    return partition


def check_partition_options(partition, num_nodes: int, dense, backend, dense_name: str = "dense") -> Partition:
    """:func:`check_partition`, and the options a partitioned graph cannot take: a dense matrix
    (``dense_name`` True; the partitioned graph is never materialised) or a backend other than
    torch (its only implementation)."""
    from .. import _backend

    check_partition(partition, num_nodes)
    if dense:
        raise ValueError(f"{dense_name}=True cannot be combined with partition= (the partitioned graph is "
                         f"never materialised); pass {dense_name}=None or False")
    if _backend.normalize_backend(backend) not in (None, "torch"):
        raise ValueError(f"the partitioned graph (partition=) has a torch implementation only; "
                         f"backend must be None/'auto' or 'torch', got {backend!r}")
    return partition


def _layout(partition: Partition, device: torch.device):
    """(index (P*M,), mask (P, M), slot (N,), counts (P,), nonempty (P,)) on ``device``,
    cached on the partition: a GPU caller would otherwise copy them host-to-device per call."""
    cache = partition.__dict__.setdefault("_adaptive_layout", {})
    key = str(device)
    if key not in cache:
        M = partition.max_size
        # position of each original node in the flattened padded (P*M) layout
        slot = partition.membership * M + (partition.inverse - partition.offsets[partition.membership])
        cache[key] = tuple(t.to(device) for t in (
            partition.index.reshape(-1), partition.mask, slot, partition.sizes.clamp(min=1),
            partition.sizes > 0))
    return cache[key]


def _parts_per_chunk(G: int, M: int, P: int, itemsize: int) -> int:
    # about five (G, parts, M, M+P) buffers live at once in backward: scores, probabilities,
    # dA, dS and the mask
    per_part = G * M * (M + P) * itemsize * 5
    return max(1, min(P, chunk_bytes() // max(1, per_part)))


def _probs(eq, keys, bias, with_relu_mask=False):
    """softmax over keys of relu(eq · keys) with invalid keys excluded: (probabilities, the
    ReLU's zero mask ``s <= 0`` or None). In place on the score buffer: this loop is bound by
    passes over (M+P)-wide rows, not by the matmuls."""
    s = torch.matmul(eq, keys.transpose(-1, -2))
    neg = s <= 0 if with_relu_mask else None
    s.clamp_min_(0).add_(bias)  # bias: -inf on invalid keys (a broadcast add beats masked_fill)
    return torch.softmax(s, dim=-1), neg


def _chunk_inputs(ep, vp, ebar, vbar, mask, inter_ok, a, b, acc):
    """Queries, keys, values and the key bias (c, 1, M+P) of parts a..b-1: 0 on valid keys, -inf
    on padding slots, the part's own token and empty parts (keys: the part's own M slots, then
    the P pooled part tokens; validity does not depend on the query)."""
    G, P, M, _ = ep.shape
    c = b - a
    eq = ep[:, a:b].to(acc)
    keys = torch.cat([eq, ebar.to(acc)[:, None].expand(G, c, P, ebar.shape[-1])], dim=2)
    vals = torch.cat([vp[:, a:b].to(acc), vbar.to(acc)[:, None].expand(G, c, P, vbar.shape[-1])], dim=2)
    valid = torch.cat([mask[a:b], inter_ok[a:b]], dim=-1)[:, None, :]
    bias = torch.zeros(valid.shape, dtype=acc, device=eq.device).masked_fill_(~valid, float("-inf"))
    return eq, keys, vals, bias


class _PartitionedAttention(torch.autograd.Function):
    """out[g, p] = softmax(relu(ep[g,p] · [ep[g,p]; ebar[g]]ᵀ)) @ [vp[g,p]; vbar[g]] per part,
    one chunk of parts at a time, recomputed in backward.

    ep (G, P, M, D), vp (G, P, M, W), ebar (G, P, D), vbar (G, P, W); mask (P, M) real slots;
    inter_ok (P, P): pooled token q is a key of part p (q != p, q not empty). Returns
    (G, P, M, W), zero on padding rows.
    """

    @staticmethod
    def forward(ctx, ep, vp, ebar, vbar, mask, inter_ok):
        G, P, M, _ = ep.shape
        acc = _acc_dtype(vp.dtype)
        out = torch.zeros(G, P, M, vp.shape[-1], dtype=vp.dtype, device=vp.device)
        step = _parts_per_chunk(G, M, P, torch.finfo(acc).bits // 8)
        rows = mask[:, :, None].to(acc)
        for a in range(0, P, step):
            b = min(P, a + step)
            eq, keys, vals, bias = _chunk_inputs(ep, vp, ebar, vbar, mask, inter_ok, a, b, acc)
            p, _ = _probs(eq, keys, bias)
            out[:, a:b] = torch.matmul(p, vals).mul_(rows[a:b])
        ctx.save_for_backward(ep, vp, ebar, vbar, mask, inter_ok, out)
        return out

    @staticmethod
    def backward(ctx, dout):
        ep, vp, ebar, vbar, mask, inter_ok, out = ctx.saved_tensors
        G, P, M, _ = ep.shape
        acc = _acc_dtype(vp.dtype)
        dep, dvp = torch.zeros_like(ep, dtype=acc), torch.zeros_like(vp, dtype=acc)
        debar, dvbar = torch.zeros_like(ebar, dtype=acc), torch.zeros_like(vbar, dtype=acc)
        rows = mask[:, :, None].to(acc)
        step = _parts_per_chunk(G, M, P, torch.finfo(acc).bits // 8)
        for a in range(0, P, step):
            b = min(P, a + step)
            eq, keys, vals, bias = _chunk_inputs(ep, vp, ebar, vbar, mask, inter_ok, a, b, acc)
            p, neg = _probs(eq, keys, bias, with_relu_mask=True)
            do = dout[:, a:b].to(acc) * rows[a:b]          # padding rows pass no gradient
            # softmax backward: dS = P ∘ (dO Vᵀ − <dO, O>), then the ReLU mask
            delta = (do * out[:, a:b].to(acc)).sum(-1, keepdim=True)
            ds = torch.matmul(do, vals.transpose(-1, -2)).sub_(delta).mul_(p)
            ds.masked_fill_(neg, 0.0)                      # relu'(s) = 0 for s <= 0 (torch convention)
            dvals = torch.matmul(p.transpose(-1, -2), do)  # (G, c, M+P, W)
            dkeys = torch.matmul(ds.transpose(-1, -2), eq)  # (G, c, M+P, D)
            # E plays query and (own-part) key: both gradients land in dep
            dep[:, a:b] += torch.matmul(ds, keys) + dkeys[:, :, :M]
            dvp[:, a:b] += dvals[:, :, :M]
            # the pooled tokens are keys of every part: sum over the chunk's parts
            debar += dkeys[:, :, M:].sum(1)
            dvbar += dvals[:, :, M:].sum(1)
        return dep.to(ep.dtype), dvp.to(vp.dtype), debar.to(ebar.dtype), dvbar.to(vbar.dtype), None, None


def _apply(e: torch.Tensor, v: torch.Tensor, partition: Partition) -> torch.Tensor:
    """e (G, N, D), v (G, N, W) in one dtype -> (G, N, W)."""
    G, N, _ = e.shape
    P, M = partition.num_parts, partition.max_size
    index, mask, slot, counts, nonempty = _layout(partition, e.device)
    fmask = mask.reshape(1, P, M, 1).to(e.dtype)
    # padded layout; padding slots point at node 0 and are zeroed, so they carry no gradient
    ep = e.index_select(1, index).reshape(G, P, M, -1) * fmask
    vp = v.index_select(1, index).reshape(G, P, M, -1) * fmask
    cnt = counts.to(e.dtype)[None, :, None]
    ebar, vbar = ep.sum(2) / cnt, vp.sum(2) / cnt          # means over the real nodes
    inter_ok = nonempty[None, :] & ~torch.eye(P, dtype=torch.bool, device=e.device)
    out = _PartitionedAttention.apply(ep, vp, ebar, vbar, mask, inter_ok)
    return out.reshape(G, P * M, -1).index_select(1, slot)


def partitioned_adaptive_matmul(embedding: torch.Tensor, v: torch.Tensor, partition: Partition) -> torch.Tensor:
    """Partitioned ``A v`` (module docstring) without an N×N or P·M·M buffer.

    Args:
        embedding: (N, D) graph shared by the batch, or (B, N, D) per-sample graph.
        v: (B, N, W).
        partition: a :class:`~himnet_fast.sba.partition.Partition` of the N nodes.

    Returns:
        (B, N, W) in the compute dtype (autocast's when on, else the promoted input dtype);
        scores and softmax are accumulated in fp32 (float64 for float64 inputs).
    """
    check_tensor("embedding", embedding, (2, 3))
    check_tensor("v", v, 3)
    N = embedding.shape[-2]
    if v.shape[1] != N:
        raise ValueError(f"v has {v.shape[1]} nodes (dim 1 of shape {tuple(v.shape)}), expected N={N} "
                         f"(the embedding's node count)")
    if embedding.dim() == 3 and embedding.shape[0] != v.shape[0]:
        raise ValueError(f"v has batch {v.shape[0]} (dim 0 of shape {tuple(v.shape)}), expected "
                         f"{embedding.shape[0]} (the per-sample embedding's batch)")
    check_partition(partition, N)
    check_same_device(v=v, embedding=embedding)
    dtype = compute_dtype(v.device, v, embedding)
    with no_autocast(v.device):
        e, v = cast(embedding, dtype), cast(v, dtype)
        if v.numel() == 0:
            return v.clone()
        if e.dim() == 3:
            return _apply(e, v, partition)
        # shared graph: every sample has the same A, so the batch becomes extra value columns
        B, _, W = v.shape
        vf = v.permute(1, 0, 2).reshape(1, N, B * W)
        return _apply(e.unsqueeze(0), vf, partition).reshape(N, B, W).permute(1, 0, 2)


def partitioned_adaptive_graph_reference(embedding: torch.Tensor, partition: Partition) -> torch.Tensor:
    """The partitioned operator as a dense matrix, built row by row from its definition:
    (N, N) for E (N, D), (B, N, N) for E (B, N, D). O(N²): for tests at small N only.

    Row ``i`` (part ``p``): softmax over ``[relu(e_i·e_j) for j in p] + [relu(e_i·ē_q) for
    non-empty q != p]``; entry ``j`` in ``p`` gets ``a_ij``, every node of part ``q`` gets
    ``a_iq / |q|`` (the weight of the pooled value ``v̄_q``).
    """
    check_tensor("embedding", embedding, (2, 3))
    check_partition(partition, embedding.shape[-2])
    e = embedding if embedding.dim() == 3 else embedding.unsqueeze(0)
    N = e.shape[1]
    members = [partition.order[partition.offsets[q]:partition.offsets[q + 1]].tolist()
               for q in range(partition.num_parts)]
    out = []
    for g in range(e.shape[0]):
        means = {q: e[g, nodes].mean(0) for q, nodes in enumerate(members) if nodes}
        rows = []
        for i in range(N):
            p = int(partition.membership[i])
            own = members[p]
            others = [q for q in means if q != p]
            keys = [e[g, j] for j in own] + [means[q] for q in others]
            a = torch.softmax(torch.relu(torch.stack(keys) @ e[g, i]), dim=0)
            cols = [torch.zeros((), dtype=e.dtype, device=e.device) for _ in range(N)]
            for k, j in enumerate(own):
                cols[j] = cols[j] + a[k]
            for k, q in enumerate(others, start=len(own)):
                for j in members[q]:
                    cols[j] = cols[j] + a[k] / len(members[q])
            rows.append(torch.stack(cols))
        out.append(torch.stack(rows))
    out = torch.stack(out)
    return out if embedding.dim() == 3 else out[0]
