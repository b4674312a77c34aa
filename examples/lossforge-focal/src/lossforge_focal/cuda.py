"""The CUDA kernel of sigmoid_focal_loss: cpu.py's formulas, one element per thread in a
grid-stride loop, float64 arithmetic, per-block partial sums combined in a fixed order by
``lossforge.runtime.cuda`` (no floating-point atomics)."""

from __future__ import annotations

import math

from numba import cuda, float64

from lossforge.runtime import cuda as rt
from lossforge.runtime.cuda import NO_FLAG, THREADS


@rt.kernel
def _focal(x, y, alpha, gamma, loss_out, grad_out, go, scale, scratch):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    acc = 0.0
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = float64(x[i])
        t = float64(y[i])
        e = math.exp(-abs(v))
        p = 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)
        softplus = math.log1p(e)
        ce = t * (softplus + max(-v, 0.0)) + (1.0 - t) * (softplus + max(v, 0.0))
        q = 1.0 - (p * t + (1.0 - p) * (1.0 - t))
        modulation = q**gamma
        weight = alpha * t + (1.0 - alpha) * (1.0 - t) if alpha >= 0 else 1.0
        loss = weight * ce * modulation
        acc += loss
        if loss_out.size > 0:
            loss_out[i] = loss
        if grad_out.size > 0:
            d_mod = 0.0
            if gamma != 0:
                d_mod = gamma * q ** (gamma - 1.0) * p * (1.0 - p) * (2.0 * t - 1.0)
            g = weight * ((p - t) * modulation - ce * d_mod)
            if go.size > 0:
                g *= float64(go[i])
            grad_out[i] = g * scale
    rt.write_partials(sa, sb, scratch, acc, NO_FLAG)


def focal(p, loss_out, grads, grad_output, scale):
    x, y = p.arrays
    if x.size == 0:
        return 0.0
    alpha, gamma = p.params
    blocks = rt.blocks_for(x.size)
    scratch = rt.partials(blocks)
    dtype = p.dtype
    _focal[blocks, THREADS, rt.stream()](
        rt.flat(x, dtype),
        rt.flat(y, dtype),
        float(alpha),
        float(gamma),
        rt.flat(loss_out, dtype),
        rt.flat(grads[0], dtype) if grads else rt.nothing(dtype),
        rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
        float(scale),
        scratch,
    )
    return rt.finish(scratch)[0] if p.reduction in ("mean", "sum") else 0.0
