"""CPU kernel of ``ctc_loss``: the forward (alpha) and backward (beta) recursions of CTC in
log space, in float64, one sample per ``prange`` iteration.

Each sample's loss and gradient are computed by one thread from its own arrays, so they do
not depend on the thread count; the per-sample losses are added in sample order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from lossforge.runtime.cpu import inline, ordered_sum, parallel_kernel


@inline
def _lse3(a, b, c):
    """log(exp(a) + exp(b) + exp(c)), as PyTorch's CTC computes it (a max of -inf taken as
    0, so that three -inf give -inf, not nan)."""
    m = max(a, max(b, c))
    if m == -math.inf:
        m = 0.0
    return math.log(math.exp(a - m) + math.exp(b - m) + math.exp(c - m)) + m


@inline
def _label(targets, off, s, blank):
    """The extended label sequence l' = (blank, l_1, blank, ..., l_L, blank) at ``s``."""
    return blank if s % 2 == 0 else targets[off + s // 2]


@inline
def _skip(targets, off, s):
    """Whether position ``s`` of l' may be reached from ``s - 2`` (a label that differs from
    the previous label)."""
    return s % 2 == 1 and s >= 2 and targets[off + s // 2] != targets[off + s // 2 - 1]


@inline
def _sample(lp, n, targets, off, length, steps, blank, want_grad, alpha, beta):
    """The negative log-likelihood of sample ``n``; fills ``alpha`` (and ``beta`` when
    ``want_grad``) over its first ``steps`` time steps and ``2 * length + 1`` positions."""
    width = 2 * length + 1
    if steps == 0:  # no frame: only the empty target is emitted, with probability 1
        return 0.0 if length == 0 else math.inf
    for s in range(width):
        alpha[0, s] = -math.inf
    alpha[0, 0] = np.float64(lp[0, n, blank])
    if length > 0:
        alpha[0, 1] = np.float64(lp[0, n, targets[off]])
    for t in range(1, steps):
        for s in range(width):
            a = alpha[t - 1, s]
            b = alpha[t - 1, s - 1] if s > 0 else -math.inf
            c = alpha[t - 1, s - 2] if _skip(targets, off, s) else -math.inf
            alpha[t, s] = _lse3(a, b, c) + np.float64(lp[t, n, _label(targets, off, s, blank)])
    last = steps - 1
    tail = alpha[last, width - 2] if length > 0 else -math.inf
    nll = -_lse3(alpha[last, width - 1], tail, -math.inf)
    if want_grad:
        for s in range(width):
            beta[last, s] = -math.inf
        beta[last, width - 1] = np.float64(lp[last, n, blank])
        if length > 0:
            beta[last, width - 2] = np.float64(lp[last, n, targets[off + length - 1]])
        for t in range(last - 1, -1, -1):
            for s in range(width):
                a = beta[t + 1, s]
                b = beta[t + 1, s + 1] if s + 1 < width else -math.inf
                c = (
                    beta[t + 1, s + 2]
                    if s + 2 < width and _skip(targets, off, s + 2)
                    else -math.inf
                )
                beta[t, s] = _lse3(a, b, c) + np.float64(lp[t, n, _label(targets, off, s, blank)])
    return nll


@parallel_kernel
def _ctc(lp, targets, offsets, il, tl, blank, zero_infinity, mean, loss_out, grad_out, go, scale):
    steps_max, batch, classes = lp.shape
    want_grad = grad_out.size > 0
    losses = np.empty(batch)
    for n in prange(batch):
        off, length, steps = offsets[n], tl[n], il[n]
        width = 2 * length + 1
        alpha = np.empty((max(steps, 1), width))
        beta = np.empty((max(steps, 1), width) if want_grad else (0, 0))
        nll = _sample(lp, n, targets, off, length, steps, blank, want_grad, alpha, beta)
        zeroed = zero_infinity and nll == math.inf
        if zeroed:
            nll = 0.0
        if loss_out.size > 0:
            loss_out[n] = nll
        weight = 1.0 / max(length, 1) if mean else 1.0
        losses[n] = nll * weight
        if want_grad:
            g = scale * weight
            if go.size > 0:
                g *= np.float64(go[n])
            lcab = np.empty(classes)
            for t in range(steps_max):
                row = grad_out[t, n]
                if t >= steps or zeroed:
                    row[:] = 0.0
                    continue
                lcab[:] = -math.inf
                for s in range(width):
                    k = _label(targets, off, s, blank)
                    v = alpha[t, s] + beta[t, s]
                    m = max(lcab[k], v)
                    if m != -math.inf:
                        lcab[k] = math.log(math.exp(lcab[k] - m) + math.exp(v - m)) + m
                for c in range(classes):
                    x = np.float64(lp[t, n, c])
                    row[c] = (math.exp(x) - math.exp(lcab[c] + nll - x)) * g
    return ordered_sum(losses)


def ctc_loss(p, loss_out, grads, grad_output, scale):
    lp, targets, offsets, il, tl = p.arrays
    nothing = np.empty(0, p.dtype)
    # the batched view: an unbatched (T, C) input is one sample of a (T, 1, C) one
    grad = grads[0].reshape(lp.shape) if grads else np.empty((0, 0, 0), p.dtype)
    return _ctc(
        lp.size if lp.shape[1] > 1 else 0,
        lp,
        targets,
        offsets,
        il,
        tl,
        p.params["blank"],
        p.params["zero_infinity"],
        p.reduction == "mean",
        nothing if loss_out is None else loss_out.reshape(-1),
        grad,
        nothing if grad_output is None else grad_output.reshape(-1),
        scale,
    )
