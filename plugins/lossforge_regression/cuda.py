"""CUDA kernels of the regression family: the CPU kernel's fused pass (``cpu.py``), one
element per thread in a grid-stride loop (coalesced loads and stores), float64 arithmetic,
and the per-element losses summed into deterministic per-block partials
(``lossforge.runtime.cuda``). Imported on the first CUDA call only.
"""

from __future__ import annotations

from numba import cuda, float64

from lossforge.runtime import cuda as rt
from lossforge.runtime.cuda import NO_FLAG, THREADS

MSE, L1, SMOOTH_L1, HUBER = 0, 1, 2, 3


@rt.device
def _element(kind, d, param, inverse):
    """(loss, d loss / d input) of one element, d = input - target: the CPU's formulas."""
    if kind == MSE:
        return d * d, 2.0 * d
    a = abs(d)
    if kind == L1:  # PyTorch's sign: 0 for nan
        return a, (1.0 if d > 0 else 0.0) - (1.0 if d < 0 else 0.0)
    if kind == SMOOTH_L1:  # param = beta > 0 (beta = 0 is sent as L1)
        loss = 0.5 * d * d * inverse if a < param else a - 0.5 * param
        g = d * inverse
        g = 1.0 if d >= param else g
        g = -1.0 if d <= -param else g
        return loss, g
    # HUBER, param = delta > 0
    loss = 0.5 * d * d if a < param else param * (a - 0.5 * param)
    g = param if d >= param else d
    g = -param if d <= -param else g
    return loss, g


@rt.kernel
def _regression(kind, x, y, w, param, inverse, loss_out, grad_out, go, scale, scratch):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    weighted = w.size > 0
    want_loss = loss_out.size > 0
    want_grad = grad_out.size > 0
    upstream = go.size > 0
    acc = 0.0
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        loss, g = _element(kind, float64(x[i]) - float64(y[i]), param, inverse)
        if weighted:
            loss *= float64(w[i])
            g *= float64(w[i])
        if want_loss:
            loss_out[i] = loss
        if want_grad:
            if upstream:
                g *= float64(go[i])
            grad_out[i] = g * scale
        acc += loss
    rt.write_partials(sa, sb, scratch, acc, NO_FLAG)


def regression(p, loss_out, grads, grad_output, scale):
    """The KernelSpec function of all four losses; ``p.params = (kind, beta or delta)``."""
    x, y, w = p.arrays
    kind, param = p.params
    n = x.size
    if n == 0:
        return 0.0
    blocks = rt.blocks_for(n)
    scratch = rt.partials(blocks)
    dtype = p.dtype
    _regression[blocks, THREADS, rt.stream()](
        kind,
        rt.flat(x, dtype),
        rt.flat(y, dtype),
        rt.flat(w, dtype),
        float(param),
        1.0 / param if param > 0 else 0.0,
        rt.flat(loss_out, dtype),
        rt.flat(grads[0], dtype) if grads else rt.nothing(dtype),
        rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
        float(scale),
        scratch,
    )
    if p.reduction in ("mean", "sum"):
        return rt.finish(scratch)[0]
    return 0.0
