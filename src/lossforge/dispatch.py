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
    """The backend for these arguments (``None`` entries are ignored)."""
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {forced!r}")
    on_device = [hasattr(a, "__cuda_array_interface__") for a in arrays if a is not None]
    if any(on_device) and not all(on_device):
        raise ValueError(
            "all array arguments must be on the same device: got a mix of host arrays and "
            "CUDA arrays (move them with numba.cuda.to_device, cupy.asarray or tensor.cuda())"
        )
    found = "cuda" if on_device and all(on_device) else "cpu"
    if forced is None or forced == found:
        return found
    if forced == "cuda":
        return "cuda"  # host arrays are copied to the device by the CUDA runtime
    raise ValueError(
        "backend='cpu' was asked for but the arguments are CUDA arrays; copy them to the host "
        "first (e.g. .copy_to_host(), cupy.asnumpy or tensor.cpu())"
    )


@cache
def cuda_runtime() -> Any:
    """The CUDA runtime module, imported on first use so that ``import lossforge`` never
    imports a GPU stack."""
    return importlib.import_module("lossforge.runtime.cuda")


def empty(shape: tuple[int, ...], dtype: np.dtype, backend: str) -> Any:
    if backend == "cpu":
        return np.empty(shape, dtype)
    return cuda_runtime().empty(shape, dtype)
