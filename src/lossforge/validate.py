"""Every check of API.md section 5, and the normalisation kernels rely on.

Family plugins build their ``prepare`` from these helpers, so that each error has one wording
and one place. After normalisation an array is C-contiguous, in native byte order, and of
the compute dtype (float32 or float64; float16 is computed in float32); the caller's arrays
are never written to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lossforge import dispatch

REDUCTIONS = ("none", "mean", "sum")
_F32, _F64, _I64 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(eq=False, slots=True)
class Prepared:
    """Validated, normalised arguments of one loss call, as the kernels receive them.

    arrays: the normalised arrays, in the order the family's kernels expect.
    params: the kernel's parameters by name (``{"delta": 1.0}``): plain floats and ints, so
        that compiled signatures stay few; a formula-made kernel (``lossforge.kernels``)
        takes them as a float tuple in this order.
    reduction: ``"none" | "mean" | "sum"``, or ``None`` for a loss that is not reduced. A
        loss's own reductions (``LossSpec.reductions``, e.g. kl_div's ``"batchmean"``) are
        means: its ``prepare`` returns ``"mean"`` with their denominator.
    denominator: what ``"mean"`` divides by (element count, or summed weights; the batch
        size for ``"batchmean"``).
    value_shape: the shape of the unreduced value.
    grad_shapes: the shape of each gradient, in the order of ``LossSpec.differentiable``.
    dtype: the compute dtype (float32 or float64).
    result_dtypes: the dtype of the value, then of each gradient (float16 stays float16).
    backend: ``"cpu"`` or ``"cuda"``.
    """

    arrays: tuple[Any, ...]
    params: Mapping[str, Any]
    reduction: str | None
    denominator: float
    value_shape: tuple[int, ...]
    grad_shapes: tuple[tuple[int, ...], ...]
    dtype: np.dtype
    result_dtypes: tuple[np.dtype, ...]
    backend: str = "cpu"


def check_reduction(reduction: object, extra: Sequence[str] = ()) -> str:
    """``reduction`` if it is one of ``REDUCTIONS`` or of a loss's own ``extra`` reductions
    (``LossSpec.reductions``), else ``ValueError`` naming the valid values."""
    valid = (*REDUCTIONS, *extra)
    if reduction not in valid:
        raise ValueError(
            f"reduction must be one of {', '.join(map(repr, valid))}, got {reduction!r}"
        )
    return reduction  # type: ignore[return-value]


def check_nonnegative(name: str, value: object) -> float:
    value = check_real(name, value)
    if not value >= 0:  # also rejects nan
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return value


def check_range(name: str, value: object, lo: float, hi: float) -> float:
    value = check_real(name, value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """A boolean option: ``True``/``False`` (NumPy's too); ``TypeError`` for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__}")


def check_int(name: str, value: object) -> int:
    """An int option that kernels take as int64: ``TypeError`` for anything but an integer,
    ``ValueError`` for one outside int64 (never a wrapped value, never ``OverflowError``)."""
    if type(value) is int and INT64_MIN <= value <= INT64_MAX:  # the common case, kept cheap
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit int64, in [-2**63, 2**63 - 1], got {value}")
    return value


def check_real(name: str, value: object) -> float:
    if type(value) is float:  # the common case, kept cheap
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, np.complexfloating):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def float_dtype(name: str, array: Any) -> np.dtype:
    """The float dtype of an argument, or TypeError naming the dtype it has."""
    dtype = np.dtype(array.dtype)
    if dtype is _F32 or dtype is _F64:  # the common case, kept cheap (native byte order)
        return dtype
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise TypeError(
            f"{name} must be a float16, float32 or float64 array, got dtype {dtype.name}"
        )
    return dtype.newbyteorder("=")


def compute_dtype(*dtypes: np.dtype) -> tuple[np.dtype, np.dtype]:
    """(compute dtype, result dtype) of arguments promoted together, as PyTorch promotes."""
    if len(dtypes) == 1 and (dtypes[0] is _F32 or dtypes[0] is _F64):  # kept cheap
        return dtypes[0], dtypes[0]
    result = np.result_type(*dtypes)
    return (np.dtype(np.float32) if result == np.float16 else result), result


def as_array(value: Any, backend: str) -> Any:
    """The argument as an array of its backend, without copying or converting."""
    if backend == "cpu":
        return np.asarray(value)
    return dispatch.cuda_runtime().as_device_array(value)


def as_float(name: str, array: Any, dtype: np.dtype, backend: str) -> Any:
    """``array`` (already checked by ``float_dtype``) as C-contiguous native ``dtype``."""
    if backend == "cpu":
        return _contiguous(array, dtype)
    return dispatch.cuda_runtime().as_contiguous(array, dtype)


