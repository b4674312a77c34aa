"""CPU kernel of ``ctc_loss``: the forward (alpha) and backward (beta) recursions of CTC in
log space, in float64, one sample per ``prange`` iteration.

Each sample's loss and gradient are computed by one thread from its own arrays, so they do
not depend on the thread count; the per-sample losses are added in sample order.

The per-sample work is a compiled function of its own (``_sample``), called by the serial
and the parallel variant alike: it compiles once per dtype instead of once per variant, and
the parallel variant stays a small loop (a parallel kernel with the recursions inlined took
~40 s to compile cold).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from lossforge.runtime import mathfn
from lossforge.runtime.cpu import jit, ordered_sum, parallel_kernel


@jit
def _lse_row(x, y, z, mask, emit, out):
    """``out[s] = log(exp(x[s]) + exp(y[s]) + exp(z[s] + mask[s])) + emit[s]``: one time
    step of a recursion, over every label position at once, as PyTorch computes each (the
    largest term taken out; three -inf give -inf). Branch-free, with ``runtime.mathfn``'s
    exp and log, so that the loop vectorizes; ``mask`` is 0 where the skip transition is
    allowed, -inf where not. The largest term is ``exp(0) = 1``: two exponentials, not
    three (this loop is most of the kernel's time)."""
    for s in range(out.size):
        a = x[s]
        b = y[s]
        c = z[s] + mask[s]
        hi = a if a > b else b
        lo = b if a > b else a
        m = c if c > hi else hi
        mid = hi if c > hi else c  # {lo, mid, m} are {a, b, c}
        shift = m if m > -math.inf else 0.0
        total = mathfn.exp_nonpositive_f64(lo - shift) + mathfn.exp_nonpositive_f64(mid - shift)
        out[s] = mathfn.log(1.0 + total) + m + emit[s]


@jit
def _emissions(lp, t, n, ext, out):
    """``out[s] = log_probs[t, n, l'_s]``, in float64."""
    for s in range(ext.size):
        out[s] = np.float64(lp[t, n, ext[s]])


@jit
def _sample(lp, n, targets, off, length, steps, blank, zero_infinity, grad_out, g):
    """The negative log-likelihood of sample ``n`` (0 where ``zero_infinity`` zeroes it);
    writes ``g`` times its gradient into ``grad_out[:, n]`` when ``grad_out`` is not empty.

    l' = (blank, l_1, blank, ..., l_L, blank); alpha's rows start with two -inf (positions
    -2 and -1), beta's end with two, so that every step reads whole rows."""
    steps_max, _, classes = lp.shape
    want_grad = grad_out.size > 0
    width = 2 * length + 1
    ext = np.empty(width, np.int64)
    into = np.empty(width)  # 0 where s may be reached from s - 2, else -inf
    outof = np.empty(width)  # 0 where s + 2 may be reached from s, else -inf
    for s in range(width):
        ext[s] = blank if s % 2 == 0 else targets[off + s // 2]
    for s in range(width):
        skip = s % 2 == 1 and s >= 2 and ext[s] != ext[s - 2]
        into[s] = 0.0 if skip else -math.inf
    outof[: width - 2] = into[2:]
    outof[width - 2 :] = -math.inf
    emit = np.empty(width)
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
        last = alpha[steps - 1, width:]  # positions 2L - 1 and 2L (-inf, -inf for L = 0)
        m = max(last[0], last[1])
        if m != -math.inf:  # else no alignment: inf
            nll = -(math.log(math.exp(last[0] - m) + math.exp(last[1] - m)) + m)
        if want_grad:
            final = steps - 1
            beta[final, width - 1] = np.float64(lp[final, n, blank])
            if length > 0:
                beta[final, width - 2] = np.float64(lp[final, n, ext[width - 2]])
            for t in range(final - 1, -1, -1):
                _emissions(lp, t, n, ext, emit)
                after = beta[t + 1]
                _lse_row(after[:-2], after[1:-1], after[2:], outof, emit, beta[t, :-2])
    zeroed = zero_infinity and nll == math.inf
    if not want_grad:
        return 0.0 if zeroed else nll
    row = np.empty(classes)
    for t in range(steps_max):
        out = grad_out[t, n]
        if t >= steps or zeroed:
            out[:] = 0.0
            continue
        if nll == math.inf:  # no alignment: PyTorch's gradient is nan
            out[:] = math.nan
            continue
        # exp(log_probs) less each class's posterior: the occupancies
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
    return 0.0 if zeroed else nll


@parallel_kernel
def _ctc(lp, targets, offsets, il, tl, blank, zero_infinity, mean, loss_out, grad_out, go, scale):
    losses = np.empty(lp.shape[1])
    for n in prange(lp.shape[1]):
        weight = 1.0 / max(tl[n], 1) if mean else 1.0
        g = scale * weight
        if go.size > 0:
            g *= np.float64(go[n])
        nll = _sample(lp, n, targets, offsets[n], tl[n], il[n], blank, zero_infinity, grad_out, g)
        if loss_out.size > 0:
            loss_out[n] = nll
        losses[n] = nll * weight
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
