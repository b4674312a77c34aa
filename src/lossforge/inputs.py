"""Inputs for the benchmarks and the warmup, drawn from each loss's own ``LossSpec.example``:
``python -m lossforge bench``, ``lossforge.warmup`` and ``asv_bench/`` all take their arrays
from :func:`draw`, so a third-party loss that declares ``example=`` is benched and warmed
like a built-in one. Nothing here names a loss.

The arrays are used with every option at its default (the path most calls take, and what a
PyTorch call without options computes); ``example``'s own options are for the conformance
kit. ``LossSpec.example_variants`` lists the keyword sets of ``example`` to cover (e.g. rows
of few and of many classes); without it, the plain call is the one variant.

Nothing here imports Numba or compiles anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def variants(loss: Any) -> list[dict[str, Any]]:
    """The keyword sets of ``loss``'s ``example`` to cover: ``LossSpec.example_variants``, or
    ``[{}]`` (the plain call); ``[]`` when the loss declares no ``example``."""
    spec = loss.spec
    if spec.example is None:
        return []
    return [dict(v) for v in getattr(spec, "example_variants", ())] or [{}]


def label(variant: Mapping[str, Any]) -> str:
    """``"classes=10"`` for ``{"classes": 10}``; ``""`` for the plain call."""
    return ", ".join(f"{k}={v}" for k, v in variant.items())


def draw(
    loss: Any,
    size: int,
    dtype: Any = "float32",
    rng: np.random.Generator | int | None = None,
    variant: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, ...]:
    """The arrays of ``loss.spec.example(rng, size, dtype, **variant)``, C-contiguous, for
    ``loss(*arrays)`` with the default options. ``rng``: a NumPy Generator or a seed
    (default 0). ``ValueError`` when the loss declares no ``example``."""
    if loss.spec.example is None:
        raise ValueError(f"{loss.name} declares no LossSpec.example")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"dtype must be a floating dtype, got {dtype.name}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(0 if rng is None else rng)
    arrays, _ = loss.spec.example(rng, int(size), dtype, **(variant or {}))
    return tuple(np.ascontiguousarray(a) for a in arrays)


def positions(loss: Any) -> list[int]:
    """Where the differentiable arguments are among the arrays."""
    return [loss.arguments.index(d) for d in loss.differentiable]


def nbytes_fused(loss: Any, arrays: Sequence[np.ndarray]) -> int:
    """Bytes a fused value-and-gradient pass moves: every array read once, and one gradient
    of each differentiable argument written once."""
    return sum(a.nbytes for a in arrays) + sum(arrays[i].nbytes for i in positions(loss))
