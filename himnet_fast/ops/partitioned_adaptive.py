"""Partitioned adaptive graph: HimNet's ``softmax(relu(E Eᵀ))`` restricted to graph parts plus
pooled inter-part terms, so the graph product costs O(N·(M+P)) instead of O(N²).

For node ``i`` in part ``p`` (a :class:`~himnet_fast.partition.Partition`), the scores are

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

The op is the registered custom op ``himnet_fast::partitioned_adaptive_matmul`` (backward:
``himnet_fast::partitioned_adaptive_matmul_backward``), torch only; its gather into the padded
part layout, the part means and the scatter back are part of its explicit formulas, so the
recurrent cell op can run it and its backward directly.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._checks import check_same_device, check_tensor
from .._dtypes import acc_dtype
from ..partition import Partition, PartitionLayout
from ._common import cast, chunk_bytes, compute_dtype, contiguous, custom_op, empty_like, no_autocast

__all__ = ["partitioned_adaptive_matmul", "apply_partitioned", "check_partition", "check_partition_options"]


def check_partition(partition, num_nodes: int, name: str = "partition") -> Partition:
    """``partition`` must be a :class:`~himnet_fast.partition.Partition` of exactly ``num_nodes`` nodes."""
    if not isinstance(partition, Partition):
        raise ValueError(f"{name} must be a Partition (from himnet_fast.sba.partition_graph), "
                         f"got {type(partition).__name__}")
    if partition.num_nodes != num_nodes:
        raise ValueError(f"{name} covers {partition.num_nodes} nodes, expected N={num_nodes} "
                         f"(the embedding's node count)")
    return partition


def check_partition_options(partition, num_nodes: int, dense, backend, dense_name: str = "dense") -> Partition:
    """:func:`check_partition`, and the options a partitioned graph cannot take: a dense matrix
    (``dense_name`` True; the partitioned graph is never materialised) or a backend other than
    torch (its only implementation)."""
    check_partition(partition, num_nodes)
    if dense:
        raise ValueError(f"{dense_name}=True cannot be combined with partition= (the partitioned graph is "
                         f"never materialised); pass {dense_name}=None or False")
    if _backend.normalize_backend(backend) not in (None, "torch"):
        raise ValueError(f"the partitioned graph (partition=) has a torch implementation only; "
                         f"backend must be None/'auto' or 'torch', got {backend!r}")
    return partition


def partitioned_adaptive_matmul(embedding: Tensor, v: Tensor, partition: Partition) -> Tensor:
    """Partitioned ``A v`` (module docstring) without an N×N or P·M·M buffer.

    Args:
        embedding: (N, D) graph shared by the batch, or (B, N, D) per-sample graph.
        v: (B, N, W).
        partition: a :class:`~himnet_fast.partition.Partition` of the N nodes.

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
        return apply_partitioned(cast(embedding, dtype), cast(v, dtype), partition.layout(v.device))


def apply_partitioned(e: Tensor, v: Tensor, layout: PartitionLayout) -> Tensor:
    """:func:`partitioned_adaptive_matmul` on validated inputs of one dtype (the graph layer's
    entry): e (N, D) or (B, N, D), v (B, N, W) -> (B, N, W)."""
    if v.numel() == 0:
        return v.clone()
    name = _backend.resolve("partitioned_adaptive_matmul", None, v.device, False)
    if e.dim() == 3:
        return _partitioned(e, v, *layout, name)[0]
    # shared graph: every sample has the same A, so the batch becomes extra value columns
    B, N, W = v.shape
    vf = v.permute(1, 0, 2).reshape(1, N, B * W)
    out = _partitioned(e.unsqueeze(0), vf, *layout, name)[0]
    return out.reshape(N, B, W).permute(1, 0, 2)


# --------------------------------------------------------------------------- torch

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


