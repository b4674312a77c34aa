"""CPU kernels of the multi-class family, on rows of logits ``z`` of shape ``(R, C)``.

Per row, with ``lse = log(sum_c exp(z_c))`` computed as ``max + log(sum exp(z - max))``:
the loss is ``-sum_c a_c (z_c - lse)`` for class coefficients ``a`` (the one-hot target,
label smoothing and class weights folded in) and its gradient is ``A softmax(z) - a`` with
``A = sum_c a_c``. A row is read three times (max, sum of exponentials, gradient), from cache
where it fits, and the gradient is written once.

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
    CHUNK,
    inline,
    jit,
    ordered_sum,
    padded,
    parallel_kernel,
    tree_sum,
    wide_vectors,
    widened_sum,
)

#: Elements from which the multi-class kernels run in parallel, above the element-wise
#: default: a serial call with the default options takes the fast path (``KernelSpec.fast``),
#: which spares the ~10 us of per-call layers and second parallel region (the target check)
#: that a parallel call pays. Measured through the public API on 2 threads, parallel calls
#: broke even at 65536 elements for cross_entropy (rows of 100 and 1000; rows of 10 gained
#: from 32768) and at 131072-262144 for nll_loss (a memset, which one core nearly saturates).
CROSS_ENTROPY_PARALLEL_MIN = 1 << 16
NLL_PARALLEL_MIN = 1 << 17


def check_targets(t, classes, ignore_index, w):
    """(first out-of-range target or ``ignore_index`` if none, summed weight of the counted
    targets: the "mean" denominator) of int64 class indices ``t``."""
    bad, denominator = _check_targets(t.size, t, classes, ignore_index, w)
    if bad:
        return int(t[(t != ignore_index) & ((t < 0) | (t >= classes))][0]), denominator
    return ignore_index, denominator


# both losses' target check: a scan of the targets alone, cheap enough to stay serial longest
@parallel_kernel(parallel_min=NLL_PARALLEL_MIN)
def _check_targets(t, classes, ignore_index, w):
    """(how many targets are out of range, summed weight of the others): counted without
    branches so that the pass vectorizes (a search that stops at the first bad target does
    not), per chunk, the partial sums added in chunk order."""
    n = t.size
    chunks = (n + CHUNK - 1) // CHUNK
    bad = np.empty(chunks, np.int64)
    partials = np.empty(chunks)
    for c in prange(chunks):
        ts = t[c * CHUNK : min(c * CHUNK + CHUNK, n)]
        count = 0
        kept = 0
        for i in range(ts.size):
            k = ts[i]
            counted = k != ignore_index
            count += counted & ((k < 0) | (k >= classes))
            kept += counted
        bad[c] = count
        if w is None:
            partials[c] = kept
        else:  # a gather: weights of the counted targets
            s = 0.0
            for i in range(ts.size):
                k = ts[i]
                if k != ignore_index and k >= 0 and k < classes:
                    s += np.float64(w[k])
            partials[c] = s
    return bad.sum(), ordered_sum(partials)


@jit
def _rows_per_chunk(classes):
    return max(1, CHUNK // max(classes, 1))


@jit
def _total_weight(w, classes):
    """The summed class weights (the class count without weights), for label smoothing."""
    if w is None:
        return float(classes)
    total = 0.0
    for j in range(classes):
        total += np.float64(w[j])
    return total


#: Rows of up to this many classes sum their exponentials through a widened copy and
#: ``tree_sum``, longer ones through ``widened_sum`` (the tree's first level fused into the
#: widening): on short rows the fused form measured 4-5% slower.
SHORT_ROW_CLASSES = 256


def long_rows_for(classes):
    """The ``long_rows`` argument of the row kernels: ``None`` for rows of up to
    ``SHORT_ROW_CLASSES``, ``True`` for longer ones. A type, not a value: each kind of row
    compiles into a kernel of its own, without the other's code. With both in one kernel,
    chosen per row, the serial variant ran rows of 32 to 128 classes 30-45% slower (LLVM
    optimised its row loop less well; the parallel variant's was not affected)."""
    return True if classes > SHORT_ROW_CLASSES else None


@inline
def _softmax_row(zs, e, scratch, long_rows):
    """Writes exp(z - max) into ``e[:C]`` and returns (log-sum-exp, sum of ``e``) in float64.
    ``e`` has the logits' dtype: a float32 row is worked on in float32 vectors of 16 lanes,
    and only the sum is widened, into ``scratch``."""
    classes = zs.size
    # exact: the maximum is one of the row's; nan rows give nan (exp of nan)
    m = mathfn.array_max(zs)
    for j in range(classes):
        e[j] = mathfn.exp_nonpositive(zs[j] - m)
    if long_rows is not None:
        total = widened_sum(e, classes, scratch)
    else:
        for j in range(classes):
            scratch[j] = e[j]
        scratch[classes:] = 0.0
        total = tree_sum(scratch)
    return np.float64(m) + math.log(total), total


@parallel_kernel(parallel_min=CROSS_ENTROPY_PARALLEL_MIN)
def _cross_entropy_index(
    z, t, w, ignore_index, smoothing, long_rows, loss_out, grad_out, go, scale
):
    """``smoothing`` is ``None`` when there is none and ``long_rows`` is ``long_rows_for(C)``:
    types to Numba, so that each case compiles without the others' code (the serial variant
    ran rows of 100 15-20% faster without the smoothing code, on top of ``long_rows``)."""
    rows, classes = z.shape
    per_chunk = _rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    width = padded(classes)
    off = 0.0 if smoothing is None else smoothing / classes
    total_weight = _total_weight(w, classes)
    for c in prange(chunks):
        wide_vectors()
        buf = np.empty(BLOCK)
        e = np.empty(width, z.dtype)
        scratch = np.empty(width)
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                k = t[i]
                if k == ignore_index:
                    loss = 0.0
                    if grad_out is not None:
                        grad_out[i, :] = 0.0
                else:
                    zs = z[i]
                    lse, total = _softmax_row(zs, e, scratch, long_rows)
                    wt = 1.0 if w is None else np.float64(w[k])
                    hit = wt if smoothing is None else (1.0 - smoothing) * wt
                    loss = hit * (lse - np.float64(zs[k]))
                    if smoothing is not None:  # + off * sum_c w_c (lse - z_c)
                        for j in range(classes):
                            wj = 1.0 if w is None else np.float64(w[j])
                            scratch[j] = wj * np.float64(zs[j])
                        scratch[classes:] = 0.0
                        loss += off * (total_weight * lse - tree_sum(scratch))
                    if grad_out is not None:
                        g = scale if go is None else scale * np.float64(go[i])
                        # in the logits' dtype, like e: keeps float32 rows 16 lanes wide
                        big_a = mathfn.like(z, (hit + off * total_weight) * g / total)
                        shift = mathfn.like(z, off * g)
                        gs = grad_out[i]
                        if w is None:
                            for j in range(classes):
                                gs[j] = big_a * e[j] - shift
                        else:
                            for j in range(classes):
                                gs[j] = big_a * e[j] - shift * w[j]
                        gs[k] -= hit * g
                if loss_out is not None:
                    loss_out[i] = loss
                buf[i - lo] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    return ordered_sum(partials)


#: cross_entropy with at most this many classes runs the kernel vectorized across rows: the
#: crossover measured on 10^6 logits, float32 and float64. The row kernel's time depends on C
#: modulo the vector width (rows of 32 classes run 40-60% faster than rows of 31), the
#: transposing kernel's hardly at all.
FEW_CLASSES = 31
#: Rows transposed at a time by that kernel. Reading a class across 256 rows of 256 bytes
#: (float64 C = 32, float32 C = 64) touched a quarter of L1's sets and evicted its own lines:
#: 2.3x slower than 128 rows, which are also 5-15% faster for other float32 class counts.
ROW_BLOCK = 128


@parallel_kernel(parallel_min=CROSS_ENTROPY_PARALLEL_MIN)
def _cross_entropy_few(z, t, w, ignore_index, smoothing, loss_out, grad_out, go, scale):
    """cross_entropy for few classes (C <= FEW_CLASSES): blocks of rows are transposed to
    (C, rows) so that every loop runs along rows, where it vectorizes; a row-by-row kernel
    spends its time in loop overhead on rows of a few elements."""
    rows, classes = z.shape
    per_chunk = _rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    off = smoothing / classes if classes else 0.0
    total_weight = _total_weight(w, classes)
    for c in prange(chunks):
        wide_vectors()
        first = c * per_chunk
        end = min(first + per_chunk, rows)
        # per-class columns in the logits' dtype (float32: 16 lanes); sums widened to float64.
        # Two allocations, sliced and no longer than the chunk: on small inputs allocating
        # and zeroing cost as much as the rows.
        block = min(ROW_BLOCK, end - first)
        narrow = np.empty((2 * classes + 3, block), z.dtype)
        zt = narrow[:classes]  # logits, then the gradient, transposed
        et = narrow[classes : 2 * classes]
        m = narrow[2 * classes]
        row_a = narrow[2 * classes + 1]  # the gradient is row_a e - row_shift w
        row_shift = narrow[2 * classes + 2]
        wide = np.zeros((3, block))
        sums = wide[0]  # of the exponentials, then their reciprocals
        lse = wide[1]
        wz = wide[2]
        losses = np.zeros(padded(end - first))  # zero padding: the tree's sum is the same
        for r0 in range(first, end, ROW_BLOCK):
            nb = min(ROW_BLOCK, end - r0)
            zb = z.reshape(-1)[r0 * classes : (r0 + nb) * classes]
            for j in range(classes):
                col = zt[j]
                for r in range(nb):
                    col[r] = zb[r * classes + j]
            m[:nb] = zt[0, :nb]
            for j in range(classes):
                col = zt[j]
                for r in range(nb):
                    m[r] = col[r] if col[r] > m[r] else m[r]
            if off != 0.0:
                for j in range(classes):
                    wj = 1.0 if w is None else np.float64(w[j])
                    col = zt[j]
                    for r in range(nb):
                        wz[r] += wj * np.float64(col[r])
            sums[:nb] = 0.0
            for j in range(classes):
                col = zt[j]
                ecol = et[j]
                for r in range(nb):
                    ecol[r] = mathfn.exp_nonpositive(col[r] - m[r])
                for r in range(nb):
                    sums[r] += np.float64(ecol[r])
            for r in range(nb):  # vectorizes: the log and reciprocal of every row at once
                lse[r] = np.float64(m[r]) + mathfn.log(sums[r])
                sums[r] = 1.0 / sums[r]
            for r in range(nb):
                i = r0 + r
                k = t[i]
                loss = 0.0
                row_a[r] = 0.0
                row_shift[r] = 0.0
                if k != ignore_index:
                    wt = 1.0 if w is None else np.float64(w[k])
                    hit = (1.0 - smoothing) * wt
                    loss = hit * (lse[r] - np.float64(z[i, k]))
                    loss += off * (total_weight * lse[r] - wz[r])
                    g = scale if go is None else scale * np.float64(go[i])
                    row_a[r] = (hit + off * total_weight) * g * sums[r]
                    row_shift[r] = off * g
                if loss_out is not None:
                    loss_out[i] = loss
                losses[i - first] = loss
            wz[:nb] = 0.0
            if grad_out is not None:
                for j in range(classes):
                    wj = mathfn.like(z, 1.0) if w is None else w[j]
                    ecol = et[j]
                    gcol = zt[j]
                    for r in range(nb):
                        gcol[r] = row_a[r] * ecol[r] - row_shift[r] * wj
                gb = grad_out.reshape(-1)[r0 * classes : (r0 + nb) * classes]
                for j in range(classes):
                    gcol = zt[j]
                    for r in range(nb):
                        gb[r * classes + j] = gcol[r]
                for r in range(nb):
                    i = r0 + r
                    k = t[i]
                    if k != ignore_index:
                        wt = 1.0 if w is None else np.float64(w[k])
                        g = scale if go is None else scale * np.float64(go[i])
                        grad_out[i, k] -= (1.0 - smoothing) * wt * g
        partials[c] = tree_sum(losses)
    return ordered_sum(partials)


@parallel_kernel(parallel_min=CROSS_ENTROPY_PARALLEL_MIN)
def _cross_entropy_probs(z, y, w, smoothing, long_rows, loss_out, grad_out, go, scale):
    rows, classes = z.shape
    per_chunk = _rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    width = padded(classes)
    off = smoothing / classes if classes else 0.0
    for c in prange(chunks):
        wide_vectors()
        buf = np.empty(BLOCK)
        e = np.empty(width, z.dtype)
        scratch = np.empty(width)
        coefficients = np.empty(width)
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                zs = z[i]
                ys = y[i]
                lse, total = _softmax_row(zs, e, scratch, long_rows)
                # a_c = w_c ((1 - smoothing) y_c + off); loss = A lse - sum_c a_c z_c
                for j in range(classes):
                    a = (1.0 - smoothing) * np.float64(ys[j]) + off
                    if w is not None:
                        a *= np.float64(w[j])
                    coefficients[j] = a
                    scratch[j] = a
                scratch[classes:] = 0.0
                big_a = tree_sum(scratch)
                for j in range(classes):
                    scratch[j] = coefficients[j] * np.float64(zs[j])
                scratch[classes:] = 0.0
                loss = big_a * lse - tree_sum(scratch)
                if grad_out is not None:
                    g = scale if go is None else scale * np.float64(go[i])
                    gs = grad_out[i]
                    for j in range(classes):
                        gs[j] = (big_a * e[j] / total - coefficients[j]) * g
                if loss_out is not None:
                    loss_out[i] = loss
                buf[i - lo] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    return ordered_sum(partials)


@parallel_kernel(parallel_min=NLL_PARALLEL_MIN)
def _nll(x, t, w, ignore_index, loss_out, grad_out, go, scale):
    rows, classes = x.shape
    per_chunk = _rows_per_chunk(classes)
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
    per_chunk = _rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    width = padded(classes)
    off = smoothing / classes if classes else 0.0
    weighted = w.size > 0
    total_weight = _total_weight(w if weighted else None, classes)
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


def _run(kernel, p, loss_out, grads, grad_output, scale, *options):
    """Runs a row kernel on ``p.arrays = (rows of logits, targets, weight)`` and moves the
    gradient back to the input's layout when the rows are a moved copy (K-dimensional)."""
    z, t, w = p.arrays
    moved = p.params["moved"]
    rows_grad = grads[0] if grads else None
    if moved is not None and rows_grad is not None:
        rows_grad = np.empty_like(z)
    elif rows_grad is not None and rows_grad.ndim != 2:  # a 1-D input of one row
        rows_grad = rows_grad.reshape(z.shape)
    total = kernel(
        z.size,
        z,
        t,
        w if w.size else None,
        *options,
        None if loss_out is None else loss_out.reshape(-1),
        rows_grad,
        None if grad_output is None else grad_output.reshape(-1),
        scale,
    )
    if moved is not None and rows_grad is not None:
        # (N, d1, ..., dk, C): rows are the class dimension moved last
        np.copyto(grads[0], np.moveaxis(rows_grad.reshape(moved), -1, 1))
    return total


def cross_entropy(p, loss_out, grads, grad_output, scale):
    probabilities = p.params["probabilities"]
    ignore_index, smoothing = p.params["ignore_index"], p.params["label_smoothing"]
    z = p.arrays[0]
    long = long_rows_for(z.shape[1])
    if probabilities:
        return _run(_cross_entropy_probs, p, loss_out, grads, grad_output, scale, smoothing, long)
    if z.shape[1] <= FEW_CLASSES:
        return _run(
            _cross_entropy_few, p, loss_out, grads, grad_output, scale, ignore_index, smoothing
        )
    smoothing = None if smoothing == 0.0 else smoothing
    return _run(
        _cross_entropy_index, p, loss_out, grads, grad_output, scale, ignore_index, smoothing, long
    )


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
    return _run(_nll, p, loss_out, grads, grad_output, scale, p.params["ignore_index"])


_F32, _F64, _I64 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64)

