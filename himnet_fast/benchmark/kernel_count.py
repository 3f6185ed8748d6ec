"""Count the device kernels a callable would launch on a CUDA GPU, on a machine without one.

Why: the number of kernel launches of a training step is what bounds a GPU step of many small
recurrent operations (launch latency, not FLOPs), and CI has no GPU to profile it. The count
here runs on CPU in seconds, so a test can hold the model to it.

How it counts
-------------
The callable runs on **meta** tensors (shapes, strides and dtypes, no data, no compute) under
:class:`KernelCounter`, a ``TorchDispatchMode``: it sees every aten op after autograd has
decomposed the Python-level calls, forward and backward alike (run ``loss.backward()`` inside
the mode). Each device op adds the kernels its CUDA implementation launches, by the table below;
host<->device copies are counted apart as memcpys (they are not kernels).

=================================================  ==============================================
aten op                                            CUDA kernels (category)
=================================================  ==============================================
views and metadata (``is_view`` ops, reshapes,     0
``_unsafe_view``, ``empty*``, ``detach``, ...)
``mm``, ``bmm``, ``addmm(_)``, ``baddbmm(_)``      1 (gemm) plus cuBLAS's operand copies (copy):
                                                   an operand (or output) whose strides cuBLAS
                                                   cannot take is cloned first (and copied back
                                                   for the output), by the rules of ATen's
                                                   ``cuda/Blas.cpp``; ``addmm`` whose bias cannot
                                                   ride in the cublasLt epilogue copies it into
                                                   the output first (+1 copy)
pointwise ops (``torch.Tag.pointwise``),           1 (elementwise)
``masked_fill_``
``copy_``, ``clone``, ``_to_copy`` on the device   1 (copy); a same-dtype copy between tensors of
                                                   the same dense layout is a cudaMemcpyAsync,
                                                   counted as one launch too (``memcpy_d2d``
                                                   says how many)
``cat``, ``stack``                                 1 per 128 inputs (64 if some input is not
                                                   contiguous) (cat); one copy per input beyond
                                                   4 dims
``zeros*``, ``ones*``, ``full*``, ``fill_``,       1 (fill); ``eye`` 2
``zero_``
reductions (``torch.Tag.reduction``)               1 (reduction)
``_softmax``, ``_softmax_backward_data``           1 (softmax) + a copy per non-contiguous input
``index_select``, ``embedding``, ``index_add(_)``  1 (index); out-of-place ``index_add`` also
                                                   copies its input (copy)
``slice_backward``, ``select_backward``            1 fill + 1 copy
``embedding_dense_backward``                       1 fill + 1 index (up to 3,072 indices), + 1
                                                   copy for a strided gradient
``repeat``                                         1 (copy)
Triton launches (``kernel[grid](...)``)            1 each (triton), not executed
any other aten op                                  1 (other), and named in ``unlisted``
=================================================  ==============================================

Ops whose tensors all live on the CPU are host work and count nothing. A host<->device copy
(``.cpu()``, ``.tolist()``, ``.item()``, ``.to("cuda")``) is one memcpy (``memcpy_h2d`` /
``memcpy_d2h``, not in the total); a read-back returns zeros, so data-dependent host code sees
zeros.

Custom ops (``torch.library.custom_op``, any namespace but aten/prims) arrive at the mode as
one op; the counter runs the op's registered implementation (its CUDA kernel, else its default
one) under the mode, so the aten ops and Triton launches inside it are what is counted.

Why meta tensors, and what that changes
---------------------------------------
``FakeTensorMode`` can fake CUDA tensors on a CPU-only PyTorch, but autograd cannot use them:
its first ``backward`` edge asks for the CUDA device guard, which a CPU-only build lacks, and the
process aborts (``PyTorch is not linked with support for cuda devices``). Meta tensors have a
device guard, and the library already runs forward and backward on them (``himnet_fast.aot``).
The device type seen by Python code is then ``"meta"``, not ``"cuda"``: :func:`gpu_like` makes
the library decide as on a GPU (automatic backend choice by CUDA's table, the Triton backend
accepted); the library's other device branches test for ``"cpu"``, so meta takes their GPU
side. Code that tests ``device.type == "cuda"`` would take its non-GPU side here.

Calibration (docs/benchmarks.md, "Kernel count"): on an H200, a PEMS07 training step at B = 16
(default backend, fp32) profiled at 4,352 kernel launches and the original model's at 3,150;
:func:`count_model_step` counts 4,358 (+0.1 %) and 2,941 (-6.6 %) for the same code, with the
GEMM calls (mm 468, bmm 681, addmm_/baddbmm_ 224) exactly as profiled. Stated error: 7 % of the
total. Not counted: cuBLAS's own extra kernels (split-K reductions) and memsets.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CATEGORIES", "KernelCount", "KernelCounter", "count_kernels", "gpu_like", "count_model_step",
           "COUNT_PROVIDERS"]

CATEGORIES = ("gemm", "elementwise", "copy", "cat", "fill", "reduction", "softmax", "index", "triton", "other")

aten = torch.ops.aten

# cat: inputs per launch of ATen's CatArrayBatchedCopy (CAT_ARRAY_BATCH_SIZE, halved when some
# input is not contiguous), and the most dimensions the batched kernel takes.
_CAT_BATCH = 128
_CAT_MAX_DIMS = 4
# embedding_dense_backward: up to this many indices, one zero fill and one feature kernel;
# above it ATen sorts the indices (radix sort and segment kernels), estimated here at 12.
_EMBEDDING_FAST_INDICES = 3072
_EMBEDDING_SORT_KERNELS = 12
_INT32_MAX = 2 ** 31 - 1


@dataclass
class KernelCount:
    """What one counted call launches. ``kernels``: per category (:data:`CATEGORIES`);
    ``by_op``: kernels per aten op (``"aten.mm.default"``, ``"triton:<kernel>"``); ``calls``:
    calls per device op (views included, 0 kernels); ``memcpy``: ``h2d``/``d2h`` copies (not
    kernels) and ``d2d`` (the same-device copies done by cudaMemcpyAsync, already counted in
    ``copy``); ``unlisted``: ops the table does not know, each counted as 1 (other)."""

    kernels: Counter = field(default_factory=Counter)
    by_op: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    memcpy: Counter = field(default_factory=Counter)
    unlisted: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Device kernels launched (memcpys between host and device not included)."""
        return sum(self.kernels.values())

    def add(self, op: str, category: str, n: int = 1) -> None:
        if n:
            self.kernels[category] += n
            self.by_op[op] += n

    def row(self) -> Dict[str, int]:
        """One flat row: total, each category, the memcpys."""
        out = {"total": self.total}
        out.update({c: self.kernels.get(c, 0) for c in CATEGORIES})
        out.update({f"memcpy_{k}": self.memcpy.get(k, 0) for k in ("d2d", "h2d", "d2h")})
        out["unlisted_ops"] = sum(self.unlisted.values())
        return out