def _attend(ep, vp, ebar, vbar, mask, inter_ok):
    """out[g, p] = softmax(relu(ep[g,p] · [ep[g,p]; ebar[g]]ᵀ)) @ [vp[g,p]; vbar[g]] per part,
    one chunk of parts at a time.

    ep (G, P, M, D), vp (G, P, M, W), ebar (G, P, D), vbar (G, P, W); mask (P, M) real slots;
    inter_ok (P, P): pooled token q is a key of part p (q != p, q not empty). Returns
    (G, P, M, W), zero on padding rows.
    """
    G, P, M, _ = ep.shape
    acc = acc_dtype(vp.dtype)
    out = torch.zeros(G, P, M, vp.shape[-1], dtype=vp.dtype, device=vp.device)
    step = _parts_per_chunk(G, M, P, torch.finfo(acc).bits // 8)
    rows = mask[:, :, None].to(acc)
    for a in range(0, P, step):
        b = min(P, a + step)
        eq, keys, vals, bias = _chunk_inputs(ep, vp, ebar, vbar, mask, inter_ok, a, b, acc)
        p, _ = _probs(eq, keys, bias)
        out[:, a:b] = torch.matmul(p, vals).mul_(rows[a:b])
    return out


def _attend_backward(dout, ep, vp, ebar, vbar, mask, inter_ok, out):
    """(dep, dvp, debar, dvbar) of :func:`_attend`, the probabilities recomputed per chunk."""
    G, P, M, _ = ep.shape
    acc = acc_dtype(vp.dtype)
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
    return dep.to(ep.dtype), dvp.to(vp.dtype), debar.to(ebar.dtype), dvbar.to(vbar.dtype)


def _padded(e: Tensor, v: Tensor, layout: PartitionLayout):
    """The padded part layout: (ep (G, P, M, D), vp (G, P, M, W), ebar (G, P, D), vbar (G, P, W),
    inter_ok (P, P), fmask (1, P, M, 1), cnt (1, P, 1)). Padding slots point at node 0 and are
    zeroed, so they carry no gradient."""
    G = e.shape[0]
    P, M = layout.mask.shape
    fmask = layout.mask.reshape(1, P, M, 1).to(e.dtype)
    ep = e.index_select(1, layout.index).reshape(G, P, M, -1) * fmask
    vp = v.index_select(1, layout.index).reshape(G, P, M, -1) * fmask
    cnt = layout.counts.to(e.dtype)[None, :, None]
    ebar, vbar = ep.sum(2) / cnt, vp.sum(2) / cnt          # means over the real nodes
    inter_ok = layout.nonempty[None, :] & ~torch.eye(P, dtype=torch.bool, device=e.device)
    return ep, vp, ebar, vbar, inter_ok, fmask, cnt


def torch_forward(e: Tensor, v: Tensor, index: Tensor, mask: Tensor, slot: Tensor, counts: Tensor,
                  nonempty: Tensor) -> Tuple[Tensor, Tensor]:
    """e (G, N, D), v (G, N, W) in one dtype -> (out (G, N, W), the padded output (G, P, M, W),
    which backward needs)."""
    layout = PartitionLayout(index, mask, slot, counts, nonempty)
    G = e.shape[0]
    P, M = mask.shape
    ep, vp, ebar, vbar, inter_ok, _, _ = _padded(e, v, layout)
    outp = _attend(ep, vp, ebar, vbar, mask, inter_ok)
    return outp.reshape(G, P * M, -1).index_select(1, slot), outp


def torch_backward(dout: Tensor, e: Tensor, v: Tensor, index: Tensor, mask: Tensor, slot: Tensor, counts: Tensor,
                   nonempty: Tensor, outp: Tensor, needs) -> Tuple[Tensor, Tensor]:
    """(de, dv) of :func:`torch_forward`: the scatter, the attention backward, the part means
    and the gather, in reverse."""
    layout = PartitionLayout(index, mask, slot, counts, nonempty)
    G, N, _ = e.shape
    P, M = mask.shape
    ep, vp, ebar, vbar, inter_ok, fmask, cnt = _padded(e, v, layout)
    # out = outp[slot]: every node has its own slot, so the gradient is a scatter into zeros
    doutp = dout.new_zeros(G, P * M, dout.shape[-1]).index_copy_(1, slot, dout).reshape(G, P, M, -1)
    dep, dvp, debar, dvbar = _attend_backward(doutp, ep, vp, ebar, vbar, mask, inter_ok, outp)
    # the means: d(mean)/d(member) = 1 / count; the padding mask; the gather's index_add
    dep = (dep + (debar / cnt).unsqueeze(2)) * fmask
    dvp = (dvp + (dvbar / cnt).unsqueeze(2)) * fmask
    de = e.new_zeros(e.shape).index_add_(1, index, dep.reshape(G, P * M, -1)) if needs[0] else None
    dv = v.new_zeros(v.shape).index_add_(1, index, dvp.reshape(G, P * M, -1)) if needs[1] else None
    return de, dv


_backend.register("partitioned_adaptive_matmul", "torch", torch_forward, torch_backward)


@custom_op("partitioned_adaptive_matmul")
def _partitioned(e: Tensor, v: Tensor, index: Tensor, mask: Tensor, slot: Tensor, counts: Tensor, nonempty: Tensor,
                 backend: str) -> Tuple[Tensor, Tensor]:
    return contiguous(_backend.impl("partitioned_adaptive_matmul", backend).forward(e, v, index, mask, slot, counts,
                                                                                     nonempty))


@_partitioned.register_fake
def _(e, v, index, mask, slot, counts, nonempty, backend):
    P, M = mask.shape
    return empty_like(v), v.new_empty(v.shape[0], P, M, v.shape[-1])


@custom_op("partitioned_adaptive_matmul_backward")
def _partitioned_backward(dout: Tensor, e: Tensor, v: Tensor, index: Tensor, mask: Tensor, slot: Tensor,
                          counts: Tensor, nonempty: Tensor, outp: Tensor, backend: str,
                          needs: List[bool]) -> List[Tensor]:
    grads = _backend.impl("partitioned_adaptive_matmul", backend).backward(
        dout, e, v, index, mask, slot, counts, nonempty, outp, needs)
    return [g.contiguous() for g, n in zip(grads, needs) if n]


@_partitioned_backward.register_fake
def _(dout, e, v, index, mask, slot, counts, nonempty, outp, backend, needs):
    return [empty_like(t) for t, n in zip((e, v), needs) if n]


def _setup(ctx, inputs, output):
    e, v, index, mask, slot, counts, nonempty, backend = inputs
    ctx.save_for_backward(e, v, index, mask, slot, counts, nonempty, output[1])
    ctx.backend = backend


def _backward(ctx, dout, doutp):
    e, v, index, mask, slot, counts, nonempty, outp = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:2]]
    grads = iter(_partitioned_backward(dout.contiguous(), e, v, index, mask, slot, counts, nonempty, outp,
                                       ctx.backend, needs))
    return (*(next(grads) if n else None for n in needs), None, None, None, None, None, None)


_partitioned.register_autograd(_backward, setup_context=_setup)