#: The default ``ignore_index`` of both losses (their ``LossSpec.options``).
IGNORE_INDEX = -100


def ready_rows(x, t):
    """The dtype when ``x`` and ``t`` are already what the kernels take: a C-contiguous
    float32/float64 NumPy ``(N, C)`` input and C-contiguous int64 ``(N)`` class indices;
    else ``None``."""
    if type(x) is not np.ndarray or type(t) is not np.ndarray:
        return None
    dtype = x.dtype
    if (dtype is not _F32 and dtype is not _F64) or t.dtype is not _I64:
        return None
    if x.ndim != 2 or t.shape != x.shape[:1]:
        return None
    return dtype if x.flags.c_contiguous and t.flags.c_contiguous else None


# the serial variants as module globals: compiled code can call those, not attributes
_check_targets_serial = _check_targets.serial
_few_serial = _cross_entropy_few.serial
_index_serial = _cross_entropy_index.serial
_nll_serial = _nll.serial


@jit
def _checked_cross_entropy(x, t, out):
    """The serial target check and kernel of a small fast-path call in one compiled call
    (each call from Python costs about 0.4 us): (sum of the losses, "mean" denominator), the
    denominator 0 when a target is out of range or all are ignored."""
    bad, denominator = _check_targets_serial(t, x.shape[1], IGNORE_INDEX, None)
    if bad or denominator == 0.0:
        return 0.0, 0.0
    scale = 1.0 / denominator
    if x.shape[1] <= FEW_CLASSES:
        total = _few_serial(x, t, None, IGNORE_INDEX, 0.0, None, out, None, scale)
    elif x.shape[1] <= SHORT_ROW_CLASSES:  # long_rows_for(classes), as a type in each branch
        total = _index_serial(x, t, None, IGNORE_INDEX, None, None, None, out, None, scale)
    else:
        total = _index_serial(x, t, None, IGNORE_INDEX, None, True, None, out, None, scale)
    return total, denominator


