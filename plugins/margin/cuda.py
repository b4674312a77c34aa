"""CUDA kernels of the margin family: the CPU kernels' formulas (``cpu.py``) in float64, with
the deterministic per-block partials and error flags of ``lossforge.runtime.cuda``.

``multi_margin_loss`` gives each row a group of threads reading it coalesced, as
``cross_entropy`` does; ``multilabel_margin_loss`` one thread per row (its pairs of a target
id and a class are no fixed loop that a group could share). A row whose target is out of
range is flagged (its row index) and skipped, and the wrapper raises the CPU's
``IndexError``.
"""

from __future__ import annotations

from lossforge.plugins.margin.cpu import raise_bad
from numba import cuda, float64

from lossforge.runtime import cuda as rt
from lossforge.runtime.cuda import NO_FLAG, THREADS


@rt.kernel
def _multi_margin(
    z, t, w, rows, classes, p, margin, loss_out, grad_out, hess_out, go, scale, lanes, scratch
):
    """A row per group of ``lanes`` threads (``rt.rows_config``), reading it coalesced: the
    group sums the row's hinges, slopes and active count by fixed trees, then writes its
    gradient (and Hessian diagonal)."""
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    sc = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    lane = tid % lanes
    per_block = THREADS // lanes
    weighted = w.size > 0
    want_grad = grad_out.size > 0
    want_hess = hess_out.size > 0
    curvature = 2.0 if p == 2 else 1.0
    acc = 0.0
    bad = NO_FLAG
    for first in range(cuda.blockIdx.x * per_block, rows, cuda.gridDim.x * per_block):
        i = first + tid // lanes
        active = i < rows
        k = t[i] if active else 0
        live = active and k >= 0 and k < classes
        row = i * classes
        base = margin - float64(z[row + k]) if live else 0.0
        total = 0.0
        slope = 0.0
        count = 0.0
        if live:
            for j in range(lane, classes, lanes):
                v = base + float64(z[row + j])
                if j != k and v > 0.0:
                    total += v if p == 1 else v * v
                    slope += 1.0 if p == 1 else 2.0 * v
                    count += 1.0
        total, slope, count = rt.group_sum3(sa, sb, sc, tid, lane, lanes, total, slope, count)
        loss = 0.0
        if live:
            coef = (float64(w[k]) if weighted else 1.0) / classes
            loss = coef * total
            g = coef * scale * (float64(go[i]) if go.size > 0 else 1.0)
            for j in range(lane, classes, lanes):
                v = base + float64(z[row + j])
                on = j != k and v > 0.0
                if want_grad:
                    d = (1.0 if p == 1 else 2.0 * v) if on else 0.0
                    grad_out[row + j] = -g * slope if j == k else g * d
                if want_hess:
                    h = g * curvature if on else 0.0
                    hess_out[row + j] = g * curvature * count if j == k else h
        elif active:
            if lane == 0 and bad == NO_FLAG:
                bad = float64(i)
            for j in range(lane, classes, lanes):
                if want_grad:
                    grad_out[row + j] = 0.0
                if want_hess:
                    hess_out[row + j] = 0.0
        if active and lane == 0:
            if loss_out.size > 0:
                loss_out[i] = loss
            acc += loss
    rt.write_partials(sa, sb, scratch, acc, bad)


@rt.kernel
def _multilabel_margin(z, t, rows, classes, loss_out, grad_out, go, scale, scratch):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    acc = 0.0
    bad = NO_FLAG
    for i in range(cuda.grid(1), rows, cuda.gridsize(1)):
        row = i * classes
        valid = True
        n = classes  # entries before the first -1
        for j in range(classes):
            k = t[row + j]
            if k < -1 or k >= classes:
                valid = False
            if k == -1 and n == classes:
                n = j
        loss = 0.0
        if grad_out.size > 0:
            for j in range(classes):
                grad_out[row + j] = 0.0
        if not valid:
            if bad == NO_FLAG:
                bad = float64(i)
        else:
            g = scale * (float64(go[i]) if go.size > 0 else 1.0) / classes
            for q in range(n):
                y = t[row + q]
                base = 1.0 - float64(z[row + y])
                for c in range(classes):
                    target = False
                    for r in range(n):  # no per-row scratch on the device: a scan of the ids
                        if t[row + r] == c:
                            target = True
                    v = base + float64(z[row + c])
                    if not target and v > 0.0:
                        loss += v
                        if grad_out.size > 0:
                            grad_out[row + c] += g
                            grad_out[row + y] -= g
            loss /= classes
        if loss_out.size > 0:
            loss_out[i] = loss
        acc += loss
    rt.write_partials(sa, sb, scratch, acc, bad)


def _margin(p, loss_out, grads, hessians, grad_output, scale):
    z, t, w = p.arrays
    rows, classes = z.shape
    if rows == 0:
        return 0.0
    dtype = p.dtype
    lanes, blocks = rt.rows_config(rows, classes)
    scratch = rt.partials(blocks)
    _multi_margin[blocks, THREADS, rt.stream()](
        rt.flat(z, dtype),
        t,
        rt.flat(w, dtype),
        rows,
        classes,
        p.params["p"],
        p.params["margin"],
        rt.flat(loss_out, dtype),
        rt.flat(grads[0] if grads else None, dtype),
        rt.flat(hessians[0] if hessians else None, dtype),
        rt.flat(grad_output, dtype),
        float(scale),
        lanes,
        scratch,
    )
    return _finish(scratch, t, classes)


def _finish(scratch, t, classes):
    total, bad = rt.finish(scratch)
    if bad >= 0:
        raise_bad(rt.to_host(t), classes, bad)
    return total


def multi_margin_loss(p, loss_out, grads, grad_output, scale):
    return _margin(p, loss_out, grads, None, grad_output, scale)


def multi_margin_loss_hessian(p, loss_out, grads, hessians, grad_output, scale):
    return _margin(p, loss_out, grads, hessians, grad_output, scale)


def multilabel_margin_loss(p, loss_out, grads, grad_output, scale):
    z, t = p.arrays[:2]
    rows, classes = z.shape
    if rows == 0:
        return 0.0
    dtype = p.dtype
    blocks = rt.blocks_for(rows)
    scratch = rt.partials(blocks)
    _multilabel_margin[blocks, THREADS, rt.stream()](
        rt.flat(z, dtype),
        rt.flat(t, t.dtype),
        rows,
        classes,
        rt.flat(loss_out, dtype),
        rt.flat(grads[0] if grads else None, dtype),
        rt.flat(grad_output, dtype),
        float(scale),
        scratch,
    )
    return _finish(scratch, t, classes)
