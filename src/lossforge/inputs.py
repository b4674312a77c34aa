"""Valid, realistic inputs for every built-in loss, in one place: the benchmarks
(``python -m lossforge bench``, ``asv_bench/``), ``lossforge.warmup`` and their tests all
draw their arrays from :func:`make_inputs`.

"Realistic" means what a training step feeds the loss, so that branches and special-function
arguments are exercised as in real use:

- regression: targets ``N(0, 1)``, predictions the targets plus ``N(0, 1)`` noise (so about a
  third of the residuals fall outside ``beta = delta = 1``);
- binary: logits ``N(0, 2)``, labels 0/1 of the input's dtype; ``binary_cross_entropy``
  gets the logits' sigmoids (probabilities strictly inside (0, 1));
- multi-class: logits ``N(0, 2)`` of shape ``(rows, classes)`` and ``int64`` class indices;
  ``nll_loss`` gets the logits' ``log_softmax``;
- multi-label: logits ``(rows, classes)`` and 0/1 labels, about 10% positive;
- similarity: embeddings ``(rows, dim)``, the second a noisy copy of the first, so cosines
  spread over (-1, 1); ``cosine_embedding_loss`` targets are +1 / -1 of the input's dtype.

Options are the defaults (``reduction="mean"``, no weights): the path most calls take.
Nothing here imports Numba or compiles anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Losses whose arrays are rows of classes or features: ``size`` may be ``(rows, width)``.
ROW_LOSSES = {
    "cross_entropy": 100,  # default classes
    "nll_loss": 100,
    "multilabel_soft_margin_loss": 100,
    "cosine_similarity": 128,  # default embedding width
    "cosine_embedding_loss": 128,
}

#: Losses whose arrays are element-wise of one shape: ``size`` is an element count.
ELEMENTWISE_LOSSES = (
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
)

#: Every loss this module knows how to feed.
KNOWN = (*ELEMENTWISE_LOSSES, *ROW_LOSSES)

Size = int | Sequence[int]


def shape_of(name: str, size: Size) -> tuple[int, ...]:
    """The input's shape for ``size``: ``(size,)`` for element-wise losses; for row losses
    ``(rows, width)`` as given, or ``(max(1, size // width), width)`` with the default width
    (``ROW_LOSSES``) for an element count."""
    if name not in KNOWN:
        raise KeyError(f"lossforge.inputs has no input factory for {name!r}")
    if isinstance(size, (int, np.integer)):
        size = int(size)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if name in ROW_LOSSES:
            width = ROW_LOSSES[name]
            return (max(1, size // width), width)
        return (size,)
    shape = tuple(int(s) for s in size)
    if name in ROW_LOSSES:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{name} takes a (rows, width) shape of positive sizes, got {shape}")
    elif len(shape) != 1:
        raise ValueError(f"{name} takes an element count, got shape {shape}")
    return shape


def make_inputs(
    name: str,
    size: Size,
    dtype: Any = "float32",
    rng: np.random.Generator | int | None = None,
) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
    """``(arrays, options)`` for ``lossforge.get(name)(*arrays, **options)``.

    ``size``: about that many elements in the (first) input, or for the row losses
    (``cross_entropy``, ``nll_loss``, ``multilabel_soft_margin_loss``, ``cosine_similarity``,
    ``cosine_embedding_loss``) an explicit ``(rows, classes)`` / ``(rows, dim)`` shape.
    ``dtype``: the floating dtype of the inputs (``"float32"``, ``"float64"``, ``"float16"``).
    ``rng``: a NumPy Generator or a seed (default seed 0): the same seed gives the same arrays.
    Arrays are fresh, C-contiguous and writeable; the caller may keep or modify them.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"dtype must be a floating dtype, got {dtype.name}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(0 if rng is None else rng)
    if name not in KNOWN:  # a plugin's loss: its own LossSpec.example, if it declares one
        import lossforge

        example = lossforge.get(name).spec.example if name in lossforge.list_losses() else None
        if example is None or not isinstance(size, (int, np.integer)):
            raise KeyError(f"lossforge.inputs has no input factory for {name!r}")
        arrays, options = example(rng, int(size), dtype)
        return tuple(arrays), dict(options)
    shape = shape_of(name, size)
    f = _FACTORIES[name]
    arrays = f(rng, shape, dtype)
    return arrays, {}


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    # float64 draws rounded to the target dtype later: the same values for every dtype.
    return rng.standard_normal(shape) * scale


def _regression(rng, shape, dtype):
    target = _normal(rng, shape)
    prediction = target + _normal(rng, shape)
    return prediction.astype(dtype), target.astype(dtype)


def _labels(rng, shape, dtype, positive=0.5):
    return (rng.random(shape) < positive).astype(dtype)


def _sigmoid(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


def _bce(rng, shape, dtype):
    p = _sigmoid(_normal(rng, shape, 2.0)).astype(dtype)
    # Rounding to float16/float32 must not reach exactly 0 or 1 (valid, but not realistic).
    tiny = np.finfo(dtype).eps
    np.clip(p, tiny, 1 - tiny, out=p)
    return p, _labels(rng, shape, dtype)


def _bce_logits(rng, shape, dtype):
    return _normal(rng, shape, 2.0).astype(dtype), _labels(rng, shape, dtype)


def _classes(rng, shape):
    return rng.integers(0, shape[1], size=shape[0], dtype=np.int64)


def _cross_entropy(rng, shape, dtype):
    return _normal(rng, shape, 2.0).astype(dtype), _classes(rng, shape)


def _nll(rng, shape, dtype):
    z = _normal(rng, shape, 2.0)
    m = z.max(axis=1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    return logp.astype(dtype), _classes(rng, shape)


def _multilabel(rng, shape, dtype):
    return _normal(rng, shape, 2.0).astype(dtype), _labels(rng, shape, dtype, 0.1)


def _embeddings(rng, shape, dtype):
    a = _normal(rng, shape)
    b = a + _normal(rng, shape, 1.5)
    return a.astype(dtype), b.astype(dtype)


def _cosine_similarity(rng, shape, dtype):
    return _embeddings(rng, shape, dtype)


def _cosine_embedding(rng, shape, dtype):
    a, b = _embeddings(rng, shape, dtype)
    target = np.where(rng.random(shape[0]) < 0.5, 1.0, -1.0).astype(dtype)
    return a, b, target


_FACTORIES = {
    "mse_loss": _regression,
    "l1_loss": _regression,
    "smooth_l1_loss": _regression,
    "huber_loss": _regression,
    "binary_cross_entropy": _bce,
    "binary_cross_entropy_with_logits": _bce_logits,
    "cross_entropy": _cross_entropy,
    "nll_loss": _nll,
    "multilabel_soft_margin_loss": _multilabel,
    "cosine_similarity": _cosine_similarity,
    "cosine_embedding_loss": _cosine_embedding,
}


def nbytes_fused(arrays: Sequence[np.ndarray], differentiable: int = 1) -> int:
    """Bytes a fused value-and-gradient pass moves: every array read once, and one gradient
    of the (first ``differentiable``) input(s) written once."""
    read = sum(a.nbytes for a in arrays)
    written = sum(arrays[i].nbytes for i in range(differentiable))
    return read + written
