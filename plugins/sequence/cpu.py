"""CPU kernel of ``ctc_loss``: the forward (alpha) and backward (beta) recursions of CTC in
log space, in float64, one sample per ``prange`` iteration.

Each sample's loss and gradient are computed by one thread from its own arrays, so they do
not depend on the thread count; the per-sample losses are added in sample order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from lossforge.runtime import mathfn
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
def _lse_row(x, y, z, mask, emit, out):
    """``out[s] = log(exp(x[s]) + exp(y[s]) + exp(z[s] + mask[s])) + emit[s]``: one time
    step of a recursion, over every position at once. Branch-free, with ``runtime.mathfn``'s
    exp and log, so that the loop vectorizes; ``mask`` is 0 where the skip transition is
    allowed, -inf where not. The largest term is ``exp(0) = 1``: two exponentials, not three
    (this loop is most of the kernel's time)."""
    for s in range(out.size):
        a = x[s]
        b = y[s]
        c = z[s] + mask[s]
        hi = a if a > b else b
        lo = b if a > b else a
        m = c if c > hi else hi
        mid = hi if c > hi else c  # {lo, mid, m} are {a, b, c}
        shift = m if m > -math.inf else 0.0  # three -inf give -inf, not nan (as PyTorch)
        total = mathfn.exp_nonpositive_f64(lo - shift) + mathfn.exp_nonpositive_f64(mid - shift)
        out[s] = mathfn.log(1.0 + total) + m + emit[s]


@inline
def _emissions(lp, t, n, ext, out):
    for s in range(ext.size):
        out[s] = np.float64(lp[t, n, ext[s]])


@parallel_kernel
def _ctc(lp, targets, offsets, il, tl, blank, zero_infinity, mean, loss_out, grad_out, go, scale):
    steps_max, batch, classes = lp.shape
    want_grad = grad_out.size > 0
    losses = np.empty(batch)
    for n in prange(batch):
        off, length, steps = offsets[n], tl[n], il[n]
        width = 2 * length + 1
        ext = np.empty(width, np.int64)  # l'
        into = np.empty(width)  # 0 where s may be reached from s - 2, else -inf
        outof = np.empty(width)  # 0 where s + 2 may be reached from s, else -inf
        for s in range(width):
            ext[s] = _label(targets, off, s, blank)
            into[s] = 0.0 if _skip(targets, off, s) else -math.inf
            outof[s] = 0.0 if s + 2 < width and _skip(targets, off, s + 2) else -math.inf
        emit = np.empty(width)
        # alpha's rows start with two -inf (positions -2 and -1), beta's end with two
        alpha = np.full((max(steps, 1), width + 2), -math.inf)
        beta = np.full((max(steps, 1) if want_grad else 0, width + 2), -math.inf)
        nll = 0.0 if length == 0 else math.inf  # no frame: only the empty target
        if steps > 0:
            alpha[0, 2] = np.float64(lp[0, n, blank])
            if length > 0:
                alpha[0, 3] = np.float64(lp[0, n, ext[1]])
            for t in range(1, steps):
                _emissions(lp, t, n, ext, emit)
                prev = alpha[t - 1]
                _lse_row(prev[2:], prev[1:-1], prev[:-2], into, emit, alpha[t, 2:])
            last = steps - 1
            nll = -_lse3(alpha[last, width + 1], alpha[last, width], -math.inf)
            if want_grad:
                beta[last, width - 1] = np.float64(lp[last, n, blank])
                if length > 0:
                    beta[last, width - 2] = np.float64(lp[last, n, ext[width - 2]])
                for t in range(last - 1, -1, -1):
                    _emissions(lp, t, n, ext, emit)
                    after = beta[t + 1]
                    _lse_row(after[:-2], after[1:-1], after[2:], outof, emit, beta[t, :-2])
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
            row = np.empty(classes)
            for t in range(steps_max):
                out = grad_out[t, n]
                if t >= steps or zeroed:
                    out[:] = 0.0
                    continue
                if nll == math.inf:  # no alignment: PyTorch's gradient is nan
                    out[:] = math.nan
                    continue
                # exp(log_probs) less the posterior of each class: the occupancies
                # exp(alpha + beta + nll - log_probs) of the positions holding it
                for c in range(classes):
                    row[c] = mathfn.exp(np.float64(lp[t, n, c]))
                _emissions(lp, t, n, ext, emit)
                for s in range(width):
                    emit[s] = mathfn.exp(alpha[t, s + 2] + beta[t, s] + nll - emit[s])
                for s in range(width):
                    row[ext[s]] -= emit[s]
                for c in range(classes):
                    out[c] = row[c] * g
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
