"""The CUDA kernels of dice_loss and tversky_loss (``overlap.py``'s passes): a block sums a
segment (coalesced, a fixed tree in shared memory), a grid-stride loop writes the gradient."""

from __future__ import annotations

import numpy as np
from lossforge.plugins.similarity import overlap
from numba import cuda, float64

from lossforge.runtime import cuda as rt
from lossforge.runtime.cpu import CHUNK
from lossforge.runtime.cuda import THREADS

sigmoid = rt.device_formula(overlap.sigmoid, "overlap_sigmoid")


@rt.kernel
def sums_kernel(x, y, columns, logits, total, out):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    sc = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    length = max(1, min(columns, CHUNK))
    count = max(1, -(-columns // length))
    for r in range(cuda.blockIdx.x, total, cuda.gridDim.x):
        base = (r // count) * columns
        lo = base + (r % count) * length
        hi = min(lo + length, base + columns)
        a = 0.0
        b = 0.0
        c = 0.0
        for k in range(lo + tid, hi, THREADS):
            q = float64(x[k])
            if logits:
                q = sigmoid(q)
            v = float64(y[k])
            a += q * v
            b += q
            c += v
        a, b, c = rt.group_sum3(sa, sb, sc, tid, tid, THREADS, a, b, c)
        if tid == 0:
            out[r, 0] = a
            out[r, 1] = b
            out[r, 2] = c


@rt.kernel
def grad_kernel(x, y, columns, logits, c_i, c_p, grad):
    for k in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        s = k // columns
        g = c_i[s] * float64(y[k]) + c_p[s]
        if logits:
            q = sigmoid(float64(x[k]))
            g *= q * (1.0 - q)
        grad[k] = g


SUMS, GRAD = sums_kernel, grad_kernel


def run(p, loss_out, grads, grad_output, scale, passes):
    """``overlap._run`` with the CUDA kernels and copies. ``logits`` is a bool here (the
    device functions take it as a value)."""
    logits = bool(p.params["sigmoid"])

    def sums_of(x, y, columns, total):
        out = cuda.device_array((total, 3), np.float64, stream=rt.stream())
        SUMS[max(1, min(rt.MAX_BLOCKS, total)), THREADS, rt.stream()](
            x, y, columns, logits, total, out
        )
        return rt.to_host(out)

    def gradient(x, y, columns, c_i, c_p, grad):
        stream = rt.stream()
        GRAD[rt.blocks_for(x.size), THREADS, stream](
            x,
            y,
            columns,
            logits,
            cuda.to_device(np.ascontiguousarray(c_i), stream=stream),
            cuda.to_device(np.ascontiguousarray(c_p), stream=stream),
            rt.flat(grad, grad.dtype),
        )

    def put(out, values):
        out.copy_to_device(np.ascontiguousarray(values), stream=rt.stream())

    return passes(p, loss_out, grads, grad_output, scale, sums_of, gradient, rt.to_host, put)
