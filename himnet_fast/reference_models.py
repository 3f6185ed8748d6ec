"""The other models' original algorithms, step by step: yardsticks for tests and benchmarks.

* AGCRN follows the original release (LeiBAI/AGCRN, ``model/AGCN.py``, ``AGCRNCell.py``,
  ``AGCRN.py``) operation for operation: dense Chebyshev supports including the identity,
  the (N, K, I, O) per-node weights rebuilt at every step and cell call. Module names and
  parameter shapes are the original's, so a state_dict moves between this, the original and
  :class:`himnet_fast.models.AGCRN` with ``strict=True``.
* HyperST-Net (Pan et al., AAAI 2019) has no public code: the ``RefHyperST*`` classes are written
  from the paper's equations, materialising every generated weight per location as the
  paper's presentation does (``W_n = f(e_n)``), one step and one location-weight product at a
  time. Parameter names equal :mod:`himnet_fast.models.hyperst`.

Deliberately slow and memory-hungry; do not "fix" them, they are what we measure against.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RefAVWGCN", "RefAGCRNCell", "RefAVWDCRNN", "RefAGCRN", "RefHyperSTLSTMG", "RefHyperSTLSTMD",
           "RefHyperSTGCGRU"]


# --------------------------------------------------------------------------- AGCRN (original)

class RefAVWGCN(nn.Module):
    def __init__(self, dim_in, dim_out, cheb_k, embed_dim):
        super().__init__()
        self.cheb_k = cheb_k
        self.weights_pool = nn.Parameter(torch.empty(embed_dim, cheb_k, dim_in, dim_out))
        self.bias_pool = nn.Parameter(torch.empty(embed_dim, dim_out))

    def forward(self, x, node_embeddings):
        # x (B, N, C), node_embeddings (N, D) -> supports (N, N); output (B, N, dim_out)
        node_num = node_embeddings.shape[0]
        supports = F.softmax(F.relu(torch.mm(node_embeddings, node_embeddings.transpose(0, 1))), dim=1)
        support_set = [torch.eye(node_num, dtype=supports.dtype, device=supports.device), supports]
        for _ in range(2, self.cheb_k):
            support_set.append(torch.matmul(2 * supports, support_set[-1]) - support_set[-2])
        supports = torch.stack(support_set, dim=0)
        weights = torch.einsum("nd,dkio->nkio", node_embeddings, self.weights_pool)  # N, K, I, O
        bias = torch.matmul(node_embeddings, self.bias_pool)                        # N, O
        x_g = torch.einsum("knm,bmc->bknc", supports, x)                            # B, K, N, I
        x_g = x_g.permute(0, 2, 1, 3)                                               # B, N, K, I
        return torch.einsum("bnki,nkio->bno", x_g, weights) + bias


class RefAGCRNCell(nn.Module):
    def __init__(self, node_num, dim_in, dim_out, cheb_k, embed_dim):
        super().__init__()
        self.node_num = node_num
        self.hidden_dim = dim_out
        self.gate = RefAVWGCN(dim_in + self.hidden_dim, 2 * dim_out, cheb_k, embed_dim)
        self.update = RefAVWGCN(dim_in + self.hidden_dim, dim_out, cheb_k, embed_dim)

    def forward(self, x, state, node_embeddings):
        state = state.to(x.device)
        input_and_state = torch.cat((x, state), dim=-1)
        z_r = torch.sigmoid(self.gate(input_and_state, node_embeddings))
        z, r = torch.split(z_r, self.hidden_dim, dim=-1)
        candidate = torch.cat((x, z * state), dim=-1)
        hc = torch.tanh(self.update(candidate, node_embeddings))
        return r * state + (1 - r) * hc

    def init_hidden_state(self, batch_size):
        return torch.zeros(batch_size, self.node_num, self.hidden_dim)


class RefAVWDCRNN(nn.Module):
    def __init__(self, node_num, dim_in, dim_out, cheb_k, embed_dim, num_layers=1):
        super().__init__()
        assert num_layers >= 1, "At least one DCRNN layer in the Encoder."
        self.node_num = node_num
        self.input_dim = dim_in
        self.num_layers = num_layers
        self.dcrnn_cells = nn.ModuleList([RefAGCRNCell(node_num, dim_in, dim_out, cheb_k, embed_dim)])
        for _ in range(1, num_layers):
            self.dcrnn_cells.append(RefAGCRNCell(node_num, dim_out, dim_out, cheb_k, embed_dim))

    def forward(self, x, init_state, node_embeddings):
        assert x.shape[2] == self.node_num and x.shape[3] == self.input_dim
        seq_length = x.shape[1]
        current_inputs = x
        output_hidden = []
        for i in range(self.num_layers):
            state = init_state[i]
            inner_states = []
            for t in range(seq_length):
                state = self.dcrnn_cells[i](current_inputs[:, t, :, :], state, node_embeddings)
                inner_states.append(state)
            output_hidden.append(state)
            current_inputs = torch.stack(inner_states, dim=1)
        return current_inputs, output_hidden

    def init_hidden(self, batch_size):
        return torch.stack([c.init_hidden_state(batch_size) for c in self.dcrnn_cells], dim=0)


class RefAGCRN(nn.Module):
    """``RefAGCRN(num_nodes, input_dim, rnn_units, output_dim, horizon, num_layers, embed_dim,
    cheb_k)``; forward(source (B, T, N, input_dim)) -> (B, horizon, N, output_dim)."""

    def __init__(self, num_nodes, input_dim=1, rnn_units=64, output_dim=1, horizon=12, num_layers=2,
                 embed_dim=10, cheb_k=2):
        super().__init__()
        self.num_node = num_nodes
        self.input_dim = input_dim
        self.hidden_dim = rnn_units
        self.output_dim = output_dim
        self.horizon = horizon
        self.num_layers = num_layers
        self.node_embeddings = nn.Parameter(torch.randn(num_nodes, embed_dim), requires_grad=True)
        self.encoder = RefAVWDCRNN(num_nodes, input_dim, rnn_units, cheb_k, embed_dim, num_layers)
        self.end_conv = nn.Conv2d(1, horizon * output_dim, kernel_size=(1, rnn_units), bias=True)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.uniform_(p)

    def forward(self, source, targets=None, teacher_forcing_ratio=0.5):
        init_state = self.encoder.init_hidden(source.shape[0]).to(source)
        output, _ = self.encoder(source, init_state, self.node_embeddings)  # B, T, N, hidden
        output = output[:, -1:, :, :]                                       # B, 1, N, hidden
        output = self.end_conv(output)                                      # B, T*C, N, 1
        output = output.squeeze(-1).reshape(-1, self.horizon, self.output_dim, self.num_node)
        return output.permute(0, 1, 3, 2)                                   # B, T, N, C


# --------------------------------------------------------------------------- HyperST-Net (paper)
#
# Written from the paper's equations (no public code). Each generated weight is materialised per
# location, W_n = f(e_n), and applied at every step; nothing is hoisted out of the time loop.

class _RefSpatial(nn.Sequential):
    """Spatial module: e = relu(relu(a W1 + b1) W2 + b2)."""

    def __init__(self, attr_dim, spatial_dim):
        super().__init__(nn.Linear(attr_dim, spatial_dim), nn.ReLU(), nn.Linear(spatial_dim, spatial_dim), nn.ReLU())


def _ref_lstm(gates, c):
    i, f, g, o = torch.split(gates, gates.shape[-1] // 4, dim=-1)
    i, f, o, g = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
    c = f * c + i * g
    return o * torch.tanh(c), c


class _RefHyperSTBase(nn.Module):
    def __init__(self, num_nodes, attributes, input_dim, hidden_dim, output_dim, horizon, spatial_dim):
        super().__init__()
        self.num_nodes, self.input_dim, self.hidden_dim = num_nodes, input_dim, hidden_dim
        self.output_dim, self.horizon = output_dim, horizon
        self.register_buffer("attributes", attributes.detach().clone().float())
        self.spatial = _RefSpatial(attributes.shape[1], spatial_dim)

    def head_out(self, h):
        B, N, _ = h.shape
        y = self.head(h)                                                  # B, N, horizon*C
        return y.reshape(B, N, self.horizon, self.output_dim).permute(0, 2, 1, 3)

    def forward(self, source):
        """source (B, T, N, input_dim) -> (B, horizon, N, output_dim)."""
        e = self.spatial(self.attributes)                                 # N, S
        cur = source
        for cell in self.cells:
            B, T, N, _ = cur.shape
            h = torch.zeros(B, N, cell.hidden_dim, dtype=cur.dtype)
            c = torch.zeros_like(h)
            outs = []
            for t in range(T):
                h, c = cell(cur[:, t], h, c, e, self)
                outs.append(h)
            cur = torch.stack(outs, dim=1)
        return self.head_out(cur[:, -1])


class _RefLSTMGCell(nn.Module):
    def __init__(self, input_dim, hidden_dim, spatial_dim, query_dim):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.deduction = nn.Linear(spatial_dim, query_dim)
        self.weights_pool = nn.Parameter(torch.empty(query_dim, input_dim + hidden_dim, 4 * hidden_dim))
        self.bias_pool = nn.Parameter(torch.empty(query_dim, 4 * hidden_dim))

    def forward(self, x, h, c, e, model):
        q = self.deduction(e)                                             # N, D
        w = torch.einsum("nd,dio->nio", q, self.weights_pool)              # N, I+H, 4H: W_n
        b = q @ self.bias_pool                                            # N, 4H: b_n
        gates = torch.einsum("bni,nio->bno", torch.cat((x, h), -1), w) + b
        return _ref_lstm(gates, c)


class RefHyperSTLSTMG(_RefHyperSTBase):
    def __init__(self, num_nodes, attributes, input_dim=1, hidden_dim=64, output_dim=1, horizon=12,
                 num_layers=1, spatial_dim=16, query_dim=8):
        super().__init__(num_nodes, attributes, input_dim, hidden_dim, output_dim, horizon, spatial_dim)
        self.cells = nn.ModuleList([_RefLSTMGCell(input_dim if i == 0 else hidden_dim, hidden_dim, spatial_dim,
                                                  query_dim) for i in range(num_layers)])
        self.head = nn.Linear(hidden_dim, horizon * output_dim)


class _RefLSTMDCell(nn.Module):
    def __init__(self, input_dim, hidden_dim, spatial_dim):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.deduction = nn.Linear(spatial_dim, 4 * hidden_dim)
        self.weight = nn.Parameter(torch.empty(input_dim + hidden_dim, 4 * hidden_dim))
        self.bias = nn.Parameter(torch.zeros(4 * hidden_dim))

    def forward(self, x, h, c, e, model):
        z = self.deduction(e)                                             # N, 4H
        w = torch.einsum("io,no->nio", self.weight, z)                     # W_n = W' diag(z_n)
        gates = torch.einsum("bni,nio->bno", torch.cat((x, h), -1), w) + self.bias
        return _ref_lstm(gates, c)


class RefHyperSTLSTMD(_RefHyperSTBase):
    def __init__(self, num_nodes, attributes, input_dim=1, hidden_dim=64, output_dim=1, horizon=12,
                 num_layers=1, spatial_dim=16):
        super().__init__(num_nodes, attributes, input_dim, hidden_dim, output_dim, horizon, spatial_dim)
        self.cells = nn.ModuleList([_RefLSTMDCell(input_dim if i == 0 else hidden_dim, hidden_dim, spatial_dim)
                                    for i in range(num_layers)])
        self.head = nn.Linear(hidden_dim, horizon * output_dim)


class _RefHyperSTGCN(nn.Module):
    def __init__(self, dim_in, dim_out, cheb_k, spatial_dim):
        super().__init__()
        self.cheb_k = cheb_k
        self.deduction = nn.Linear(spatial_dim, dim_out)
        self.weight = nn.Parameter(torch.empty(cheb_k * dim_in, dim_out))
        self.bias = nn.Parameter(torch.zeros(dim_out))

    def forward(self, x, node_embeddings, e):
        n = node_embeddings.shape[0]
        a = F.softmax(F.relu(node_embeddings @ node_embeddings.T), dim=1)
        support_set = [torch.eye(n, dtype=a.dtype), a]
        for _ in range(2, self.cheb_k):
            support_set.append(torch.matmul(2 * a, support_set[-1]) - support_set[-2])
        x_g = torch.cat([torch.einsum("nm,bmc->bnc", s, x) for s in support_set], dim=-1)  # B, N, K*I
        z = self.deduction(e)                                             # N, O
        w = torch.einsum("io,no->nio", self.weight, z)                     # per-node W diag(z_n)
        return torch.einsum("bni,nio->bno", x_g, w) + self.bias


class _RefGCGRUCell(nn.Module):
    def __init__(self, input_dim, hidden_dim, cheb_k, spatial_dim):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gate = _RefHyperSTGCN(input_dim + hidden_dim, 2 * hidden_dim, cheb_k, spatial_dim)
        self.update = _RefHyperSTGCN(input_dim + hidden_dim, hidden_dim, cheb_k, spatial_dim)

    def forward(self, x, h, c, e, model):
        z_r = torch.sigmoid(self.gate(torch.cat((x, h), -1), model.node_embeddings, e))
        z, r = torch.split(z_r, self.hidden_dim, dim=-1)
        hc = torch.tanh(self.update(torch.cat((x, z * h), -1), model.node_embeddings, e))
        return r * h + (1 - r) * hc, c


class RefHyperSTGCGRU(_RefHyperSTBase):
    def __init__(self, num_nodes, attributes, input_dim=1, hidden_dim=64, output_dim=1, horizon=12,
                 num_layers=1, spatial_dim=16, embed_dim=10, cheb_k=2):
        super().__init__(num_nodes, attributes, input_dim, hidden_dim, output_dim, horizon, spatial_dim)
        self.node_embeddings = nn.Parameter(torch.randn(num_nodes, embed_dim))
        self.cells = nn.ModuleList([_RefGCGRUCell(input_dim if i == 0 else hidden_dim, hidden_dim, cheb_k,
                                                  spatial_dim) for i in range(num_layers)])
        self.head = nn.Linear(hidden_dim, horizon * output_dim)
