"""CUDA kernels of the binary and multi-label losses, the CPU kernels' formulas (``cpu.py``)
in float64 with deterministic per-block partials (``lossforge.runtime.cuda``).

``binary_cross_entropy``/``binary_cross_entropy_with_logits``: a grid-stride loop, four
elements a thread a round. The [0, 1] check of ``binary_cross_entropy`` is made in the same
pass: each block flags the first input (else target) outside [0, 1] it saw, and the call
raises ``ValueError`` naming the first one in memory order (as the CPU's separate passes do).

``multilabel_soft_margin_loss``: rows of classes, each row summed by a group of threads (a
whole block for long rows) with a fixed tree; the gradient is element-wise and coalesced.
"""

from __future__ import annotations

import math

from numba import cuda, float64

import lossforge_binary
from lossforge.runtime import cuda as rt
from lossforge.runtime.cuda import NO_FLAG, THREADS

BCE, BCE_LOGITS = 0, 1
LOG_FLOOR = -100.0
GRAD_EPSILON = lossforge_binary.cpu.GRAD_EPSILON  # PyTorch's float32 1e-12


@rt.device
def _softplus(x):
    """log(1 + exp(x)), stable for any x."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@rt.device
def _sigmoid(x):
    e = math.exp(-abs(x))
    return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)


@rt.device
def _element(kind, x, y, pw):
    """(loss, d loss / d x) of one element in float64; ``pw`` is the positive-class weight."""
    if kind == BCE:
        loss = -(y * max(rt.log(x), LOG_FLOOR) + (1.0 - y) * max(rt.log(1.0 - x), LOG_FLOOR))
        return loss, (x - y) / max((1.0 - x) * x, GRAD_EPSILON)
    loss = pw * y * _softplus(-x) + (1.0 - y) * _softplus(x)
    return loss, (pw * y + 1.0 - y) * _sigmoid(x) - pw * y


@rt.device
def _store(kind, i, n, xi, yi, w, pw, loss_out, grad_out, go, scale, bad):
    """Element ``i``'s loss and gradient written out; returns its loss and ``bad``, the
    smallest flag of the thread: ``i`` for a ``binary_cross_entropy`` input outside [0, 1],
    ``n + i`` for a target outside it (so an input is named before any target, as on the
    CPU)."""
    xi = float64(xi)
    yi = float64(yi)
    x_out = xi < 0.0 or xi > 1.0
    if kind == BCE and (x_out or yi < 0.0 or yi > 1.0):
        bad = min(bad, float64(i) if x_out else float64(n + i))
        loss = g = math.nan  # the call raises
    else:
        p = float64(pw[i]) if pw.size > 0 else 1.0
        loss, g = _element(kind, xi, yi, p)
    return rt.finish_element(i, loss, g, w, loss_out, grad_out, go, scale), bad


@rt.kernel
def _binary(kind, x, y, w, pw, loss_out, grad_out, go, scale, scratch):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    acc = 0.0
    bad = NO_FLAG
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    n = x.size
    # Four elements a round, loaded before the first store (see the regression kernel).
    while i + 3 * step < n:
        x0, x1, x2, x3 = x[i], x[i + step], x[i + 2 * step], x[i + 3 * step]
        y0, y1, y2, y3 = y[i], y[i + step], y[i + 2 * step], y[i + 3 * step]
        loss, bad = _store(kind, i, n, x0, y0, w, pw, loss_out, grad_out, go, scale, bad)
        acc += loss
        i += step
        loss, bad = _store(kind, i, n, x1, y1, w, pw, loss_out, grad_out, go, scale, bad)
        acc += loss
        i += step
        loss, bad = _store(kind, i, n, x2, y2, w, pw, loss_out, grad_out, go, scale, bad)
        acc += loss
        i += step
        loss, bad = _store(kind, i, n, x3, y3, w, pw, loss_out, grad_out, go, scale, bad)
        acc += loss
        i += step
    while i < n:
        loss, bad = _store(kind, i, n, x[i], y[i], w, pw, loss_out, grad_out, go, scale, bad)
        acc += loss
        i += step
    rt.write_partials(sa, sb, scratch, acc, bad)


@rt.kernel
def _multilabel(z, y, w, rows, classes, loss_out, grad_out, go, scale, lanes, scratch):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    lane = tid % lanes
    per_block = THREADS // lanes
    weighted = w.size > 0
    want_loss = loss_out.size > 0
    want_grad = grad_out.size > 0
    upstream = go.size > 0
    inverse = 1.0 / classes if classes else 0.0
    acc = 0.0
    for base in range(cuda.blockIdx.x * per_block, rows, cuda.gridDim.x * per_block):
        i = base + tid // lanes
        active = i < rows
        s = 0.0
        if active:
            g = scale * inverse if not upstream else scale * inverse * float64(go[i])
            for j in range(lane, classes, lanes):
                k = i * classes + j
                loss, d = _element(BCE_LOGITS, float64(z[k]), float64(y[k]), 1.0)
                if weighted:
                    loss *= float64(w[k])
                    d *= float64(w[k])
                s += loss
                if want_grad:
                    grad_out[k] = d * g
        row = rt.group_sum(sa, tid, lane, lanes, s)
        if active and lane == 0:
            row *= inverse
            if want_loss:
                loss_out[i] = row
            acc += row
    rt.write_partials(sa, sb, scratch, acc, NO_FLAG)


def binary(p, loss_out, grads, grad_output, scale):
    """The KernelSpec function of both binary losses; ``p.arrays = (x, y, w, pw)``."""
    x, y, w, pw = p.arrays
    kind = p.params[0]
    n = x.size
    if n == 0:
        return 0.0
    dtype = p.dtype
    blocks = rt.blocks_for(n)
    scratch = rt.partials(blocks)
    _binary[blocks, THREADS, rt.stream()](
        kind,
        rt.flat(x, dtype),
        rt.flat(y, dtype),
        rt.flat(w, dtype),
        rt.flat(pw, dtype),
        rt.flat(loss_out, dtype),
        rt.flat(grads[0], dtype) if grads else rt.nothing(dtype),
        rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
        float(scale),
        scratch,
    )
    if kind == BCE or p.reduction in ("mean", "sum"):
        total, bad = rt.finish(scratch)
        if bad >= n:
            raise lossforge_binary.outside_unit(float(rt.element(y, bad - n)), "target")
        if bad >= 0:
            raise lossforge_binary.outside_unit(float(rt.element(x, bad)))
        return total
    return 0.0


def multilabel(p, loss_out, grads, grad_output, scale):
    z, y, w = p.arrays
    rows, classes = z.shape
    if rows == 0:
        return 0.0
    dtype = p.dtype
    lanes, blocks = rt.rows_config(rows, classes)
    scratch = rt.partials(blocks)
    _multilabel[blocks, THREADS, rt.stream()](
        rt.flat(z, dtype),
        rt.flat(y, dtype),
        rt.flat(w, dtype),
        rows,
        classes,
        rt.flat(loss_out, dtype),
        rt.flat(grads[0], dtype) if grads else rt.nothing(dtype),
        rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
        float(scale),
        lanes,
        scratch,
    )
    if p.reduction in ("mean", "sum"):
        return rt.finish(scratch)[0]
    return 0.0
