"""CPU kernels of the binary and multi-label losses.

All three are element-wise: one fused pass like the regression family's. float32 inputs are
computed in float32 arithmetic (16 SIMD lanes; runtime.mathfn's float32 exp and log, as
PyTorch computes float32), float64 inputs in float64, and sums accumulate in float64.
Broadcast weights arrive materialised to the input's shape (or ``None``).
``multilabel_soft_margin_loss`` is the logits loss divided by the class count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from lossforge.runtime import mathfn
from lossforge.runtime.cpu import (
    BLOCK,
    CHUNK,
    finish_element,
    inline,
    ordered_sum,
    parallel_kernel,
    ready_elementwise,
    wide_vectors,
    widened_sum,
)

BCE, BCE_LOGITS = 0, 1

#: PyTorch clamps each log term of binary_cross_entropy at -100, and the denominator of its
#: gradient at 1e-12 held in a float32 (its CPU kernel's constant), so that inputs of exactly
#: 0 or 1 stay finite.
LOG_FLOOR = -100.0
GRAD_EPSILON = float(np.float32(1e-12))


@inline
def _bce(x, y, pw):
    """(loss, d loss / d x) of binary_cross_entropy at one element, in the input's precision
    (float32 runs 16 lanes a vector). Selects, not branches, and runtime.mathfn's log: the
    loop vectorizes. nan stays nan (a clamp written with ``max`` would replace it)."""
    one = mathfn.like(x, 1.0)
    floor = mathfn.like(x, LOG_FLOOR)
    epsilon = mathfn.like(x, GRAD_EPSILON)
    log_x = mathfn.log_native(x)
    log_x = floor if log_x < floor else log_x
    log_1x = mathfn.log_native(one - x)
    log_1x = floor if log_1x < floor else log_1x
    denominator = (one - x) * x
    denominator = epsilon if denominator < epsilon else denominator
    return -(y * log_x + (one - y) * log_1x), (x - y) / denominator


@inline
def _logits(x, y, pw):
    """The same for binary_cross_entropy_with_logits, ``pw`` the positive-class weight:
    ``pw y softplus(-x) + (1 - y) softplus(x)`` with ``softplus(+-x) = s + max(+-x, 0)``,
    ``s = log1p(exp(-|x|))``; gradient ``(1 - y) sigmoid(x) - pw y sigmoid(-x)``, which has no
    cancellation for hard labels."""
    one = mathfn.like(x, 1.0)
    zero = mathfn.like(x, 0.0)
    e = mathfn.exp_nonpositive(-abs(x))  # in (0, 1]
    s = mathfn.log1p_unit_native(e)
    r = one / (one + e)  # one division serves both sigmoids
    positive = x if x > zero else zero
    negative = -x if x < zero else zero
    loss = pw * y * (s + negative) + (one - y) * (s + positive)
    sigmoid = r if x >= zero else e * r
    sigmoid_neg = e * r if x >= zero else r
    return loss, (one - y) * sigmoid - pw * y * sigmoid_neg


@inline
def _at(values, k, absent):
    """``values[k]``, or ``absent`` when there are no values (``None``: compiled out)."""
    if values is None:
        return absent
    return values[k]


@parallel_kernel
def _binary(kind, x, y, w, pw, loss_out, grad_out, go, scale):
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    partials = np.empty(chunks)
    one = mathfn.like(x, 1.0)
    scale = mathfn.like(x, scale)
    for c in prange(chunks):
        wide_vectors()
        # a block's losses in the input's precision, widened for the sum after the block: a
        # float64 store in the element loop would halve its vector width for float32
        losses = np.empty(BLOCK, x.dtype)
        buf = np.empty(BLOCK)
        s = 0.0
        end = min(c * CHUNK + CHUNK, n)
        for lo in range(c * CHUNK, end, BLOCK):
            hi = min(lo + BLOCK, end)
            xs = x[lo:hi]
            ys = y[lo:hi]
            ws = None if w is None else w[lo:hi]
            ls = None if loss_out is None else loss_out[lo:hi]
            gs = None if grad_out is None else grad_out[lo:hi]
            gos = None if go is None else go[lo:hi]
            pws = None if pw is None else pw[lo:hi]
            # one loop per loss, each with its element function inlined: they vectorize; the
            # positive weight is compiled in or out by _at (None: absent)
            if kind == BCE:
                for k in range(hi - lo):
                    loss, g = _bce(xs[k], ys[k], one)
                    losses[k] = finish_element(k, loss, g, ws, ls, gs, gos, scale)
            else:
                for k in range(hi - lo):
                    loss, g = _logits(xs[k], ys[k], _at(pws, k, one))
                    losses[k] = finish_element(k, loss, g, ws, ls, gs, gos, scale)
            s += widened_sum(losses, hi - lo, buf)
        partials[c] = s
    return ordered_sum(partials)


@parallel_kernel
def _outside_unit(x):
    """How many elements are outside [0, 1] (nan is not: it propagates). Counted without
    branches, so the loop vectorizes; a search for the first one stops vectorization and
    cost more than the loss itself."""
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    counts = np.empty(chunks, np.int64)
    for c in prange(chunks):
        xs = x[c * CHUNK : min(c * CHUNK + CHUNK, n)]
        count = 0
        for i in range(xs.size):
            count += (xs[i] < 0) | (xs[i] > 1)
        counts[c] = count
    return counts.sum()


def first_outside_unit(x):
    """The first element of ``x`` outside [0, 1], or ``None`` if there is none."""
    if not _outside_unit(x.size, x):
        return None
    return float(x[(x < 0) | (x > 1)][0])


def _flat(array):
    return None if array is None else array.ravel()


def binary(p, loss_out, grads, grad_output, scale):
    """The KernelSpec function of both binary losses; ``p.arrays = (x, y, w, pw)``."""
    x, y, w, pw = p.arrays
    return _binary(
        x.size,
        p.params[0],
        x.ravel(),
        y.ravel(),
        _flat(w),
        _flat(pw),
        _flat(loss_out),
        _flat(grads[0]) if grads else None,
        _flat(grad_output) if grads else None,
        scale,
    )


def multilabel(p, loss_out, grads, grad_output, scale):
    """The logits loss over all ``(N, C)`` elements, divided by C: the total needs no rows.
    Per-row values (``"none"``) are summed from per-element losses afterwards."""
    z, y, w = p.arrays
    classes = z.shape[1] if z.ndim == 2 else 1
    elements = None if loss_out is None else np.empty(z.size, z.dtype)
    go = None
    if grads and grad_output is not None:
        go = np.repeat(grad_output.ravel(), classes)
    total = _binary(
        z.size,
        BCE_LOGITS,
        z.ravel(),
        y.ravel(),
        _flat(w),
        None,
        elements,
        _flat(grads[0]) if grads else None,
        go,
        scale / classes if classes else scale,
    )
    if loss_out is not None:
        rows = elements.reshape(z.shape).sum(axis=1, dtype=np.float64)
        with np.errstate(invalid="ignore"):  # no classes: the mean of nothing, nan (PyTorch)
            loss_out.reshape(-1)[...] = rows / classes
    if not classes:  # each row's loss is a mean over no classes: nan, as in PyTorch
        return math.nan if z.shape[0] else 0.0
    return total / classes


def _fast(kind, arrays, out):
    """``value_and_grad(input, target, out=out)`` with the default options (``"mean"``, no
    weights): the general path's kernel and arguments, minus its per-call layers (see
    ``KernelSpec.fast``); ``None`` for anything else, an input or target of
    ``binary_cross_entropy`` outside [0, 1] included."""
    ready = ready_elementwise(arrays, out)
    if ready is None:
        return None
    x, y, out, grad = ready
    n = x.size
    if kind == BCE and (_outside_unit(n, x) or _outside_unit(n, y)):
        return None  # the general path names it
    total = _binary(n, kind, x, y, None, None, None, grad, None, 1 / n)
    return out.dtype.type(total / n), out


def fast_binary_cross_entropy(arrays, out):
    return _fast(BCE, arrays, out)


def fast_binary_cross_entropy_with_logits(arrays, out):
    return _fast(BCE_LOGITS, arrays, out)


def fast_multilabel_soft_margin_loss(arrays, out):
    """As ``_fast``, for multilabel_soft_margin_loss of an ``(N, C)`` or ``(C)`` input: the
    logits loss summed over all elements, divided by C and, for ``"mean"``, by N."""
    ready = ready_elementwise(arrays, out)
    if ready is None or arrays[0].ndim not in (1, 2):
        return None
    x, y, out, grad = ready
    classes = arrays[0].shape[-1]
    rows = x.size // classes
    total = _binary(x.size, BCE_LOGITS, x, y, None, None, None, grad, None, 1 / rows / classes)
    return out.dtype.type(total / classes / rows), out
