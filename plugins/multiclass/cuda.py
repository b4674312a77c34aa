"""The hand-written CUDA kernels of the multi-class family, on rows of ``(R, C)``, in float64
with deterministic per-block partials (``lossforge.runtime.cuda``): those the
``kernels.Softmax`` template does not make (cross_entropy's value, gradient and Hessian
diagonal come from it).

``nll_loss`` reads one logit per row and writes its (mostly zero) gradient by groups of
threads (``runtime.cuda.rows_config``), coalesced.

``check_targets`` is the device pass ``prepare`` runs for class-index targets: the "mean"
denominator (count or summed class weights of the counted targets) and the first target
out of range, through the per-block error flags.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float64

from lossforge.runtime import cuda as rt
from lossforge.runtime.cuda import NO_FLAG, THREADS


@rt.kernel
def _check_targets(t, classes, ignore_index, w, scratch):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    weighted = w.size > 0
    acc = 0.0
    bad = NO_FLAG
    for i in range(cuda.grid(1), t.size, cuda.gridsize(1)):
        k = t[i]
        if k != ignore_index:
            if k < 0 or k >= classes:
                if bad == NO_FLAG:
                    bad = float64(i)
            else:
                acc += float64(w[k]) if weighted else 1.0
    rt.write_partials(sa, sb, scratch, acc, bad)


def check_targets(t, classes, ignore_index, w):
    """(first out-of-range target or ``ignore_index`` if none, summed weight of the counted
    targets), as ``cpu.check_targets``, from one device pass over the class indices."""
    n = t.size
    if n == 0:
        return ignore_index, 0.0
    blocks = rt.blocks_for(n)
    scratch = rt.partials(blocks)
    _check_targets[blocks, THREADS, rt.stream()](
        rt.flat(t, t.dtype), classes, ignore_index, rt.flat(w, np.float64), scratch
    )
    denominator, bad = rt.finish(scratch)
    if bad >= 0:
        return int(rt.element(t, bad)), 0.0
    return ignore_index, denominator


@rt.kernel
def _nll(x, t, w, classes, ignore_index, loss_out, grad_out, go, scale, lanes, scratch):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    rows = t.size
    weighted = w.size > 0
    want_loss = loss_out.size > 0
    upstream = go.size > 0
    acc = 0.0
    for i in range(cuda.grid(1), rows, cuda.gridsize(1)):
        k = t[i]
        loss = 0.0
        if k != ignore_index and k >= 0 and k < classes:
            wt = float64(w[k]) if weighted else 1.0
            loss = -wt * float64(x[i * classes + k])
        if want_loss:
            loss_out[i] = loss
        acc += loss
    if grad_out.size > 0:
        # By groups of threads along rows (as cross_entropy), not element-wise: finding an
        # element's row takes a 64-bit division, which the GPU does in software (nll's
        # gradient pass ran at a fifth of the memory bandwidth that way).
        tid = cuda.threadIdx.x
        lane = tid % lanes
        per_block = THREADS // lanes
        for base in range(cuda.blockIdx.x * per_block, rows, cuda.gridDim.x * per_block):
            i = base + tid // lanes
            if i < rows:
                k = t[i]
                v = 0.0
                if k != ignore_index:
                    wt = float64(w[k]) if weighted else 1.0
                    v = -wt * (scale * float64(go[i]) if upstream else scale)
                row = i * classes
                for j in range(lane, classes, lanes):
                    grad_out[row + j] = v if j == k else 0.0
    rt.write_partials(sa, sb, scratch, acc, NO_FLAG)


def _run(p, loss_out, grads, launch):
    """Runs ``launch(z, t, w, loss_out, rows_grad) -> scratch`` on ``p.arrays = (rows of
    logits, targets, weight)`` and moves the gradient back to the input's layout when the
    rows are a moved copy (K-dimensional input)."""
    z, t, w = p.arrays
    moved = p.params["moved"]
    dtype = p.dtype
    grad = grads[0] if grads else None
    rows_grad = None
    if grad is not None:
        rows_grad = grad if moved is None else rt.empty(z.shape, dtype)
    scratch = launch(
        rt.flat(z, dtype),
        t.ravel(),
        rt.flat(w, dtype),
        rt.flat(loss_out, dtype),
        rt.flat(rows_grad, dtype),
    )
    if grad is not None and moved is not None:  # (N, d1, ..., dk, C) back to (N, C, d1, ...)
        rt.copy_into(grad, rt.moveaxis(rows_grad.reshape(moved), -1, 1))
    if p.reduction in ("mean", "sum"):
        return rt.finish(scratch)[0]
    return 0.0


def _upstream(grads, grad_output, dtype):
    return rt.flat(grad_output, dtype) if grads else rt.nothing(dtype)


def nll_loss(p, loss_out, grads, grad_output, scale):
    z = p.arrays[0]
    rows, classes = z.shape
    if rows == 0:
        return 0.0
    blocks = rt.blocks_for(max(rows, rows * classes))
    lanes = rt.rows_config(rows, classes)[0]
    scratch = rt.partials(blocks)
    go = _upstream(grads, grad_output, p.dtype)

    def launch(x, t, w, loss, grad):
        _nll[blocks, THREADS, rt.stream()](
            x, t, w, classes, p.params["ignore_index"], loss, grad, go, float(scale), lanes, scratch
        )
        return scratch

    return _run(p, loss_out, grads, launch)
