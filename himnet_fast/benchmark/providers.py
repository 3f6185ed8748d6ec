"""What the benchmarks run: the whole model and the single ops, per provider.

Providers (measured side by side in one run):

* ``reference``: :mod:`himnet_fast.reference`, the original algorithm, eager.
* ``reference-compile``: the same under ``torch.compile`` (teacher forcing on in train mode:
  its host-side coin flips break the compiled graph at every decoder step).
* ``reference-compile-notf``: ``torch.compile`` of the whole original model built with
  ``use_teacher_forcing=False``, so it compiles without graph breaks (what a user compiling
  the original for memory would run); its agreement check uses the reference without teacher
  forcing too.
* ``torch``: ``HimNet(backend="torch")`` / the ops with ``backend="torch"``.
* ``torch-compile``: the torch backend under ``torch.compile``.
* ``triton``, ``cuda``: the fused kernels (GPU; skipped with a reason elsewhere).
* ``captured``, ``captured-tf32``, ``captured-bf16`` (the model only, GPU): ``HimNet`` with the
  automatic backend, its training step as one CUDA graph (:class:`~himnet_fast.training.captured.
  CapturedTrainStep`: forward, L1 loss, backward, clipping and a capturable Adam step at learning
  rate 0, so the model stays fixed across replays) and its inference as one
  (:meth:`HimNet.capture`); fp32 exact, fp32 with TF32 matmuls, bf16 autocast. Their agreement
  check runs the same module eagerly in the same precision. ``captured-triton``,
  ``captured-triton-tf32``, ``captured-triton-bf16``: the same with ``backend="triton"`` (the
  fused recurrent step, both encoders as one launch per kernel).
* ``flex`` (propagation ops only): PyTorch's FlexAttention, compiled, ``score_mod = relu``,
  ``scale = 1.0``: ``softmax(relu(E Eᵀ)) @ v`` is attention with query = key = E.

Kernels ("what"): ``himnet`` (modes ``train`` = forward + backward of an L1 loss with teacher
forcing, ``infer`` = eval forward without grad) and the ops ``meta_linear_st`` (the decoder
gate's meta-linear), ``adaptive_propagate`` (static graph, encoder shapes) and
``adaptive_propagate_st`` (per-sample graph, decoder shapes), each in modes ``forward``,
``backward`` and ``full``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..presets import Preset

CAPTURED = ("captured", "captured-tf32", "captured-bf16", "captured-triton", "captured-triton-tf32",
            "captured-triton-bf16")
MODEL_PROVIDERS = ("reference", "reference-compile", "reference-compile-notf", "torch", "torch-compile",
                   "triton", "cuda") + CAPTURED
NO_TF = "-notf"  # suffix: the model is built with use_teacher_forcing=False
OP_PROVIDERS = MODEL_PROVIDERS + ("flex",)
OPS = ("meta_linear_st", "adaptive_propagate", "adaptive_propagate_st")
MODEL = "himnet"
MODEL_MODES = ("train", "infer")
OP_MODES = ("forward", "backward", "full")
IN_STEPS = 12
INPUT_DIM, OUTPUT_DIM, YCOV_DIM, CHEB_K = 3, 1, 2, 2
BATCHES_SEEN = 100  # fixed, so the teacher-forcing threshold (and a compiled graph) is constant


def default_providers(device: torch.device) -> List[str]:
    """On a GPU everything; on CPU the providers that are both runnable and meaningful there
    (the fused kernels are skipped with a reason row; torch-compile and flex on request)."""
    if device.type == "cuda":
        return list(OP_PROVIDERS)
    return ["reference", "reference-compile", "torch", "triton", "cuda"]


def unavailable_reason(provider: str, device: torch.device, what: str) -> Optional[str]:
    """Why ``provider`` cannot measure ``what`` on ``device``, or None."""
    if provider not in OP_PROVIDERS:
        return f"unknown provider {provider!r}; expected one of {OP_PROVIDERS}"
    if provider == "flex":
        if what not in ("adaptive_propagate", "adaptive_propagate_st"):
            return "FlexAttention computes only the propagation ops"
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        return None
    if provider.endswith(NO_TF) and what != MODEL:
        return "teacher forcing concerns the whole model only"
    if provider in CAPTURED:
        if what != MODEL:
            return "CUDA-graph capture is of the whole model's step"
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if "-triton" in provider:
            from .. import _backend
            return _backend.unavailable_reason("gcru_gate", "triton", device)
        return None
    if "-compile" in provider and not hasattr(torch, "compile"):
        return "torch.compile is not available"
    if provider in ("triton", "cuda"):
        if provider == "triton" and device.type == "cpu":
            return ("Triton runs on CPU only in the interpreter (TRITON_INTERPRET=1), a correctness "
                    "tool, not a performance measurement")
        from .. import _backend

        needed = {"meta_linear_st": ("meta_linear",), "adaptive_propagate": ("adaptive_matmul",),
                  "adaptive_propagate_st": ("adaptive_matmul",)}
        for op in needed.get(what, ("meta_linear", "adaptive_matmul", "gcru_gate", "gcru_update")):
            reason = _backend.unavailable_reason(op, provider, device)
            if reason:
                return f"{op}: {reason}"
    return None


# --------------------------------------------------------------------------- the model

def model_inputs(preset: Preset, num_nodes: int, batch: int, device: torch.device, seed: int = 0) -> Dict:
    """Synthetic inputs of the real shapes: x (B, 12, N, 3) with valid time features,
    y_cov (B, 12, N, 2), labels (B, 12, N, 1)."""
    g = torch.Generator().manual_seed(seed)
    spd = preset.steps_per_day
    start = torch.randint(0, 7 * spd, (batch, 1), generator=g)
    t_in = start + torch.arange(IN_STEPS)            # (B, 12) absolute 5-minute step index
    t_out = t_in[:, -1:] + 1 + torch.arange(IN_STEPS)

    def time_feats(t):
        tod = ((t % spd).float() / spd)[:, :, None].expand(-1, -1, num_nodes)
        dow = ((t // spd) % 7).float()[:, :, None].expand(-1, -1, num_nodes)
        return tod, dow

    tod, dow = time_feats(t_in)
    x = torch.stack([torch.randn(batch, IN_STEPS, num_nodes, generator=g), tod, dow], dim=-1)
    tod_o, dow_o = time_feats(t_out)
    y_cov = torch.stack([tod_o, dow_o], dim=-1)
    labels = torch.randn(batch, IN_STEPS, num_nodes, OUTPUT_DIM, generator=g)
    return {k: v.contiguous().to(device) for k, v in (("x", x), ("y_cov", y_cov), ("labels", labels))}


def build_module(provider: str, preset: Preset, num_nodes: int, device: torch.device,
                 seed: int = 0) -> torch.nn.Module:
    """The eager module behind ``provider`` (reference or himnet_fast), seeded."""
    kwargs = preset.model_kwargs(num_nodes)
    if provider.endswith(NO_TF):
        kwargs["use_teacher_forcing"] = False
        provider = provider[:-len(NO_TF)]
    torch.manual_seed(seed)
    if provider.startswith("reference"):
        from ..reference import RefHimNet

        return RefHimNet(**kwargs).to(device)
    from ..nn import HimNet

    if provider in CAPTURED:
        backend = "triton" if "-triton" in provider else None
    else:
        backend = provider.replace("-compile", "")
    return HimNet(**kwargs, backend=backend).to(device)


def maybe_compile(provider: str, fn):
    return torch.compile(fn) if "-compile" in provider else fn


def model_step(model, params: List[torch.Tensor], inputs: Dict, mode: str) -> Callable[[], torch.Tensor]:
    """A closure running one ``train`` step (forward + backward, grads reset) or one ``infer``
    forward; it returns the output."""
    x, y_cov, labels = inputs["x"], inputs["y_cov"], inputs["labels"]
    if mode == "train":
        def step():
            for p in params:
                p.grad = None
            np.random.seed(0)  # the teacher-forcing draws (global numpy RNG, as the original)
            out = model(x, y_cov, labels, BATCHES_SEEN)
            (out - labels).abs().mean().backward()
            return out
        return step
    if mode == "infer":
        def infer():
            with torch.no_grad():
                return model(x, y_cov)
        return infer
    raise ValueError(f"mode must be one of {MODEL_MODES} for the model, got {mode!r}")


def precision(provider: str):
    """The context a provider's job runs in: TF32 matmuls for ``captured[-triton]-tf32``, bf16
    autocast for ``captured[-triton]-bf16`` (no weight cache: a captured graph must not hold its
    casts), else none."""
    import contextlib

    if provider in CAPTURED and provider.endswith("-bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    if provider in CAPTURED and provider.endswith("-tf32"):
        return _tf32()
    return contextlib.nullcontext()


def _tf32():
    import contextlib

    @contextlib.contextmanager
    def switch():
        matmul = torch.backends.cuda.matmul
        new_api = getattr(matmul, "fp32_precision", None) is not None
        old = matmul.fp32_precision if new_api else matmul.allow_tf32
        if new_api:
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        try:
            yield
        finally:
            if new_api:
                matmul.fp32_precision = old
            else:
                matmul.allow_tf32 = old
    return switch()


def tolerance_of(provider: str) -> float:
    """The agreement tolerance of ``provider``: :func:`tolerance` in fp32; bf16 and TF32 keep
    8 and 10 mantissa bits, so their 24-step recurrences are checked at 5e-2 and 2e-2."""
    if provider in CAPTURED and provider.endswith("-bf16"):
        return 5e-2
    if provider in CAPTURED and provider.endswith("-tf32"):
        return 2e-2
    return tolerance()


def captured_step(module, inputs: Dict, mode: str, provider: str) -> Callable[[], torch.Tensor]:
    """The provider's timed call for a captured provider: a :class:`CapturedTrainStep` replay
    (train; the first call captures) or a :class:`CapturedHimNet` replay (infer)."""
    x, y_cov, labels = inputs["x"], inputs["y_cov"], inputs["labels"]
    bf16 = provider.endswith("-bf16")
    if mode == "infer":
        forecast = module.capture(x.shape[0], autocast_dtype=torch.bfloat16 if bf16 else None)
        return lambda: forecast(x, y_cov, clone=False)
    from ..training.captured import CapturedTrainStep

    module.check_inputs = False  # the inputs are valid by construction; the graph cannot check them
    mask = module.teacher_forcing_mask(BATCHES_SEEN, x.device)

    def loss_fn(model, x, y_cov, labels, teacher_forcing):
        with precision(provider):
            out = model(x, y_cov, labels, teacher_forcing=teacher_forcing)
        return (out.float() - labels).abs().mean()
    opt = torch.optim.Adam(module.parameters(), lr=torch.tensor(0.0, device=x.device), capturable=True)
    step = CapturedTrainStep(module, opt, loss_fn, x.shape[0], clip_grad_norm=5.0)
    return lambda: step(x, y_cov, labels, mask, clone=False)


def set_mode(module: torch.nn.Module, mode: str) -> None:
    module.train(mode == "train")
    for p in module.parameters():
        p.requires_grad_(mode == "train")


def model_flops(preset: Preset, num_nodes: int, batch: int, mode: str) -> float:
    """Algorithmic matmul FLOPs of one forward (x1) or training step (x3) of the lean
    formulation: propagations ``A v`` and the meta-linears (the "ST" one reassociated), the
    same count for every provider (like MFU; elementwise work is not counted)."""
    n, b, h = num_nodes, batch, preset.hidden_dim

    def cell(c: int, d: int, st: bool, steps: int) -> float:
        width = c + h
        prop = 2.0 * (CHEB_K - 1) * n * n * b * width * 2          # gate and update inputs
        lin = 2.0 * b * n * CHEB_K * width * 3 * h * (d if st else 1)
        return steps * (prop + lin)

    fwd = cell(INPUT_DIM, preset.node_embedding_dim, False, IN_STEPS)
    fwd += cell(INPUT_DIM, preset.tod_embedding_dim + preset.dow_embedding_dim, False, IN_STEPS)
    fwd += cell(OUTPUT_DIM + YCOV_DIM, preset.st_embedding_dim, True, IN_STEPS)
    fwd += 2.0 * n * n * preset.node_embedding_dim + 2.0 * b * n * n * preset.st_embedding_dim
    return fwd * (3.0 if mode == "train" else 1.0)


# --------------------------------------------------------------------------- single ops

@dataclass
class OpCase:
    """Inputs of one op at one shape, the reference output function, and cost estimates
    (algorithmic FLOPs and the minimum bytes an implementation must move, per forward)."""

    what: str
    inputs: Dict[str, torch.Tensor]
    flops: float
    bytes: float


def op_case(what: str, preset: Preset, num_nodes: int, batch: int, device: torch.device,
            seed: int = 0) -> OpCase:
    """The op at the shapes it has inside HimNet for ``preset`` with ``num_nodes`` nodes."""
    g = torch.Generator().manual_seed(seed)
    n, b, h = num_nodes, batch, preset.hidden_dim

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    if what == "meta_linear_st":
        d, i, o = preset.st_embedding_dim, CHEB_K * (OUTPUT_DIM + YCOV_DIM + h), 2 * h
        inputs = dict(x=rnd(b, n, i), query=rnd(b, n, d), weight_pool=rnd(d, i, o, scale=0.05),
                      bias_pool=rnd(d, o, scale=0.05))
        flops = 2.0 * b * n * d * i * o + 2.0 * b * n * d * o
        nbytes = 4.0 * (b * n * i + b * n * d + d * i * o + d * o + b * n * o)
    elif what in ("adaptive_propagate", "adaptive_propagate_st"):
        per_sample = what.endswith("_st")
        d = preset.st_embedding_dim if per_sample else preset.node_embedding_dim
        c = (OUTPUT_DIM + YCOV_DIM + h) if per_sample else (INPUT_DIM + h)
        emb = rnd(b, n, d, scale=0.3) if per_sample else rnd(n, d, scale=0.3)
        inputs = dict(x=rnd(b, n, c), embedding=emb)
        groups, width = (b, c) if per_sample else (1, b * c)
        flops = (CHEB_K - 1) * groups * (2.0 * n * n * d + 2.0 * n * n * width)
        nbytes = 4.0 * (emb.numel() + 2 * b * n * c + (CHEB_K - 1) * b * n * c)
    else:
        raise ValueError(f"unknown op {what!r}; expected one of {OPS}")
    return OpCase(what, inputs, flops, nbytes)


def _flex_propagate(x: torch.Tensor, embedding: torch.Tensor, flex) -> torch.Tensor:
    """``cat(x, softmax(relu(E Eᵀ)) @ x)`` (cheb_k = 2) through FlexAttention."""
    def relu_score(score, b, h, q_idx, kv_idx):
        return torch.relu(score)

    if embedding.dim() == 2:
        # Static graph: every sample shares E. Broadcasting it over the batch keeps the value
        # head dim at C (folding the batch into B*C value columns exceeds FlexAttention's limits).
        q = embedding.expand(x.shape[0], 1, *embedding.shape)
    else:
        q = embedding[:, None]
    ax = flex(q, q, x[:, None], score_mod=relu_score, scale=1.0)[:, 0]
    return torch.cat([x, ax], dim=-1)


def op_function(provider: str, what: str) -> Callable[..., torch.Tensor]:
    """``f(**case.inputs) -> output`` for ``provider``; compiled where the provider says so."""
    if provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)
        return lambda x, embedding: _flex_propagate(x, embedding, flex)
    if provider.startswith("reference"):
        from .. import reference as ref

        if what == "meta_linear_st":
            fn = lambda x, query, weight_pool, bias_pool: ref.ref_meta_linear(  # noqa: E731
                x, query, weight_pool, bias_pool, "ST")
        else:
            fn = lambda x, embedding: ref.ref_adaptive_propagate(x, embedding, CHEB_K)  # noqa: E731
        return maybe_compile(provider, fn)
    from .. import ops

    backend = provider.replace("-compile", "")
    if what == "meta_linear_st":
        fn = lambda x, query, weight_pool, bias_pool: ops.meta_linear(  # noqa: E731
            x, query, weight_pool, bias_pool, "ST", backend=backend)
    else:
        fn = lambda x, embedding: ops.adaptive_propagate(x, embedding, CHEB_K, backend=backend)  # noqa: E731
    return maybe_compile(provider, fn)


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(max |want|, 1e-6): one number per tensor, scale-free."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return float("inf")
    if want.numel() == 0:
        return 0.0
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def tolerance() -> float:
    """Largest accepted relative error against the reference (fp32 round-off over 24
    recurrent steps; $HIMNET_FAST_BENCH_TOL overrides)."""
    return float(os.environ.get("HIMNET_FAST_BENCH_TOL", "2e-3"))
