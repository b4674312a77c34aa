"""Which backend runs a call: ``"cuda"`` for arrays exposing ``__cuda_array_interface__``,
``"cpu"`` for everything ``np.asarray`` accepts; and the allocation of results there."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

BACKENDS = ("cpu", "cuda")


def backend_of(arrays: Sequence[Any], forced: str | None = None) -> str:
    """The backend for these arguments (``None`` entries and Python numbers, such as
    gaussian_nll_loss's ``var``, are ignored)."""
    host = device = 0
    for a in arrays:
        if a is None or type(a) is float or type(a) is int:
            continue
        if type(a) is not np.ndarray and on_device(a):
            device += 1
        else:
            host += 1
    if forced is None and not device:
        return "cpu"
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {forced!r}")
    if device and host:
        raise ValueError(
            "all array arguments must be on the same device: got a mix of host arrays and "
            "CUDA arrays (move them with numba.cuda.to_device, cupy.asarray or tensor.cuda())"
        )
    found = "cuda" if device else "cpu"
    if forced == "cuda" or (found == "cuda" and forced is None):
        # host arrays are copied to the device by the CUDA runtime, which also picks the
        # stream the call's kernels run on from the arrays
        cuda_runtime().begin_call(arrays)
        return "cuda"
    if forced is None or forced == found:
        return found
    raise ValueError(
        "backend='cpu' was asked for but the arguments are CUDA arrays; copy them to the host "
        "first (e.g. .copy_to_host(), cupy.asnumpy or tensor.cpu())"
    )


def on_device(a: Any) -> bool:
    """Whether ``a`` is a CUDA array: it exposes ``__cuda_array_interface__``, or is a Numba
    device array (``__cuda_ndarray__``, also under the CUDA simulator, whose arrays have no
    interface)."""
    try:
        return hasattr(a, "__cuda_array_interface__") or hasattr(a, "__cuda_ndarray__")
    except RuntimeError:  # a PyTorch CUDA tensor that requires grad refuses the interface
        return True


@cache
def cuda_runtime() -> Any:
    """The CUDA runtime module, imported on first use so that ``import lossforge`` never
    imports a GPU stack."""
    return importlib.import_module("lossforge.runtime.cuda")


def empty(shape: tuple[int, ...], dtype: np.dtype, backend: str) -> Any:
    if backend == "cpu":
        return np.empty(shape, dtype)
    return cuda_runtime().empty(shape, dtype)


def copy_into(dst: Any, src: Any, backend: str) -> None:
    """``dst[...] = src``, converting the dtype. Numba's device arrays take neither an
    ellipsis index nor a dtype conversion in ``__setitem__``; the simulator's (NumPy arrays)
    take both, so only a real GPU shows the difference."""
    if backend == "cpu":
        dst[...] = src
    else:
        cuda_runtime().copy_into(dst, src)


def sum_into(final: Any, grad: Any, backend: str) -> None:
    """``final[...] = grad`` summed over the dimensions ``final`` was broadcast along (the
    gradient of a broadcast input, as autograd sums it): in float64, NumPy's pairwise sum (the
    same bits for any thread count); on CUDA through the host (one round trip)."""
    host = grad if backend == "cpu" else cuda_runtime().to_host(grad)
    lead = host.ndim - final.ndim
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(final.shape) if n == 1 and host.shape[lead + i] != 1
    )
    summed = np.sum(host, axis=axes, dtype=np.float64).reshape(final.shape).astype(final.dtype)
    if backend == "cpu":
        final[...] = summed
    else:
        final.copy_to_device(summed, stream=cuda_runtime().stream())
