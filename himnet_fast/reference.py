"""The original HimNet algorithm, step by step: the yardstick for tests and benchmarks.

This follows the published reference implementation (XDZhelheim/HimNet, KDD 2024) operation
for operation: dense Chebyshev supports including the identity, weights generated as full
tensors (B×N×I×O for the decoder), the "S" weights rebuilt at every step and cell call.
It is deliberately slow and memory-hungry; do not "fix" it, it is what we measure against.
The SBA ops have their references here too, dense and from their definitions (memory
quadratic in the node count: small graphs only).
Parameter names, shapes and initialisation order equal the original, so a state_dict moves
between this model, the original and :class:`himnet_fast.HimNet` with ``strict=True``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

__all__ = ["RefHimGCN", "RefHimGCRU", "RefHimEncoder", "RefHimDecoder", "RefHimNet",
           "ref_meta_linear", "ref_adaptive_propagate", "ref_adaptive_graph", "block_attention_reference",
           "partitioned_adaptive_graph_reference"]


def ref_adaptive_graph(embedding: torch.Tensor) -> torch.Tensor:
    if embedding.dim() == 2:
        return torch.softmax(torch.relu(embedding @ embedding.T), dim=-1)
    return torch.softmax(torch.relu(torch.einsum("bnc,bmc->bnm", embedding, embedding)), dim=-1)


def ref_supports(support: torch.Tensor, cheb_k: int) -> list:
    """[T_0 = I, T_1 = A, T_k = 2 A T_{k-1} - T_{k-2}] as dense matrices (as the original)."""
    if support.dim() == 2:
        eye = torch.eye(support.shape[0], device=support.device, dtype=support.dtype)
    else:
        eye = torch.eye(support.shape[1], device=support.device,
                        dtype=support.dtype).repeat(support.shape[0], 1, 1)
    graphs = [eye, support]
    for _ in range(2, cheb_k):
        graphs.append(torch.matmul(2 * support, graphs[-1]) - graphs[-2])
    return graphs


def ref_adaptive_propagate(x: torch.Tensor, embedding: torch.Tensor, cheb_k: int = 2) -> torch.Tensor:
    return _ref_propagate_support(x, ref_adaptive_graph(embedding), cheb_k)


def _ref_propagate_support(x, support, cheb_k):
    eq = "nm,bmc->bnc" if support.dim() == 2 else "bnm,bmc->bnc"
    return torch.cat([torch.einsum(eq, g, x) for g in ref_supports(support, cheb_k)], dim=-1)


def ref_meta_linear(x, query, weight_pool, bias_pool=None, axis="ST"):
    axis = axis.upper()
    if axis == "T":
        w = torch.einsum("bd,dio->bio", query, weight_pool)
        y = torch.einsum("bni,bio->bno", x, w)
        b = None if bias_pool is None else torch.matmul(query, bias_pool)[:, None, :]
    elif axis == "S":
        w = torch.einsum("nd,dio->nio", query, weight_pool)
        y = torch.einsum("bni,nio->bno", x, w)
        b = None if bias_pool is None else torch.matmul(query, bias_pool)
    else:
        w = torch.einsum("bnd,dio->bnio", query, weight_pool)
        y = torch.einsum("bni,bnio->bno", x, w)
        b = None if bias_pool is None else torch.einsum("bnd,do->bno", query, bias_pool)
    return y if b is None else y + b


class RefHimGCN(nn.Module):
    def __init__(self, input_dim, output_dim, cheb_k, embed_dim, meta_axis=None):
        super().__init__()
        self.cheb_k = cheb_k
        self.meta_axis = meta_axis.upper() if meta_axis else None
        if meta_axis:
            self.weights_pool = nn.init.xavier_normal_(
                nn.Parameter(torch.FloatTensor(embed_dim, cheb_k * input_dim, output_dim)))
            self.bias_pool = nn.init.xavier_normal_(nn.Parameter(torch.FloatTensor(embed_dim, output_dim)))
        else:
            self.weights = nn.init.xavier_normal_(nn.Parameter(torch.FloatTensor(cheb_k * input_dim, output_dim)))
            self.bias = nn.init.constant_(nn.Parameter(torch.FloatTensor(output_dim)), val=0)

    def forward(self, x, support, embeddings):
        x_g = _ref_propagate_support(x, support, self.cheb_k)
        if self.meta_axis:
            return ref_meta_linear(x_g, embeddings, self.weights_pool, self.bias_pool, self.meta_axis)
        return torch.einsum("bni,io->bno", x_g, self.weights) + self.bias


class RefHimGCRU(nn.Module):
    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, embed_dim, meta_axis="S"):
        super().__init__()
        self.num_nodes = num_nodes
        self.hidden_dim = output_dim
        self.gate = RefHimGCN(input_dim + self.hidden_dim, 2 * output_dim, cheb_k, embed_dim, meta_axis)
        self.update = RefHimGCN(input_dim + self.hidden_dim, output_dim, cheb_k, embed_dim, meta_axis)

    def forward(self, x, state, support, embeddings):
        input_and_state = torch.cat((x, state), dim=-1)
        z_r = torch.sigmoid(self.gate(input_and_state, support, embeddings))
        z, r = torch.split(z_r, self.hidden_dim, dim=-1)
        candidate = torch.cat((x, z * state), dim=-1)
        hc = torch.tanh(self.update(candidate, support, embeddings))
        return r * state + (1 - r) * hc

    def init_hidden_state(self, batch_size):
        return torch.zeros(batch_size, self.num_nodes, self.hidden_dim)


class RefHimEncoder(nn.Module):
    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis="S"):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.num_layers = num_layers
        self.cells = nn.ModuleList([RefHimGCRU(num_nodes, input_dim, output_dim, cheb_k, embed_dim, meta_axis)])
        for _ in range(1, num_layers):
            self.cells.append(RefHimGCRU(num_nodes, output_dim, output_dim, cheb_k, embed_dim, meta_axis))

    def forward(self, x, support, embeddings):
        batch_size, in_steps = x.shape[0], x.shape[1]
        current_input = x
        output_hidden = []
        for cell in self.cells:
            state = cell.init_hidden_state(batch_size).to(x.device, x.dtype)
            inner_states = []
            for t in range(in_steps):
                state = cell(current_input[:, t, :, :], state, support, embeddings)
                inner_states.append(state)
            output_hidden.append(state)
            current_input = torch.stack(inner_states, dim=1)
        return current_input, output_hidden


class RefHimDecoder(nn.Module):
    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis="ST"):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.num_layers = num_layers
        self.cells = nn.ModuleList([RefHimGCRU(num_nodes, input_dim, output_dim, cheb_k, embed_dim, meta_axis)])
        for _ in range(1, num_layers):
            self.cells.append(RefHimGCRU(num_nodes, output_dim, output_dim, cheb_k, embed_dim, meta_axis))

    def forward(self, xt, init_state, support, embeddings):
        current_input = xt
        output_hidden = []
        for i in range(self.num_layers):
            state = self.cells[i](current_input, init_state[i], support, embeddings)
            output_hidden.append(state)
            current_input = state
        return current_input, output_hidden


class RefHimNet(nn.Module):
    def __init__(self, num_nodes, input_dim=3, output_dim=1, out_steps=12, hidden_dim=64, num_layers=1,
                 cheb_k=2, ycov_dim=2, tod_embedding_dim=8, dow_embedding_dim=8, node_embedding_dim=16,
                 st_embedding_dim=16, tf_decay_steps=4000, use_teacher_forcing=True):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.out_steps = out_steps
        self.num_layers = num_layers
        self.cheb_k = cheb_k
        self.ycov_dim = ycov_dim
        self.node_embedding_dim = node_embedding_dim
        self.st_embedding_dim = st_embedding_dim
        self.tod_embedding_dim = tod_embedding_dim
        self.dow_embedding_dim = dow_embedding_dim
        self.tf_decay_steps = tf_decay_steps
        self.use_teacher_forcing = use_teacher_forcing

        self.encoder_s = RefHimEncoder(num_nodes, input_dim, hidden_dim, cheb_k, num_layers,
                                       node_embedding_dim, meta_axis="S")
        self.encoder_t = RefHimEncoder(num_nodes, input_dim, hidden_dim, cheb_k, num_layers,
                                       tod_embedding_dim + dow_embedding_dim, meta_axis="T")
        self.decoder = RefHimDecoder(num_nodes, output_dim + ycov_dim, hidden_dim, cheb_k, num_layers,
                                     st_embedding_dim)
        self.out_proj = nn.Linear(hidden_dim, output_dim)
        self.tod_embedding = nn.Embedding(288, tod_embedding_dim)
        self.dow_embedding = nn.Embedding(7, dow_embedding_dim)
        self.node_embedding = nn.init.xavier_normal_(nn.Parameter(torch.empty(num_nodes, node_embedding_dim)))
        self.st_proj = nn.Linear(hidden_dim, st_embedding_dim)

    def compute_sampling_threshold(self, batches_seen):
        return self.tf_decay_steps / (self.tf_decay_steps + np.exp(batches_seen / self.tf_decay_steps))

    def forward(self, x, y_cov, labels=None, batches_seen=None):
        tod = x[:, -1, 0, 1]
        dow = x[:, -1, 0, 2]
        tod_emb = self.tod_embedding((tod * 288).long())
        dow_emb = self.dow_embedding(dow.long())
        time_embedding = torch.cat([tod_emb, dow_emb], dim=-1)

        support = torch.softmax(torch.relu(self.node_embedding @ self.node_embedding.T), dim=-1)
        h_s, _ = self.encoder_s(x, support, self.node_embedding)
        h_t, _ = self.encoder_t(x, support, time_embedding)
        h_last = (h_s + h_t)[:, -1, :, :]

        st_embedding = self.st_proj(h_last)
        support = torch.softmax(torch.relu(torch.einsum("bnc,bmc->bnm", st_embedding, st_embedding)), dim=-1)

        ht_list = [h_last] * self.num_layers
        go = torch.zeros((x.shape[0], self.num_nodes, self.output_dim), device=x.device, dtype=x.dtype)
        out = []
        for t in range(self.out_steps):
            h_de, ht_list = self.decoder(torch.cat([go, y_cov[:, t, ...]], dim=-1), ht_list, support,
                                         st_embedding)
            go = self.out_proj(h_de)
            out.append(go)
            if self.training and self.use_teacher_forcing:
                c = np.random.uniform(0, 1)
                if c < self.compute_sampling_threshold(batches_seen):
                    go = labels[:, t, ...]
        return torch.stack(out, dim=1)


# --------------------------------------------------------------------------- SBA

def block_attention_reference(q, k, v, mask=None, scale=None):
    """Dense step-by-step reference: full (B, P*M, P*M) scores with a block-diagonal mask.

    Used by the tests only; memory is quadratic in P*M.
    """
    B, P, M, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if mask is None:
        mask = torch.ones(P, M, dtype=torch.bool, device=q.device)
    mask = (mask.unsqueeze(0) if mask.dim() == 2 else mask).expand(B, P, M).reshape(B, P * M)
    part = torch.arange(P, device=q.device).repeat_interleave(M)
    allowed = (part[:, None] == part[None, :]).unsqueeze(0) & mask[:, None, :] & mask[:, :, None]
    qf, kf, vf = (t.reshape(B, P * M, -1) for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    rows_ok = allowed.any(-1, keepdim=True)
    s = torch.where(rows_ok, s, torch.zeros_like(s))          # avoid softmax of all -inf
    p = torch.softmax(s, -1) * rows_ok
    return (p @ vf).reshape(B, P, M, -1)


def partitioned_adaptive_graph_reference(embedding: torch.Tensor, partition) -> torch.Tensor:
    """The partitioned operator of a :class:`~himnet_fast.partition.Partition` as a dense matrix,
    built row by row from its definition: (N, N) for E (N, D), (B, N, N) for E (B, N, D).
    O(N²): for tests at small N only.

    Row ``i`` (part ``p``): softmax over ``[relu(e_i·e_j) for j in p] + [relu(e_i·ē_q) for
    non-empty q != p]``; entry ``j`` in ``p`` gets ``a_ij``, every node of part ``q`` gets
    ``a_iq / |q|`` (the weight of the pooled value ``v̄_q``).
    """
    if partition.num_nodes != embedding.shape[-2]:
        raise ValueError(f"partition covers {partition.num_nodes} nodes, the embedding {embedding.shape[-2]}")
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
