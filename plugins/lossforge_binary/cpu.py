"""CPU kernels of the binary and multi-label losses.

``binary_cross_entropy`` and ``binary_cross_entropy_with_logits`` are element-wise: one fused
pass like the regression family's, the loss a loop-invariant switch. Broadcast weights
arrive materialised to the input's shape (or ``None``). ``multilabel_soft_margin_loss`` sums
the logits loss over each row's classes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from lossforge.runtime.cpu import BLOCK, CHUNK, jit, parallel_kernel, tree_sum

BCE, BCE_LOGITS = 0, 1

#: PyTorch clamps each log term of binary_cross_entropy at -100, and the denominator of its
#: gradient at 1e-12 held in a float32 (its CPU kernel's constant), so that inputs of exactly
#: 0 or 1 stay finite.
LOG_FLOOR = -100.0
GRAD_EPSILON = float(np.float32(1e-12))


@jit
def _softplus(x):
    """log(1 + exp(x)), stable for any x."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@jit
def _sigmoid(x):
    e = math.exp(-abs(x))
    return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)


@jit
def _element(kind, x, y, pw):
    """(loss, d loss / d x) of one element in float64; ``pw`` is the positive-class weight."""
    if kind == BCE:
        loss = -(y * max(math.log(x), LOG_FLOOR) + (1.0 - y) * max(math.log(1.0 - x), LOG_FLOOR))
        return loss, (x - y) / max((1.0 - x) * x, GRAD_EPSILON)
    # BCE_LOGITS: pw y softplus(-x) + (1 - y) softplus(x)
    loss = pw * y * _softplus(-x) + (1.0 - y) * _softplus(x)
    return loss, (pw * y + 1.0 - y) * _sigmoid(x) - pw * y


@parallel_kernel
def _binary(kind, x, y, w, pw, loss_out, grad_out, go, scale):
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    partials = np.empty(chunks)
    for c in prange(chunks):
        buf = np.empty(BLOCK)
        s = 0.0
        end = min(c * CHUNK + CHUNK, n)
        for lo in range(c * CHUNK, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for k in range(hi - lo):
                i = lo + k
                p = 1.0 if pw is None else np.float64(pw[i])
                loss, g = _element(kind, np.float64(x[i]), np.float64(y[i]), p)
                if w is not None:
                    loss *= w[i]
                    g *= w[i]
                if loss_out is not None:
                    loss_out[i] = loss
                if grad_out is not None:
                    if go is not None:
                        g *= go[i]
                    grad_out[i] = g * scale
                buf[k] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    total = 0.0
    for c in range(chunks):
        total += partials[c]
    return total


@jit
def _any_outside_unit(x):
    """The first element outside [0, 1] (nan passes: it propagates), or 0.5 if none."""
    for i in range(x.size):
        v = x[i]
        if v < 0 or v > 1:
            return np.float64(v)
    return 0.5


@parallel_kernel
def _multilabel(z, y, w, loss_out, grad_out, go, scale):
    rows, classes = z.shape
    per_chunk = max(1, CHUNK // max(classes, 1))
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    inverse = 1.0 / classes if classes else 0.0
    for c in prange(chunks):
        buf = np.empty(BLOCK)
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                g = scale * inverse if go is None else scale * inverse * np.float64(go[i])
                row = 0.0
                for j in range(classes):
                    loss, d = _element(BCE_LOGITS, np.float64(z[i, j]), np.float64(y[i, j]), 1.0)
                    if w is not None:
                        loss *= w[i, j]
                        d *= w[i, j]
                    row += loss
                    if grad_out is not None:
                        grad_out[i, j] = d * g
                row *= inverse
                if loss_out is not None:
                    loss_out[i] = row
                buf[i - lo] = row
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    total = 0.0
    for c in range(chunks):
        total += partials[c]
    return total


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
    z, y, w = p.arrays
    return _multilabel(
        z.size,
        z,
        y,
        w,
        _flat(loss_out),
        grads[0].reshape(z.shape) if grads else None,
        _flat(grad_output) if grads else None,
        scale,
    )
