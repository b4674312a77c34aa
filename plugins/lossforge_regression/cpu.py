"""CPU kernels of the regression family: one fused value-and-gradient pass, shared by the
four losses (the loss is a loop-invariant switch, which LLVM unswitches)."""

from __future__ import annotations

import numpy as np
from numba import prange

from lossforge.runtime.cpu import CHUNK, jit, or_empty, parallel_kernel

MSE, L1, SMOOTH_L1, HUBER = 0, 1, 2, 3


@jit
def _element(kind, d, param):
    """(loss, d loss / d input) of one element, d = input - target, in float64."""
    if kind == MSE:
        return d * d, 2.0 * d
    a = abs(d)
    if kind == L1:  # PyTorch's sign: 0 for nan, unlike the other branches
        return a, np.float64(d > 0) - np.float64(d < 0)
    if kind == SMOOTH_L1:  # param = beta; beta = 0 is l1_loss, as in PyTorch
        if a < param:
            return 0.5 * d * d / param, d / param
        return a - 0.5 * param, np.sign(d)
    # HUBER, param = delta
    if a < param:
        return 0.5 * d * d, d
    return param * (a - 0.5 * param), param * np.sign(d)


@parallel_kernel
def _regression(kind, x, y, w, param, loss_out, grad_out, go, scale):
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    partials = np.empty(chunks)
    weighted = w.size > 0
    want_loss = loss_out.size > 0
    want_grad = grad_out.size > 0
    per_element_go = go.size > 0
    for c in prange(chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        xs = x[lo:hi]
        ys = y[lo:hi]
        s = 0.0
        for k in range(hi - lo):
            loss, g = _element(kind, np.float64(xs[k]) - np.float64(ys[k]), param)
            if weighted:
                loss *= w[lo + k]
                g *= w[lo + k]
            if want_loss:
                loss_out[lo + k] = loss
            if want_grad:
                if per_element_go:
                    g *= go[lo + k]
                grad_out[lo + k] = g * scale
            s += loss
        partials[c] = s
    total = 0.0
    for c in range(chunks):
        total += partials[c]
    return total


def regression(p, loss_out, grads, grad_output, scale):
    """The KernelSpec function of all four losses; ``p.params = (kind, beta or delta)``."""
    x, y, w = p.arrays
    kind, param = p.params
    dt = p.dtype
    return _regression(
        x.size,
        kind,
        x.reshape(-1),
        y.reshape(-1),
        w.reshape(-1),
        param,
        or_empty(loss_out, dt),
        or_empty(grads[0] if grads else None, dt),
        or_empty(grad_output, dt),
        scale,
    )