# --------------------------------------------------------------------------- layout rules

def _dense(t: torch.Tensor) -> bool:
    """ATen's ``is_non_overlapping_and_dense``: some order of the dims (size-1 dims ignored)
    makes ``t`` contiguous."""
    if t.numel() < 2:
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a TensorIterator over (a, b) coalesces to one contiguous dimension: same shape,
    both dense, equal strides wherever the size exceeds 1 (ATen's memcpy test)."""
    if a.numel() <= 1:
        return a.shape == b.shape or b.numel() == 1
    if a.shape != b.shape or not (_dense(a) and _dense(b)):
        return False
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _copy(kc: KernelCount, op: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    """One same-device copy dst <- src: a memcpy when dtype and layout agree, else a kernel."""
    if dst.numel() == 0:
        return
    kc.add(op, "copy")
    if dst.dtype == src.dtype and _same_layout(dst, src):
        kc.memcpy["d2d"] += 1


def _matrix_copies(t: torch.Tensor) -> int:
    """1 when cuBLAS cannot take the 2-D ``t`` as it is (ATen's ``prepare_matrix_for_cublas``)."""
    if _dense(t):
        return 0
    s, z = t.stride(), t.shape
    if s[0] == 1 and s[1] >= max(1, z[0]):
        return 0
    if s[1] == 1 and s[0] >= max(1, z[1]):
        return 0
    return 1


def _batch_copies(t: torch.Tensor, transpose_result: bool, m: int, n: int) -> int:
    """1 when the batched GEMM must clone operand ``t`` (``prepare_batch_matrix_for_cublas``)."""
    fast, lead = (2, 1) if transpose_result else (1, 2)
    s = t.stride()
    if s[fast] == 1 and s[lead] >= max(1, m):
        return 0
    if s[lead] == 1 and s[fast] >= max(1, n):
        return 0
    if t.is_contiguous() and s[1] != 0 and s[2] != 0:
        return 0
    return 1


def _gemm_2d(kc, op, result, mat1, mat2) -> None:
    kc.add(op, "gemm")
    copies = _matrix_copies(mat1) + _matrix_copies(mat2)
    copies += 2 * _matrix_copies(result)  # cloned, then copied back
    kc.add(op, "copy", copies)


def _gemm_batched(kc, op, result, b1, b2) -> None:
    kc.add(op, "gemm")
    rs, rz = result.stride(), result.shape
    copies = 0
    if rs[1] == 1 and (rz[2] == 1 or rs[2] >= max(1, rz[1])):
        tr = False
    elif rs[2] == 1 and (rz[1] == 1 or rs[1] >= max(1, rz[2])):
        tr = True
    else:
        tr, copies = False, 2  # the output is cloned, then copied back
    lead = 1 if tr else 2
    m, n = rz[2 if tr else 1], rz[lead]
    k = (b2 if tr else b1).shape[lead]
    copies += _batch_copies(b2 if tr else b1, tr, m, k)
    copies += _batch_copies(b1 if tr else b2, tr, k, n)
    kc.add(op, "copy", copies)


def _lt_bias(result, bias, mat1, mat2, beta) -> bool:
    """Whether CUDA's out-of-place addmm puts the bias in the cublasLt epilogue (no copy)."""
    if beta != 1 or result.dim() != 2 or not result.is_contiguous():
        return False
    if mat1.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return False
    if not bias.is_contiguous() or bias.squeeze().dim() > 1 or bias.shape[-1] != mat2.shape[1]:
        return False
    return min(mat1.shape[0], mat1.shape[1], mat2.shape[0], mat2.shape[1]) > 1


# --------------------------------------------------------------------------- the table

def _inplace(op: str) -> bool:
    """Whether ``op`` ("aten.addmm_.default") is an in-place overload (writes its first input)."""
    return op.split(".")[1].endswith("_")


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _count_mm(kc, op, args, kwargs, out):
    _gemm_2d(kc, op, out, args[0], args[1])


def _count_addmm(kc, op, args, kwargs, out):
    bias, mat1, mat2 = args[0], args[1], args[2]
    beta = _arg(args, kwargs, 3, "beta", 1)
    if not _inplace(op) and beta != 0 and not _lt_bias(out, bias, mat1, mat2, beta):
        _copy(kc, op, out, bias.expand(out.shape))
    _gemm_2d(kc, op, out, mat1, mat2)


def _count_bmm(kc, op, args, kwargs, out):
    _gemm_batched(kc, op, out, args[0], args[1])


def _count_baddbmm(kc, op, args, kwargs, out):
    base = args[0]
    beta = _arg(args, kwargs, 3, "beta", 1)
    if not _inplace(op) and beta != 0:
        _copy(kc, op, out, base.expand(out.shape))
    _gemm_batched(kc, op, out, args[1], args[2])


def _count_copy_(kc, op, args, kwargs, out):
    _copy(kc, op, args[0], args[1])


def _count_clone(kc, op, args, kwargs, out):
    _copy(kc, op, out, args[0])


def _count_to_copy(kc, op, args, kwargs, out):
    if out.dtype != args[0].dtype:
        if out.numel():
            kc.add(op, "copy")  # a conversion is a kernel, never a memcpy
    else:
        _copy(kc, op, out, args[0])


def _cat_inputs(tensors):
    return [t for t in tensors if not (t.numel() == 0 and t.dim() == 1)]


def _count_cat_list(kc, op, inputs, out, dim):
    if out.numel() == 0:
        return
    same_dtype = all(t.dtype == out.dtype for t in inputs)
    indexable = all(t.numel() <= _INT32_MAX for t in inputs) and out.numel() <= _INT32_MAX
    if len(inputs) > 1 and out.dim() <= _CAT_MAX_DIMS and same_dtype and indexable:
        batch = _CAT_BATCH if all(t.is_contiguous() for t in inputs) else _CAT_BATCH // 2
        kc.add(op, "cat", math.ceil(len(inputs) / batch))
        return
    offset = 0  # one copy per input into its slice of the output
    for t in inputs:
        if t.numel() == 0:
            continue
        size = t.shape[dim]
        _copy(kc, op, out.narrow(dim, offset, size), t)
        offset += size


def _count_cat(kc, op, args, kwargs, out):
    tensors = list(args[0])
    dim = _arg(args, kwargs, 1, "dim", 0) % max(out.dim(), 1)
    _count_cat_list(kc, op, _cat_inputs(tensors), out, dim)


def _count_stack(kc, op, args, kwargs, out):
    dim = _arg(args, kwargs, 1, "dim", 0) % max(out.dim(), 1)
    _count_cat_list(kc, op, [t.unsqueeze(dim) for t in args[0]], out, dim)


def _fill(n_fills):
    def count(kc, op, args, kwargs, out):
        if isinstance(out, torch.Tensor) and out.numel() == 0:
            return
        kc.add(op, "fill", n_fills)
    return count


def _one(category):
    def count(kc, op, args, kwargs, out):
        kc.add(op, category)
    return count


def _count_softmax(kc, op, args, kwargs, out):
    inputs = args[:2] if "backward" in op else args[:1]
    kc.add(op, "copy", sum(1 for t in inputs if not t.is_contiguous()))
    kc.add(op, "softmax")


def _count_index_add(kc, op, args, kwargs, out):
    _copy(kc, op, out, args[0])
    kc.add(op, "index")


def _count_slice_like_backward(kc, op, args, kwargs, out):
    """zeros of the input's shape, then the gradient copied into the slice/selection."""
    grad = args[0]
    kc.add(op, "fill")
    z = torch.empty(out.shape, dtype=out.dtype, device="meta")
    if "slice" in op:
        dim, start, end, step = args[2], args[3], args[4], args[5]
        dst = aten.slice.Tensor(z, dim, start, end, step)
    else:
        dst = z.select(args[2], args[3])
    _copy(kc, op, dst, grad)


def _count_embedding_backward(kc, op, args, kwargs, out):
    grad, indices = args[0], args[1]
    scale_by_freq = _arg(args, kwargs, 4, "scale_grad_by_freq", False)
    if not grad.is_contiguous():
        kc.add(op, "copy")
    if indices.numel() <= _EMBEDDING_FAST_INDICES and not scale_by_freq:
        kc.add(op, "fill")
        kc.add(op, "index")
    else:
        kc.add(op, "index", _EMBEDDING_SORT_KERNELS)


_ZERO = {
    "aten::_unsafe_view", "aten::_reshape_alias", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::new_empty", "aten::new_empty_strided", "aten::resize_", "aten::set_", "aten::lift_fresh",
    "aten::promote_types", "aten::result_type", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type",
    "aten::detach_", "aten::_local_scalar_dense",
}

_TABLE: Dict[str, Callable] = {
    "aten::mm": _count_mm,
    "aten::addmm": _count_addmm,
    "aten::addmm_": _count_addmm,
    "aten::bmm": _count_bmm,
    "aten::baddbmm": _count_baddbmm,
    "aten::baddbmm_": _count_baddbmm,
    "aten::copy_": _count_copy_,
    "aten::clone": _count_clone,
    "aten::_to_copy": _count_to_copy,
    "aten::cat": _count_cat,
    "aten::stack": _count_stack,
    "aten::repeat": _one("copy"),
    "aten::zeros": _fill(1), "aten::zeros_like": _fill(1), "aten::new_zeros": _fill(1),
    "aten::ones": _fill(1), "aten::ones_like": _fill(1), "aten::new_ones": _fill(1),
    "aten::full": _fill(1), "aten::full_like": _fill(1), "aten::new_full": _fill(1),
    "aten::scalar_tensor": _fill(1), "aten::fill_": _fill(1), "aten::zero_": _fill(1),
    "aten::eye": _fill(2),
    "aten::masked_fill_": _one("elementwise"),
    "aten::_softmax": _count_softmax, "aten::_log_softmax": _count_softmax,
    "aten::_softmax_backward_data": _count_softmax, "aten::_log_softmax_backward_data": _count_softmax,
    "aten::index_select": _one("index"), "aten::embedding": _one("index"), "aten::index_add_": _one("index"),
    "aten::index_add": _count_index_add, "aten::gather": _one("index"), "aten::scatter": _one("index"),
    "aten::scatter_add": _one("index"), "aten::scatter_add_": _one("index"),
    "aten::slice_backward": _count_slice_like_backward, "aten::select_backward": _count_slice_like_backward,
    "aten::embedding_dense_backward": _count_embedding_backward,
}


def _count_aten(kc: KernelCount, func, args, kwargs, out) -> None:
    name = func._schema.name
    op = str(func)
    if name in _ZERO or func.is_view:
        return
    # The same handler serves an op's functional, in-place and out= overloads: ``out`` is then
    # the tensor written (the first argument, or the out= one).
    handler = _TABLE.get(name)
    if handler is not None:
        handler(kc, op, args, kwargs, out)
        return
    if torch.Tag.pointwise in func.tags:
        kc.add(op, "elementwise")
    elif torch.Tag.reduction in func.tags:
        kc.add(op, "reduction")
    else:
        kc.add(op, "other")
        kc.unlisted[op] += 1


# --------------------------------------------------------------------------- the mode

def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def custom_op_impl(func) -> Optional[Callable]:
    """The implementation a CUDA device would run for a ``torch.library.custom_op``."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(func._schema.name)
    if opdef is None:
        return None
    for device in ("cuda", None):
        if device in opdef._backend_fns and device not in opdef._disabled_kernel:
            return opdef._backend_fns[device]
    return opdef._init_fn


class KernelCounter(TorchDispatchMode):
    """Counts, into :attr:`count`, the CUDA kernels of every op run under it (see the module
    docstring). Tensors must be on the meta device (or a real GPU); CPU-only ops are host work."""

    def __init__(self):
        super().__init__()
        self.count = KernelCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns not in ("aten", "prims", "prim"):
            impl = custom_op_impl(func)
            if impl is None:
                raise NotImplementedError(
                    f"cannot count the kernels of {func}: no implementation registered through "
                    "torch.library.custom_op; register one, or count its kernels by hand")
            self.count.calls[str(func)] += 1
            with self:  # the ops inside the implementation are what launches
                return impl(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # A composite (matmul, softmax.int, ...) reaches the mode as itself when it is called
            # below autograd, inside a custom op's implementation: count what it decomposes into.
            with self:  # the mode is off inside its own handler: re-enter it for the parts
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        devices = {t.device.type for t in _tensors((args, kwargs))}
        if func is aten._local_scalar_dense.default and "cpu" not in devices:
            self.count.memcpy["d2h"] += 1
            return torch.zeros((), dtype=args[0].dtype).item()  # meta data cannot be read: zero
        if func is aten._to_copy.default:
            target = kwargs.get("device")
            src = args[0]
            if target is not None and torch.device(target).type != src.device.type:
                return self._host_copy(func, src, torch.device(target), kwargs)
        if func is aten.copy_.default and args[0].device.type != args[1].device.type:
            dst, src = args[0], args[1]
            self.count.memcpy["h2d" if dst.device.type != "cpu" else "d2h"] += 1
            if dst.device.type == "cpu":
                return dst.zero_()  # meta data cannot be read: the host gets zeros
            if dst.dtype != src.dtype or not (dst.is_contiguous() and src.is_contiguous()):
                self.count.add(str(func), "copy")
            return func(dst, src.to(dst.device) if src.device.type == "cpu" else src)
        out = func(*args, **kwargs)
        devices |= {t.device.type for t in _tensors(out)}
        if devices - {"cpu"}:
            self.count.calls[str(func)] += 1
            _count_aten(self.count, func, args, kwargs, out)
        return out

    def _host_copy(self, func, src, target, kwargs):
        """``.to()`` across host and device: one memcpy, plus a conversion kernel on the device
        side when the dtype changes or a side is not contiguous (ATen stages it there)."""
        dtype = kwargs.get("dtype") or src.dtype
        staged = dtype != src.dtype or not src.is_contiguous()
        if target.type == "cpu":
            self.count.memcpy["d2h"] += 1
            if staged:
                self.count.add(str(func), "copy")
            # meta data cannot be read: the host gets zeros (data-dependent code sees zeros)
            return torch.zeros(src.shape, dtype=dtype)
        self.count.memcpy["h2d"] += 1
        if staged:
            self.count.add(str(func), "copy")
        return func(src, **kwargs)


# --------------------------------------------------------------------------- Triton launches

@contextlib.contextmanager
def _count_triton_launches(kc: KernelCount) -> Iterator[None]:
    """Count every ``kernel[grid](...)`` as one launch (category triton) and run nothing: the
    tensors are meta. Patches the launch of compiled, interpreted and autotuned kernels."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    try:
        from triton.runtime.autotuner import Autotuner
        classes.append(Autotuner)
    except ImportError:
        pass
    saved = [(cls, cls.__dict__.get("run")) for cls in classes]

    def launch(self, *args, grid=None, warmup=False, **kwargs):
        if warmup:
            return None
        fn = getattr(self, "fn", self)
        while hasattr(fn, "fn") and not hasattr(fn, "__code__"):  # an autotuner wraps a JIT function
            fn = fn.fn
        name = getattr(fn, "__name__", type(self).__name__)
        kc.add(f"triton:{name}", "triton")
        kc.calls[f"triton:{name}"] += 1
        return None

    for cls, _ in saved:
        cls.run = launch
    try:
        yield
    finally:
        for cls, orig in saved:
            if orig is None:
                del cls.run
            else:
                cls.run = orig


# --------------------------------------------------------------------------- GPU-like decisions

@contextlib.contextmanager
def gpu_like() -> Iterator[None]:
    """Make the library decide on meta tensors as it does on a CUDA GPU: automatic backend
    choice by CUDA's table (``_backend.AUTO_ORDER["cuda"]``), and the Triton backend accepted
    for meta tensors (its launches are counted, not run)."""
    from .. import _backend
    from ..ops import _triton

    had = "meta" in _backend.AUTO_ORDER
    old = _backend.AUTO_ORDER.get("meta")
    _backend.AUTO_ORDER["meta"] = _backend.AUTO_ORDER["cuda"]
    try:
        with _triton.allow_meta():
            yield
    finally:
        if had:
            _backend.AUTO_ORDER["meta"] = old
        else:
            del _backend.AUTO_ORDER["meta"]


def count_kernels(fn: Callable, *args, **kwargs) -> Tuple[object, KernelCount]:
    """Run ``fn(*args, **kwargs)`` (on meta tensors) under :class:`KernelCounter` with the
    library deciding as on a GPU; returns (its result, the :class:`KernelCount`)."""
    counter = KernelCounter()
    with gpu_like(), _count_triton_launches(counter.count), counter:
        result = fn(*args, **kwargs)
    return result, counter.count


# --------------------------------------------------------------------------- model steps

# What ``himnet-fast bench --count-kernels`` can count: the library's HimNet with its
# automatic backend ("default", what HimNet(num_nodes) runs on a GPU) or a named one, and the
# original model (with and without teacher forcing).
COUNT_PROVIDERS = ("default", "torch", "triton", "reference", "reference-notf")


def _build(provider: str, preset, num_nodes: int) -> torch.nn.Module:
    from . import providers as P

    if provider not in COUNT_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} for counting; expected one of {COUNT_PROVIDERS}")
    if provider == "default":
        from ..nn import HimNet

        torch.manual_seed(0)
        return HimNet(**preset.model_kwargs(num_nodes))
    return P.build_module(provider, preset, num_nodes, torch.device("cpu"))


def count_model_step(provider: str, preset, num_nodes: Optional[int] = None, batch: int = 16,
                     mode: str = "train") -> KernelCount:
    """Kernels of one benchmark step (``providers.model_step``: in ``train`` mode forward with
    teacher forcing, L1 loss and backward; in ``infer`` mode an eval forward) of ``provider``
    (:data:`COUNT_PROVIDERS`) at ``preset``'s sizes, as a CUDA GPU would launch them."""
    from . import providers as P

    n = preset.num_nodes if num_nodes is None else int(num_nodes)
    module = _build(provider, preset, n).to("meta")
    P.set_mode(module, mode)
    inputs = {k: v.to("meta") for k, v in P.model_inputs(preset, n, batch, torch.device("cpu")).items()}
    step = P.model_step(module, list(module.parameters()), inputs, mode)
    _, kc = count_kernels(step)
    return kc


def describe(kc: KernelCount, top: int = 0) -> List[Tuple[str, int, int]]:
    """(op, calls, kernels) sorted by kernels, the ``top`` first (all if 0); views left out."""
    rows = [(op, kc.calls.get(op, 0), k) for op, k in kc.by_op.items() if k]
    rows.sort(key=lambda r: (-r[2], r[0]))
    return rows[:top] if top else rows


def count_table(providers: Sequence[str], preset, num_nodes: Optional[int], batch: int,
                modes: Sequence[str]) -> List[Tuple[dict, KernelCount]]:
    """One (row, count) per (provider, mode); the row holds the setting, the total kernels,
    each category and the memcpys."""
    out = []
    for provider in providers:
        for mode in modes:
            kc = count_model_step(provider, preset, num_nodes, batch, mode)
            row = {"provider": provider, "mode": mode, "preset": preset.name,
                   "num_nodes": preset.num_nodes if num_nodes is None else int(num_nodes), "batch_size": batch}
            row.update(kc.row())
            out.append((row, kc))
    return out


def _md(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


SUMMARY_COLUMNS = ("provider", "mode", "total") + CATEGORIES + ("memcpy_d2d", "memcpy_h2d", "memcpy_d2h",
                                                                 "unlisted_ops")


def report_text(results: Sequence[Tuple[dict, KernelCount]], command: str = "", top: int = 15) -> str:
    """The markdown report: the summary table, then each count's ops with most kernels."""
    from .metrics import git_commit

    first = results[0][0]
    text = [f"# Kernel count: {first['preset']}, N = {first['num_nodes']}, B = {first['batch_size']}", "",
            "CUDA kernels one step would launch, counted on CPU on meta tensors by "
            "`himnet_fast.benchmark.kernel_count` (docs/benchmarks.md, \"Kernel count\"): a prediction, "
            "calibrated against an H200 profile, not a measurement. `total` includes the same-device "
            "copies done by cudaMemcpyAsync (`memcpy_d2d`, also inside `copy`); host<->device memcpys "
            "(`memcpy_h2d`, `memcpy_d2h`) are not in it.", "",
            f"torch {torch.__version__}, commit {git_commit() or 'unknown'}"
            + (f", command `{command}`" if command else "") + ".", "",
            _md(SUMMARY_COLUMNS, [[row[c] for c in SUMMARY_COLUMNS] for row, _ in results])]
    for row, kc in results:
        text += ["", f"## {row['provider']}, {row['mode']}: the {top} ops with most kernels", "",
                 _md(("op", "calls", "kernels"), describe(kc, top))]
        if kc.unlisted:
            text += ["", "Ops the table does not know (counted 1 each, category other): "
                     + ", ".join(f"{op} x{n}" for op, n in sorted(kc.unlisted.items()))]
    return "\n".join(text) + "\n"


def write_report(results: Sequence[Tuple[dict, KernelCount]], out_dir: str, command: str = "") -> List[str]:
    """``kernel_count_<preset>_n<N>_b<B>.csv`` (one row per provider and mode, with the torch
    version and commit), ``..._ops.csv`` (kernels per op) and ``.md`` (the report) in ``out_dir``."""
    import csv

    from .metrics import git_commit

    os.makedirs(out_dir, exist_ok=True)
    first = results[0][0]
    stem = os.path.join(out_dir, f"kernel_count_{first['preset']}_n{first['num_nodes']}_b{first['batch_size']}")
    env = {"torch": torch.__version__, "git_commit": git_commit(), "command": command}
    columns = ("provider", "mode", "preset", "num_nodes", "batch_size") + SUMMARY_COLUMNS[2:] + tuple(env)
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row, _ in results:
            w.writerow({**row, **env})
    with open(stem + "_ops.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("provider", "mode", "op", "calls", "kernels"))
        for row, kc in results:
            for op, calls, kernels in describe(kc):
                w.writerow((row["provider"], row["mode"], op, calls, kernels))
    with open(stem + ".md", "w") as f:
        f.write(report_text(results, command))
    return [stem + ".csv", stem + "_ops.csv", stem + ".md"]