@jit
def _checked_nll_loss(x, t, out):
    """As ``_checked_cross_entropy``, for nll_loss."""
    bad, denominator = _check_targets_serial(t, x.shape[1], IGNORE_INDEX, None)
    if bad or denominator == 0.0:
        return 0.0, 0.0
    total = _nll_serial(x, t, None, IGNORE_INDEX, None, out, None, 1.0 / denominator)
    return total, denominator


def _fast(checked, kernel, arrays, out):
    """``value_and_grad(input, target, out=out)`` with the default options (``"mean"``, no
    weight, no smoothing) on small ready NumPy rows: what the general path computes, with the
    same serial kernel and arguments, minus its per-call layers. ``None`` for anything else
    (bad targets and an all-ignored batch included) and for inputs that run in parallel,
    where the layers cost nothing in comparison (``kernel``'s ``parallel_min``): the general
    path handles those."""
    if len(arrays) != 2:
        return None
    x, t = arrays
    dtype = ready_rows(x, t)
    if dtype is None or x.size >= kernel.parallel_min:
        return None
    if out is None:
        out = np.empty(x.shape, dtype)
    elif not validate.ready_out(out, x.shape, dtype, arrays):
        return None
    total, denominator = checked(x, t, out)
    if not denominator:
        return None
    return dtype.type(total / denominator), out


def fast_cross_entropy(arrays, out):
    """``KernelSpec.fast`` of ``cross_entropy``: see ``_fast``."""
    return _fast(_checked_cross_entropy, _cross_entropy_index, arrays, out)


def fast_nll_loss(arrays, out):
    """``KernelSpec.fast`` of ``nll_loss``: see ``_fast``."""
    return _fast(_checked_nll_loss, _nll, arrays, out)
