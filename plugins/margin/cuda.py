"""CUDA kernels of the margin family: the CPU kernels' formulas (``cpu.py``) in float64, one
thread per row (grid-stride), with the deterministic per-block partials and error flags of
``lossforge.runtime.cuda``: a row whose target is out of range is flagged (its first
element's index) and skipped, and the wrapper raises the CPU's ``IndexError``.
"""

from __future__ import annotations

from lossforge.plugins.margin.cpu import raise_bad
from numba import cuda, float64

from lossforge.runtime import cuda as rt
from lossforge.runtime.cuda import NO_FLAG, THREADS


@rt.kernel
def _multi_margin(
    z, t, w, rows, classes, p, margin, loss_out, grad_out, hess_out, go, scale, scratch
):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    weighted = w.size > 0
    curvature = 2.0 if p == 2 else 1.0
    acc = 0.0
    bad = NO_FLAG
    for i in range(cuda.grid(1), rows, cuda.gridsize(1)):
        k = t[i]
        row = i * classes
        loss = 0.0
        if k < 0 or k >= classes:
            if bad == NO_FLAG:
                bad = float64(i)
            for j in range(classes):
                if grad_out.size > 0:
                    grad_out[row + j] = 0.0
                if hess_out.size > 0:
                    hess_out[row + j] = 0.0
        else:
            base = margin - float64(z[row + k])
            coef = (float64(w[k]) if weighted else 1.0) / classes
            g = coef * scale * (float64(go[i]) if go.size > 0 else 1.0)
            total = 0.0
            slope = 0.0
            active = 0
            for j in range(classes):
                v = base + float64(z[row + j])
                d = 0.0
                if j != k and v > 0.0:
                    total += v if p == 1 else v * v
                    d = 1.0 if p == 1 else 2.0 * v
                    slope += d
                    active += 1
                if grad_out.size > 0:
                    grad_out[row + j] = g * d
                if hess_out.size > 0:
                    hess_out[row + j] = g * curvature if d > 0.0 else 0.0
            loss = coef * total
            if grad_out.size > 0:
                grad_out[row + k] = -g * slope
            if hess_out.size > 0:
                hess_out[row + k] = g * curvature * active
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
    blocks = rt.blocks_for(rows)
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
