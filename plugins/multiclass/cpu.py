"""The hand-written CPU kernels of the multi-class family, on rows of ``(R, C)``: those the
``kernels.Softmax`` template does not make. ``nll_loss`` is a gather and a scatter, no
softmax (``_nll``); cross_entropy's Hessian diagonal (``_cross_entropy_hessian``), which the
template does not derive. cross_entropy's value and gradient come from its row formula
(``formulas.cross_entropy``) through the template.

Rows are grouped into chunks of about ``CHUNK`` elements (boundaries depend on the shape
only); per-row losses are summed by ``tree_sum`` per block and the chunk partials in order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from lossforge import validate
from lossforge.runtime import mathfn
from lossforge.runtime.cpu import (
    BLOCK,
    IGNORE_INDEX,
    check_class_targets,
    jit,
    ordered_sum,
    padded,
    parallel_kernel,
    rows_per_chunk,
    total_class_weight,
    tree_sum,
)

#: Elements from which the multi-class kernels run in parallel, above the element-wise
#: default: a serial call with the default options takes the fast path (``KernelSpec.fast``),
#: which spares the ~10 us of per-call layers and second parallel region (the target check)
#: that a parallel call pays. Measured through the public API on 2 threads, parallel calls
#: broke even at 65536 elements for cross_entropy (rows of 100 and 1000; rows of 10 gained
#: from 32768) and at 131072-262144 for nll_loss (a memset, which one core nearly saturates).
#: cross_entropy's is its ``Softmax``'s ``parallel_min`` (``__init__.py``).
CROSS_ENTROPY_PARALLEL_MIN = 1 << 16
NLL_PARALLEL_MIN = 1 << 17


def check_targets(t, classes, ignore_index, w):
    """(first out-of-range target or ``ignore_index`` if none, summed weight of the counted
    targets: the "mean" denominator) of int64 class indices ``t``."""
    bad, denominator = check_class_targets(t.size, t, classes, ignore_index, w)
    if bad:
        return int(t[(t != ignore_index) & ((t < 0) | (t >= classes))][0]), denominator
    return ignore_index, denominator


@parallel_kernel(parallel_min=NLL_PARALLEL_MIN)
def _nll(x, t, w, ignore_index, loss_out, grad_out, go, scale):
    rows, classes = x.shape
    per_chunk = rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    for c in prange(chunks):
        buf = np.empty(BLOCK)
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            # the picks from the input first, in a loop of their own: their cache misses
            # overlap each other instead of queueing behind the stores of the zeros
            for i in range(lo, hi):
                k = t[i]
                loss = 0.0
                if k != ignore_index:
                    wt = 1.0 if w is None else np.float64(w[k])
                    loss = -wt * np.float64(x[i, k])
                if loss_out is not None:
                    loss_out[i] = loss
                buf[i - lo] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
            if grad_out is not None:  # one contiguous run of zeros, then the picks
                zeros = grad_out.reshape(-1)[lo * classes : hi * classes]
                for q in range(zeros.size):  # a plain loop: LLVM makes it a memset
                    zeros[q] = 0.0
                for i in range(lo, hi):
                    k = t[i]
                    if k != ignore_index:
                        wt = 1.0 if w is None else np.float64(w[k])
                        g = scale if go is None else scale * np.float64(go[i])
                        grad_out[i, k] = -wt * g
        partials[c] = s
    return ordered_sum(partials)


@parallel_kernel(parallel_min=CROSS_ENTROPY_PARALLEL_MIN)
def _cross_entropy_hessian(
    z, t, y, w, probabilities, ignore_index, smoothing, loss_out, grad_out, hess_out, go, scale
):
    """``grad_hess`` of cross_entropy, in float64 per row, for class indices ``t`` or, with
    ``probabilities``, targets ``y`` (the other one empty). With the row's coefficients ``c``
    (target, smoothing and class weights folded in) and ``A = sum_j c_j``: loss
    ``A lse - sum_j c_j z_j``, gradient ``A p - c``, Hessian diagonal ``A p (1 - p)``, both
    times the row's ``grad_output`` and ``scale``. Absent ``w``, ``loss_out`` and ``go`` are
    length 0: one compiled signature per dtype (and variant), for a path that boosting
    calls once a round, not in an inner loop."""
    rows, classes = z.shape
    per_chunk = rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    width = padded(classes)
    off = smoothing / classes if classes else 0.0
    weighted = w.size > 0
    total_weight = total_class_weight(w if weighted else None, classes)
    for c in prange(chunks):
        buf = np.empty(BLOCK)
        e = np.empty(width)
        coefficients = np.empty(width)
        scratch = np.empty(width)
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                zs = z[i]
                gs = grad_out[i]
                hs = hess_out[i]
                k = -1 if probabilities else t[i]
                loss = 0.0
                if k == ignore_index and not probabilities:
                    gs[:] = 0.0
                    hs[:] = 0.0
                else:
                    if probabilities:
                        for j in range(classes):
                            a = (1.0 - smoothing) * np.float64(y[i, j]) + off
                            coefficients[j] = a * np.float64(w[j]) if weighted else a
                            scratch[j] = coefficients[j]
                        scratch[classes:] = 0.0
                        big_a = tree_sum(scratch)
                    else:
                        for j in range(classes):
                            coefficients[j] = off * np.float64(w[j]) if weighted else off
                        wt = np.float64(w[k]) if weighted else 1.0
                        coefficients[k] += (1.0 - smoothing) * wt
                        big_a = (1.0 - smoothing) * wt + off * total_weight
                    m = np.float64(mathfn.array_max(zs))
                    for j in range(classes):
                        e[j] = math.exp(np.float64(zs[j]) - m)
                        scratch[j] = e[j]
                    scratch[classes:] = 0.0
                    total = tree_sum(scratch)
                    for j in range(classes):
                        scratch[j] = coefficients[j] * np.float64(zs[j])
                    scratch[classes:] = 0.0
                    loss = big_a * (m + math.log(total)) - tree_sum(scratch)
                    g = scale * np.float64(go[i]) if go.size > 0 else scale
                    for j in range(classes):
                        q = e[j] / total
                        gs[j] = (big_a * q - coefficients[j]) * g
                        hs[j] = big_a * q * (1.0 - q) * g
                if loss_out.size > 0:
                    loss_out[i] = loss
                buf[i - lo] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    return ordered_sum(partials)


def cross_entropy_hessian(p, loss_out, grads, hessians, grad_output, scale):
    """``KernelSpec.hessian`` of cross_entropy: see ``_cross_entropy_hessian``."""
    z, t, w = p.arrays
    probabilities = p.params["probabilities"]
    y = t if probabilities else np.empty((0, z.shape[1]), z.dtype)
    t = np.empty(0, np.int64) if probabilities else t
    moved = p.params["moved"]
    grad, hess = grads[0], hessians[0]
    if moved is None:  # a 1-D input is one row
        rows_grad, rows_hess = grad.reshape(z.shape), hess.reshape(z.shape)
    else:
        rows_grad, rows_hess = np.empty_like(z), np.empty_like(z)
    nothing = validate.no_weight(z.dtype, "cpu")
    total = _cross_entropy_hessian(
        z.size,
        z,
        t,
        y,
        w,
        probabilities,
        p.params["ignore_index"],
        p.params["label_smoothing"],
        nothing if loss_out is None else loss_out.reshape(-1),
        rows_grad,
        rows_hess,
        nothing if grad_output is None else grad_output.reshape(-1),
        scale,
    )
    if moved is not None:  # (N, d1, ..., dk, C) back to (N, C, d1, ..., dk)
        np.copyto(grad, np.moveaxis(rows_grad.reshape(moved), -1, 1))
        np.copyto(hess, np.moveaxis(rows_hess.reshape(moved), -1, 1))
    return total


def nll_loss(p, loss_out, grads, grad_output, scale):
    """Runs ``_nll`` on ``p.arrays = (rows, targets, weight)``, moving the gradient back to
    the input's layout when the rows are a moved copy (K-dimensional)."""
    x, t, w = p.arrays
    moved = p.params["moved"]
    rows_grad = grads[0] if grads else None
    if moved is not None and rows_grad is not None:
        rows_grad = np.empty_like(x)
    elif rows_grad is not None and rows_grad.ndim != 2:  # a 1-D input of one row
        rows_grad = rows_grad.reshape(x.shape)
    total = _nll(
        x.size,
        x,
        t,
        w if w.size else None,
        p.params["ignore_index"],
        None if loss_out is None else loss_out.reshape(-1),
        rows_grad,
        None if grad_output is None else grad_output.reshape(-1),
        scale,
    )
    if moved is not None and rows_grad is not None:  # (N, d1, ..., dk, C) -> (N, C, d1, ...)
        np.copyto(grads[0], np.moveaxis(rows_grad.reshape(moved), -1, 1))
    return total


