"""CPU kernels of the regression family: one fused value-and-gradient pass, shared by the
four losses (one loop per loss, chosen once per block).

Optional arrays (weight, per-element losses, gradient, per-element grad_output) are passed as
``None`` when absent: Numba compiles a variant per None/array combination with the absent
work removed, which is what lets LLVM vectorize the loop (a runtime flag does not).
"""

from __future__ import annotations

import numpy as np
from lossforge.plugins.regression import DEFAULT_BETA, DEFAULT_DELTA
from numba import prange

from lossforge.runtime.cpu import (
    BLOCK,
    CHUNK,
    TILE,
    finish_element,
    inline,
    ordered_sum,
    parallel_kernel,
    ready_elementwise,
    tree_sum,
    wide_vectors,
)

MSE, L1, SMOOTH_L1, HUBER = 0, 1, 2, 3


# (loss, d loss / d input) of one element, d = input - target, in float64; branch-free
# selects, with PyTorch's values at the boundaries and for nan. One function per loss: a
# kernel inlines each into its own loop, and a copy of one loss's code is a quarter of all
# four's (Numba's compile time grows with every inlined copy).


@inline
def _mse(d, param, inverse):
    return d * d, 2.0 * d


@inline
def _l1(d, param, inverse):  # PyTorch's sign: 0 for nan
    g = 1.0 if d > 0 else 0.0
    g = -1.0 if d < 0 else g
    return abs(d), g


@inline
def _smooth_l1(d, param, inverse):  # param = beta > 0 (beta = 0 is sent as L1)
    a = abs(d)
    loss = 0.5 * d * d * inverse if a < param else a - 0.5 * param
    g = d * inverse
    g = 1.0 if d >= param else g
    g = -1.0 if d <= -param else g
    return loss, g


@inline
def _huber(d, param, inverse):  # param = delta > 0
    a = abs(d)
    loss = 0.5 * d * d if a < param else param * (a - 0.5 * param)
    g = param if d >= param else d
    g = -param if d <= -param else g
    return loss, g


@inline
def _element(kind, d, param, inverse):
    """The element function of ``kind`` (a loop that calls this branches on it)."""
    if kind == MSE:
        return _mse(d, param, inverse)
    if kind == L1:
        return _l1(d, param, inverse)
    if kind == SMOOTH_L1:
        return _smooth_l1(d, param, inverse)
    return _huber(d, param, inverse)


@inline
def _finished(element, j, xs, ys, ws, ls, gs, gos, param, inverse, scale):
    """Element ``j`` of a block through ``element``: writes its gradient, returns its loss."""
    loss, g = element(np.float64(xs[j]) - np.float64(ys[j]), param, inverse)
    return finish_element(j, loss, g, ws, ls, gs, gos, scale)


@inline
def _tiles(element, xs, ys, ws, ls, gs, gos, param, inverse, scale, sums):
    """Adds the losses of whole tiles (``xs.size`` a multiple of ``TILE``) through one element
    function to ``sums``, element ``k`` of every tile to ``sums[k]``: the loops have no branch
    and vectorize, and their constant length spares a remainder loop and runtime checks per
    tile (a loop of variable length measured 25-40% slower on float32 in cache). Writes the
    gradient."""
    for t0 in range(0, xs.size, TILE):
        for k in range(TILE):
            sums[k] += _finished(element, t0 + k, xs, ys, ws, ls, gs, gos, param, inverse, scale)


@parallel_kernel
def _regression(kind, x, y, w, param, loss_out, grad_out, go, scale, wide):
    """``wide``: ``True`` to compile with 512-bit vectors (``wide_vectors``), ``None`` not
    to; a None argument is pruned before lowering, so the two are separate compilations."""
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    partials = np.empty(chunks)
    inverse = 1.0 / param if param > 0 else 0.0
    for c in prange(chunks):
        if wide is not None:
            wide_vectors()
        sums = np.zeros(TILE)
        end = min(c * CHUNK + CHUNK, n)
        whole = end - end % TILE  # only the last chunk can end in a partial tile
        for lo in range(c * CHUNK, whole, BLOCK):
            hi = min(lo + BLOCK, whole)
            xs = x[lo:hi]
            ys = y[lo:hi]
            ws = None if w is None else w[lo:hi]
            ls = None if loss_out is None else loss_out[lo:hi]
            gs = None if grad_out is None else grad_out[lo:hi]
            gos = None if go is None else go[lo:hi]
            # one _tiles per loss: a loop-invariant switch inside one loop is not always
            # hoisted, and a loop with branches does not vectorize
            if kind == MSE:
                _tiles(_mse, xs, ys, ws, ls, gs, gos, param, inverse, scale, sums)
            elif kind == L1:
                _tiles(_l1, xs, ys, ws, ls, gs, gos, param, inverse, scale, sums)
            elif kind == SMOOTH_L1:
                _tiles(_smooth_l1, xs, ys, ws, ls, gs, gos, param, inverse, scale, sums)
            else:
                _tiles(_huber, xs, ys, ws, ls, gs, gos, param, inverse, scale, sums)
        for k in range(end - whole):  # under 64 elements: one loop for every kind
            j = whole + k
            loss, g = _element(kind, np.float64(x[j]) - np.float64(y[j]), param, inverse)
            sums[k] += finish_element(j, loss, g, w, loss_out, grad_out, go, scale)
        partials[c] = tree_sum(sums)
    return ordered_sum(partials)


def _wide(kind, dtype):
    """512-bit vectors for float32 smooth L1 and Huber (10^6 in cache: 15-38% faster,
    10^7: 3-18%); not for MSE and L1, whose elements are the cheapest (MSE 5% slower at 10^7,
    L1 5% at 10^6 and 10^7), nor for float64 input, where all four measured 6-25% slower."""
    return True if kind in (SMOOTH_L1, HUBER) and dtype == np.float32 else None


def _flat(array):
    return None if array is None else array.ravel()


def regression(p, loss_out, grads, grad_output, scale):
    """The KernelSpec function of all four losses; ``p.params = (kind, beta or delta)``."""
    x, y, w = p.arrays
    kind, param = p.params
    return _regression(
        x.size,
        kind,
        x.ravel(),
        y.ravel(),
        w.ravel() if w.size else None,
        param,
        _flat(loss_out),
        _flat(grads[0]) if grads else None,
        _flat(grad_output) if grads else None,
        scale,
        _wide(kind, x.dtype),
    )


def _fast(kind, param, arrays, out):
    """``value_and_grad(input, target, out=out)`` with the default options (``"mean"``, no
    weight): the general path's kernel and arguments, minus its per-call layers."""
    ready = ready_elementwise(arrays, out)
    if ready is None:
        return None
    x, y, out, grad = ready
    n = x.size
    total = _regression(n, kind, x, y, None, param, None, grad, None, 1 / n, _wide(kind, x.dtype))
    return out.dtype.type(total / n), out


def fast_mse_loss(arrays, out):
    return _fast(MSE, 0.0, arrays, out)


def fast_l1_loss(arrays, out):
    return _fast(L1, 0.0, arrays, out)


def fast_smooth_l1_loss(arrays, out):
    return _fast(SMOOTH_L1, DEFAULT_BETA, arrays, out)


def fast_huber_loss(arrays, out):
    return _fast(HUBER, DEFAULT_DELTA, arrays, out)