def _contiguous(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d array into a 1-d one
    array = np.asarray(array, dtype=dtype)
    return array if array.flags.c_contiguous else array.copy()


def as_index(name: str, array: Any, backend: str) -> Any:
    """Class-index targets as C-contiguous int64, or TypeError naming the dtype.

    Any integer dtype is taken; a uint64 value above int64's maximum (which int64 would wrap
    to a negative number, possibly ``ignore_index``) is a ``ValueError`` naming it: the check
    is one pass over uint64 targets alone (on CUDA, over a host copy of them)."""
    dtype = np.dtype(array.dtype)
    if dtype is _I64 and backend == "cpu" and array.flags.c_contiguous:  # kept cheap
        return array
    if dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class indices, got dtype {dtype.name}")
    if dtype.kind == "u" and dtype.itemsize == 8 and array.size:
        host = array if backend == "cpu" else dispatch.cuda_runtime().to_host(array)
        largest = int(np.max(host))
        if largest > INT64_MAX:
            raise ValueError(
                f"{name} holds class index {largest}, which does not fit int64: unsigned "
                f"class indices must be at most 2**63 - 1"
            )
    if backend == "cpu":
        return _contiguous(array, np.dtype(np.int64))
    return dispatch.cuda_runtime().as_contiguous(array, np.dtype(np.int64))


def ready_rows(x: Any, t: Any) -> np.dtype | None:
    """The dtype when rows of logits ``x`` and class indices ``t`` are already what the
    softmax kernels take: a C-contiguous float32/float64 NumPy ``(N, C)`` input and
    C-contiguous int64 ``(N)`` indices; else ``None`` (the general path converts them)."""
    if type(x) is not np.ndarray or type(t) is not np.ndarray:
        return None
    dtype = x.dtype
    if (dtype is not _F32 and dtype is not _F64) or t.dtype is not _I64:
        return None
    if x.ndim != 2 or t.shape != x.shape[:1]:
        return None
    return dtype if x.flags.c_contiguous and t.flags.c_contiguous else None


def ready_out(
    out: Any, shape: tuple[int, ...], dtype: np.dtype, inputs: Sequence[np.ndarray] = ()
) -> bool:
    """Whether ``out`` is a NumPy array a kernel can write a gradient of ``shape`` and native
    ``dtype`` into as it is (C-contiguous, writeable, sharing no memory with the NumPy
    arrays ``inputs``); anything else gets checked in full (``check_out_overlap``)."""
    if type(out) is not np.ndarray or out.dtype is not dtype or out.shape != shape:
        return False
    flags = out.flags
    if not (flags.c_contiguous and flags.writeable):
        return False
    for a in inputs:
        if overlaps(out, a):
            return False
    return True


#: The work ``np.shares_memory`` may spend on an exact overlap test (it solves a bounded
#: Diophantine problem); beyond it the arrays count as overlapping.
_OVERLAP_WORK = 1 << 16

# np.may_share_memory without its __array_function__ dispatch: 0.10 us a call instead of
# 0.17 (the fast paths make one per input when given out=)
_may_share_memory = getattr(np.may_share_memory, "_implementation", np.may_share_memory)


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two NumPy arrays share an element. ``np.may_share_memory`` (a bounds check,
    ~0.2 us) first; the exact test only when the bounds meet, and an exact test too hard to
    finish counts as an overlap."""
    if not _may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=_OVERLAP_WORK))  # type: ignore[arg-type]
    except np.exceptions.TooHardError:
        return True


def _host_memory(value: Any) -> np.ndarray | None:
    """A NumPy view of the memory of an argument given as an array (a NumPy array, or an
    object exposing its memory, such as a PyTorch CPU tensor), or ``None`` for values that
    ``np.asarray`` would copy anyway (lists, scalars, strings, ``None``)."""
    if type(value) is np.ndarray:
        return value
    if value is None or isinstance(value, (str, bytes, int, float, complex, list, tuple)):
        return None
    if isinstance(value, np.ndarray | memoryview) or hasattr(value, "__array_interface__"):
        return np.asarray(value)
    if hasattr(value, "__array__") or hasattr(value, "__buffer__"):
        try:
            return np.asarray(value)
        except Exception:  # validation proper reports what is wrong with it
            return None
    return None


def check_out_overlap(
    outs: Sequence[np.ndarray],
    labels: Sequence[str],
    inputs: Sequence[tuple[str, Any]],
) -> None:
    """``ValueError`` when an ``out=`` array (``labels``: what each holds, "the gradient of
    input") shares memory with an input, an option array or ``grad_output`` (``inputs``, as
    ``(name, value)``), or with another ``out`` array. Kernels read their inputs while they
    write the gradient (a cross-entropy row is read whole before any of it is written), so
    any overlap, the input itself included, would give a wrong result; PyTorch refuses
    partial overlap too."""
    for i, (label, out) in enumerate(zip(labels, outs)):
        for other in outs[:i]:
            if other is out:
                raise ValueError(
                    "one array given for two outputs: out must "
                    f"hold a separate array for each of {', '.join(labels)}"
                )
            if overlaps(out, other):
                raise ValueError(
                    f"out arrays overlap: {', '.join(labels)} need arrays that share no memory"
                )
        for what, value in inputs:
            array = _host_memory(value)
            if array is not None and overlaps(out, array):
                raise ValueError(
                    f"out ({label}) overlaps {what}: it must be written to memory that no "
                    "argument is read from"
                )


def moveaxis(array: Any, source: int, destination: int, backend: str) -> Any:
    """``np.moveaxis`` on either backend (a view, not a copy)."""
    if backend == "cpu":
        return np.moveaxis(array, source, destination)
    return dispatch.cuda_runtime().moveaxis(array, source, destination)


def broadcast_to(array: Any, shape: tuple[int, ...], backend: str) -> Any:
    """``np.broadcast_to`` on either backend (a view); ``ValueError`` if it does not fit."""
    if backend == "cpu":
        return np.broadcast_to(array, shape)
    return dispatch.cuda_runtime().broadcast_to(array, shape)


def check_same_shape(names: Sequence[str], arrays: Sequence[Any]) -> tuple[int, ...]:
    shape = tuple(arrays[0].shape)
    for name, array in zip(names[1:], arrays[1:], strict=True):
        if tuple(array.shape) != shape:
            raise ValueError(
                f"{names[0]} and {name} must have the same shape, got {names[0]} of shape "
                f"{shape} and {name} of shape {tuple(array.shape)}"
            )
    return shape


def check_length(name: str, array: Any, expected: int, what: str) -> None:
    if array.ndim != 1 or array.shape[0] != expected:
        raise ValueError(
            f"{name} must be a 1-D array of length {expected} ({what}), got shape "
            f"{tuple(array.shape)}"
        )


_EMPTY = {_F32: np.empty(0, _F32), _F64: np.empty(0, _F64)}


def no_weight(dtype: np.dtype, backend: str) -> Any:
    """The length-0 array that stands for "no weight": kernels take one signature, with or
    without weights. Shared (nothing can be written to it); on CUDA, ``runtime.cuda.nothing``
    (a new device array costs ~10-25 us a call)."""
    if backend == "cpu":
        return _EMPTY[dtype] if dtype in _EMPTY else np.empty(0, dtype)
    return dispatch.cuda_runtime().nothing(dtype)


def ready_arrays(arrays: Sequence[Any]) -> np.dtype | None:
    """The dtype when every array is already what kernels want (NumPy, C-contiguous, native
    float32 or float64, one dtype and shape): the common case skips normalisation."""
    first = arrays[0]
    if type(first) is not np.ndarray:
        return None
    dtype = first.dtype
    if dtype is not _F32 and dtype is not _F64:
        return None
    for a in arrays:
        if (
            type(a) is not np.ndarray
            or a.dtype is not dtype
            or a.shape != first.shape
            or not a.flags.c_contiguous
        ):
            return None
    return dtype


def elementwise(
    arrays: Sequence[Any],
    names: Sequence[str],
    weight: Any,
    backend: str,
) -> tuple[list[Any], Any, np.dtype, tuple[np.dtype, ...], tuple[int, ...]]:
    """The common preparation of losses over same-shaped float arrays with an optional
    element-wise weight of the same shape.

    Returns (arrays, weight, compute dtype, dtypes, shape) where ``dtypes`` is the promoted
    result dtype followed by each array's own dtype (that of its gradient); ``weight`` is a
    length-0 array of the compute dtype when not given, so kernels have one signature.
    """
    if backend == "cpu" and weight is None:
        fast = ready_arrays(arrays)
        if fast is not None:
            return (
                list(arrays),
                no_weight(fast, backend),
                fast,
                (fast,) * (len(arrays) + 1),
                arrays[0].shape,
            )
    raw = [as_array(a, backend) for a in arrays]
    dtypes = [float_dtype(n, a) for n, a in zip(names, raw, strict=True)]
    shape = check_same_shape(names, raw)
    if weight is not None:
        weight = as_array(weight, backend)
        dtypes.append(float_dtype("weight", weight))
        if tuple(weight.shape) != shape:
            raise ValueError(
                f"weight must have the shape of {names[0]}, got weight of shape "
                f"{tuple(weight.shape)} and {names[0]} of shape {shape}"
            )
    dtype, result = compute_dtype(*dtypes)
    out = [as_float(n, a, dtype, backend) for n, a in zip(names, raw, strict=True)]
    if weight is None:
        weight = no_weight(dtype, backend)
    else:
        weight = as_float("weight", weight, dtype, backend)
    return out, weight, dtype, (result, *dtypes[: len(names)]), shape


def total(array: Any, backend: str) -> float:
    """The float64 sum of an array (pairwise, so deterministic): summed weights for
    ``"mean"``."""
    if backend == "cpu":
        return float(np.sum(array, dtype=np.float64))
    return dispatch.cuda_runtime().total(array)