# the serial variants as module globals: compiled code can call those, not attributes
_check_targets_serial = check_class_targets.serial
_nll_serial = _nll.serial


@jit
def _checked_nll_loss(x, t, out):
    """The serial target check and kernel of a small fast-lane call in one compiled call
    (each call from Python costs about 0.4 us): (sum of the losses, "mean" denominator), the
    denominator 0 when a target is out of range or all are ignored."""
    bad, denominator = _check_targets_serial(t, x.shape[1], IGNORE_INDEX, None)
    if bad or denominator == 0.0:
        return 0.0, 0.0
    total = _nll_serial(x, t, None, IGNORE_INDEX, None, out, None, 1.0 / denominator)
    return total, denominator


def fast_nll_loss(arrays, out):
    """``KernelSpec.fast`` of ``nll_loss``: ``value_and_grad(input, target, out=out)`` with
    the default options on small ready NumPy rows, as ``kernels.Softmax.fast`` does for the
    softmax losses; ``None`` for anything else (the general path handles it)."""
    if len(arrays) != 2:
        return None
    x, t = arrays
    dtype = validate.ready_rows(x, t)
    if dtype is None or x.size >= _nll.parallel_min:
        return None
    if out is None:
        out = np.empty(x.shape, dtype)
    elif not validate.ready_out(out, x.shape, dtype, arrays):
        return None
    total, denominator = _checked_nll_loss(x, t, out)
    if not denominator:
        return None
    return dtype.type(total / denominator), out
