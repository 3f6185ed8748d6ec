"""HimNet: the full model, drop-in for the original (same constructor, state_dict, forward)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .. import _backend
from .._checks import check_tensor
from ..ops._common import custom_op
from ..ops.graph import AdaptiveGraph
from ..ops.partitioned_adaptive import check_partition_options
from .gcru import HimDecoder, HimEncoder, encode_pair


def _check_4d(name: str, t, b: Optional[int], min_steps: int, n: int, c: int, what: str) -> None:
    check_tensor(name, t, 4)
    bad = (b is not None and t.shape[0] != b) or t.shape[1] < min_steps or t.shape[2] != n or t.shape[3] != c
    if bad:
        bb = "B" if b is None else f"B={b}"
        raise ValueError(f"{name} must have shape ({bb}, {what}>={min_steps}, N={n}, {c}), got {tuple(t.shape)}")


class HimNet(nn.Module):
    """Heterogeneity-informed meta-parameter network (Dong et al., KDD 2024).

    Constructor arguments and parameter names equal the original, so an original
    ``state_dict`` loads with ``strict=True``. Keyword-only extras:

    * ``backend``: None/"auto", "torch", "triton" or "cuda" for every op.
    * ``dense_graph``: True/False forces/forbids materialising the adaptive graphs; None
      decides by size (see :class:`~himnet_fast.ops.AdaptiveGraph`).
    * ``check_inputs``: validate the time features on every eager call (:meth:`validate_inputs`,
      one host synchronisation); on by default. Where a step must not synchronise -- inside
      ``torch.compile``, during CUDA-graph capture, and in the trainer, which validates its data
      where the batches are made -- the check is skipped; out-of-range indices are clamped
      then, so a bad value can never become a device-side assert.
    * ``in_steps``: when set, ``x`` must have exactly this many steps (the history the model
      was trained on; a shorter window would silently give a different forecast). None (the
      default, as the original) accepts any length. :meth:`from_checkpoint` and the trainer
      set it to 12.
    * ``partition``: a :class:`~himnet_fast.partition.Partition` of the N nodes (from
      ``himnet_fast.partition.partition_graph``, also in ``himnet_fast.sba``) makes both
      adaptive graphs (the encoders' and the decoder's per-sample one) partitioned:
      ``softmax(relu(E Eᵀ))`` inside each part plus pooled inter-part terms
      (:mod:`himnet_fast.ops.partitioned_adaptive`, docs/sba.md), O(N·(M+P)) per product
      instead of O(N²). Torch backend only; not in the ``state_dict``. None (default)
      is the exact graph of the original.

    float64 inputs are cast to the parameters' dtype (numpy data arrive as float64); other
    dtypes must match the parameters (or run under ``torch.autocast``).

    Load a run of ``himnet-fast train`` with ``HimNet.from_checkpoint("runs/LOSLOOP/best.pt")``.
    """

    def __init__(self, num_nodes, input_dim=3, output_dim=1, out_steps=12, hidden_dim=64, num_layers=1,
                 cheb_k=2, ycov_dim=2, tod_embedding_dim=8, dow_embedding_dim=8, node_embedding_dim=16,
                 st_embedding_dim=16, tf_decay_steps=4000, use_teacher_forcing=True, *,
                 backend: Optional[str] = None, dense_graph: Optional[bool] = None, check_inputs: bool = True,
                 in_steps: Optional[int] = None, partition=None):
        super().__init__()
        if partition is not None:
            check_partition_options(partition, num_nodes, dense_graph, backend, "dense_graph")
        self.partition = partition
        if in_steps is not None and (not isinstance(in_steps, int) or in_steps < 1):
            raise ValueError(f"in_steps must be a positive int or None, got {in_steps!r}")
        self.in_steps = in_steps
        if input_dim < 3:
            raise ValueError(f"input_dim must be >= 3 (signal, time of day, day of week), got {input_dim}")
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
        self.backend = _backend.check_backend_arg(backend)
        self.dense_graph = dense_graph
        self.check_inputs = check_inputs

        # Creation order equals the original's: the same seed gives the same initial weights.
        self.encoder_s = HimEncoder(num_nodes, input_dim, hidden_dim, cheb_k, num_layers, node_embedding_dim,
                                    meta_axis="S", backend=backend)
        self.encoder_t = HimEncoder(num_nodes, input_dim, hidden_dim, cheb_k, num_layers,
                                    tod_embedding_dim + dow_embedding_dim, meta_axis="T", backend=backend)
        self.decoder = HimDecoder(num_nodes, output_dim + ycov_dim, hidden_dim, cheb_k, num_layers,
                                  st_embedding_dim, backend=backend)
        self.out_proj = nn.Linear(hidden_dim, output_dim)
        self.tod_embedding = nn.Embedding(288, tod_embedding_dim)
        self.dow_embedding = nn.Embedding(7, dow_embedding_dim)
        self.node_embedding = nn.init.xavier_normal_(nn.Parameter(torch.empty(num_nodes, node_embedding_dim)))
        self.st_proj = nn.Linear(hidden_dim, st_embedding_dim)

    @classmethod
    def from_checkpoint(cls, path: str, *, map_location="cpu", backend: Optional[str] = None) -> "HimNet":
        """Load a model saved by ``himnet-fast train`` (``best.pt``: the best validation model;
        ``checkpoint.pt``: the latest) or a bare ``state_dict`` of the original HimNet (sizes
        inferred from its shapes). Returns the model in eval mode, with ``in_steps`` = 12 and,
        for a himnet_fast checkpoint, ``model.scaler`` (a
        :class:`~himnet_fast.data.StandardScaler`: ``scaler.transform(raw)`` gives
        ``x[..., 0]``) and ``model.checkpoint_info`` (dataset name, nodes, steps, scaler and
        ``residual``: whether the output is the change from the last input step, as the
        small CPU preset trains it). The raw-unit forecast is
        ``himnet_fast.training.to_forecast(model(x, y_cov), x, model.scaler, info["residual"])``.
        The file is read with ``weights_only=True``: it cannot run code.

        >>> from himnet_fast.training import to_forecast                    # doctest: +SKIP
        >>> model = HimNet.from_checkpoint("runs/LOSLOOP/best.pt")          # doctest: +SKIP
        >>> y = to_forecast(model(x, y_cov), x, model.scaler, model.checkpoint_info["residual"])  # doctest: +SKIP
        """
        from .. import checkpoint as ckpt
        from ..data.series import StandardScaler

        state = ckpt.load(path, map_location=map_location)
        if ckpt.is_training_checkpoint(state):
            config, weights, meta = dict(state["config"]["model"]), state["model"], dict(state["data"])
            meta["residual"] = bool(state["config"].get("residual", False))
        elif ckpt.is_raw_state_dict(state):
            config, weights, meta = ckpt.infer_model_config(state), state, {"in_steps": 12, "residual": False}
        else:
            raise ValueError(f"{path}: neither a himnet_fast training checkpoint (best.pt / checkpoint.pt) nor a "
                             f"state_dict of HimNet")
        model = cls(**config, backend=backend, in_steps=int(meta.get("in_steps", 12)))
        model.load_state_dict(weights, strict=True)
        model.scaler = StandardScaler(meta["scaler_mean"], meta["scaler_std"]) if "scaler_mean" in meta else None
        model.checkpoint_info = meta
        return model.eval()

    def capture(self, batch_size: int, **kwargs):
        """Capture the whole inference forward for a fixed batch size as a CUDA graph.

        Returns a callable ``f(x, y_cov) -> (B, out_steps, N, output_dim)`` that replays the
        graph (see :mod:`himnet_fast.nn.capture` for the details and limits).
        """
        from .capture import CapturedHimNet

        return CapturedHimNet(self, batch_size, **kwargs)

    def compute_sampling_threshold(self, batches_seen):
        return self.tf_decay_steps / (self.tf_decay_steps + np.exp(batches_seen / self.tf_decay_steps))

    def _check_shapes(self, x, y_cov, labels, batches_seen, teacher_forcing=None) -> None:
        """Shapes and required arguments: host metadata only, no synchronisation."""
        _check_4d("x", x, None, 1, self.num_nodes, self.input_dim, "T")
        if self.in_steps is not None and x.shape[1] != self.in_steps:
            raise ValueError(f"x must have in_steps={self.in_steps} time steps (the history this model was trained "
                             f"on), got {x.shape[1]} (shape {tuple(x.shape)})")
        B = x.shape[0]
        _check_4d("y_cov", y_cov, B, self.out_steps, self.num_nodes, self.ycov_dim, "out_steps")
        teacher = self.training and self.use_teacher_forcing
        if teacher:
            if labels is None:
                raise ValueError("labels are required in training mode with use_teacher_forcing=True "
                                 f"(shape (B={B}, out_steps={self.out_steps}, N={self.num_nodes}, "
                                 f"{self.output_dim}))")
            if batches_seen is None and teacher_forcing is None:
                raise ValueError("batches_seen (or teacher_forcing) is required in training mode with "
                                 "use_teacher_forcing=True")
        if labels is not None:
            _check_4d("labels", labels, B, self.out_steps, self.num_nodes, self.output_dim, "out_steps")
        if teacher_forcing is not None:
            if not isinstance(teacher_forcing, torch.Tensor) or teacher_forcing.dtype != torch.bool \
                    or tuple(teacher_forcing.shape) != (self.out_steps,):
                raise ValueError(f"teacher_forcing must be a bool tensor of shape (out_steps={self.out_steps},) "
                                 f"(from model.teacher_forcing_mask), got "
                                 f"{getattr(teacher_forcing, 'dtype', type(teacher_forcing).__name__)} "
                                 f"{tuple(getattr(teacher_forcing, 'shape', ()))}")

    def validate_inputs(self, x, y_cov=None, labels=None) -> None:
        """Raise ValueError for inputs the forward would reject or mis-read: shapes, and the time
        features (time of day in [0, 1), day of week in 0..6, no NaN) of the last input step of
        node 0, which index the embeddings. One host synchronisation: call it where the batch
        is made, not inside a step that must stay on the device."""
        _check_4d("x", x, None, 1, self.num_nodes, self.input_dim, "T")
        if y_cov is not None:
            _check_4d("y_cov", y_cov, x.shape[0], self.out_steps, self.num_nodes, self.ycov_dim, "out_steps")
        if labels is not None:
            _check_4d("labels", labels, x.shape[0], self.out_steps, self.num_nodes, self.output_dim, "out_steps")
        if x.shape[0] == 0:
            return
        tod, dow = x[:, -1, 0, 1], x[:, -1, 0, 2]
        bad_tod = ~((tod >= 0) & (tod < 1))
        bad_dow = ~((dow >= 0) & (dow < 7))
        flags = torch.stack([bad_tod.any(), bad_dow.any()]).tolist()
        if flags[0]:
            raise ValueError("x[..., 1] (time of day) must be a fraction of the day in [0, 1); got "
                             f"{tod[bad_tod][:4].tolist()} at the last step of node 0")
        if flags[1]:
            raise ValueError("x[..., 2] (day of week) must be in 0..6; got "
                             f"{dow[bad_dow][:4].tolist()} at the last step of node 0")

    def teacher_forcing_mask(self, batches_seen: int, device=None) -> torch.Tensor:
        """(out_steps,) bool on ``device``: the decoder steps whose next input is the label, not
        the forecast.

        The coins come from numpy's global RNG, one per step, compared with
        ``tf_decay_steps / (tf_decay_steps + exp(batches_seen / tf_decay_steps))``: the draws the
        original makes one after each decoder step, made here all at once before the decoder
        runs (nothing else draws in between, so they are the same numbers in the same order).
        It is the op ``himnet_fast::teacher_forcing_mask``: ``torch.compile`` keeps it whole
        (the coins are drawn when the compiled step runs, not when it is traced). On a GPU the
        mask is copied from pinned memory without blocking: no synchronisation."""
        like = torch.empty(0, device=torch.device("cpu" if device is None else device))
        return _teacher_forcing_mask(like, int(batches_seen), self.out_steps, float(self.tf_decay_steps))

    def time_embedding(self, x):
        """(B, tod_dim + dow_dim) from the last input step of node 0, as the original."""
        tod, dow = x[:, -1, 0, 1], x[:, -1, 0, 2]
        # Clamped: an unchecked out-of-range value (check_inputs off) must not become a device-side
        # assert; valid values are unchanged.
        tod_i = (tod * 288).long().clamp(0, self.tod_embedding.num_embeddings - 1)
        dow_i = dow.long().clamp(0, self.dow_embedding.num_embeddings - 1)
        return torch.cat([self.tod_embedding(tod_i), self.dow_embedding(dow_i)], dim=-1)

    def forward(self, x, y_cov, labels=None, batches_seen=None, *, teacher_forcing=None):
        """x (B, T, N, input_dim), y_cov (B, out_steps, N, ycov_dim),
        labels (B, out_steps, N, output_dim) -> (B, out_steps, N, output_dim).

        In training mode with teacher forcing, the decoder's coins are drawn from numpy's
        global RNG before it runs (:meth:`teacher_forcing_mask`, from ``batches_seen``), or
        given as ``teacher_forcing`` (that mask, on the device: what a captured or compiled
        step passes, since it cannot draw on the host)."""
        pdtype = self.out_proj.weight.dtype
        if pdtype != torch.float64:  # numpy arrays arrive as float64: cast rather than fail deep in a matmul
            x, y_cov, labels = (t.to(pdtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float64 else t
                                for t in (x, y_cov, labels))
        self._check_shapes(x, y_cov, labels, batches_seen, teacher_forcing)
        if self.check_inputs and not _on_device_only():
            self.validate_inputs(x)
        teacher = self.training and self.use_teacher_forcing
        if teacher and teacher_forcing is None:
            teacher_forcing = _teacher_forcing_mask(x, batches_seen, self.out_steps, float(self.tf_decay_steps))
        t_emb = self.time_embedding(x)

        graph = AdaptiveGraph(self.node_embedding, dense=self.dense_graph, backend=self.backend,
                              partition=self.partition)
        # (h_s + h_t)[:, -1] of the original, from the encoders' last states directly: no
        # gradient then flows through the stacked (B, T, N, H) outputs.
        # Both encoders read x over the same graph: each layer's two cells run as one op.
        last_s, last_t = encode_pair(self.encoder_s, self.encoder_t, x, graph, self.node_embedding, t_emb)
        h_last = last_s[-1] + last_t[-1]

        st_embedding = self.st_proj(h_last)
        weights = self.decoder.weights(st_embedding, h_last)  # once per forward, not per step
        graph_st = AdaptiveGraph(st_embedding, dense=self.dense_graph, backend=self.backend,
                                 partition=self.partition).cast(weights[0].wgh.dtype)

        # Every layer starts from h_last; on the steps the coins drew, the label replaces the
        # forecast as the next input.
        return self.decoder.run(h_last, y_cov[:, :self.out_steps], labels if teacher else None,
                                teacher_forcing if teacher else None, graph_st, weights, self.out_proj)

    def forecast(self, history, timestamps=None, **kwargs):
        """The forecast after the last row of ``history``, in the units of the readings.

        ``history`` (T, N): raw readings (NaN where missing) covering at least the last
        ``in_steps`` steps; ``timestamps`` (T,): their times. Returns ``(values (out_steps, N),
        timestamps (out_steps,))`` (:class:`~himnet_fast.data.Forecast`). For a model from
        :meth:`from_checkpoint`: the scaler, residual output, step and missing-value fill come
        from the checkpoint; ``kwargs`` (see :func:`himnet_fast.data.forecast`) override them.

        >>> model = HimNet.from_checkpoint("runs/LOSLOOP/best.pt")               # doctest: +SKIP
        >>> values, times = model.forecast(speeds[-288:], stamps[-288:])         # doctest: +SKIP
        """
        from ..data.forecast import forecast

        return forecast(self, history, timestamps, **kwargs)


def _on_device_only() -> bool:
    """Whether the code runs where it must not synchronise with the host: traced by
    ``torch.compile`` or recorded into a CUDA graph."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@custom_op("teacher_forcing_mask")
def _teacher_forcing_mask(like: torch.Tensor, batches_seen: int, steps: int, decay: float) -> torch.Tensor:
    """(steps,) bool on ``like``'s device: numpy coins below the sampling threshold (a host op:
    it reads and advances numpy's global RNG each time it runs)."""
    coins = np.random.uniform(0, 1, size=steps)  # the global numpy RNG, as the original
    mask = torch.from_numpy(coins < decay / (decay + np.exp(batches_seen / decay)))
    if like.device.type == "cuda":
        return mask.pin_memory().to(like.device, non_blocking=True)
    return mask.to(like.device)


@_teacher_forcing_mask.register_fake
def _(like, batches_seen, steps, decay):
    return torch.empty(steps, dtype=torch.bool, device=like.device)
