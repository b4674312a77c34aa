"""The hand-written CPU kernels of the multi-class family, on rows of ``(R, C)``: those the
``kernels.Softmax`` template does not make: ``nll_loss``, a gather and a scatter, no
softmax (``_nll``). cross_entropy's value, gradient and Hessian diagonal come from its row
formula (``formulas.cross_entropy``) through the template.

Rows are grouped into chunks of about ``CHUNK`` elements (boundaries depend on the shape
only); per-row losses are summed by ``tree_sum`` per block and the chunk partials in order.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from lossforge import validate
from lossforge.runtime.cpu import (
    BLOCK,
    IGNORE_INDEX,
    check_class_targets,
    jit,
    ordered_sum,
    parallel_kernel,
    rows_per_chunk,
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
