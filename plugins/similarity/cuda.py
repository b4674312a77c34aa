"""CUDA kernels of the similarity family, on rows ``(R, D)`` of the two inputs: the CPU
kernels' formulas (``cpu.py``) in float64. Each row is handled by a group of threads
(``runtime.cuda.rows_config``): one coalesced pass for the dot product and squared norms,
reduced by fixed trees in shared memory, a second over the same row for both gradients.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from lossforge.runtime import cuda as rt
from lossforge.runtime.cuda import NO_FLAG, THREADS

#: PyTorch's cosine_embedding_loss adds this to each squared norm.
EMBEDDING_EPSILON = float(np.float32(1e-12))  # as cpu.py: PyTorch's C++ float


@rt.kernel
def _cosine_similarity(x1, x2, rows, dim, eps, loss_out, g1_out, g2_out, go, lanes):
    """PyTorch's ``sum(x1 / max(|x1|, eps) * x2 / max(|x2|, eps))``; the norms' own
    derivative is that of the unclamped norm (0 at a zero vector), as on the CPU."""
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    sc = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    lane = tid % lanes
    per_block = THREADS // lanes
    want_loss = loss_out.size > 0
    want_grad = g1_out.size > 0
    upstream = go.size > 0
    for base in range(cuda.blockIdx.x * per_block, rows, cuda.gridDim.x * per_block):
        i = base + tid // lanes
        active = i < rows
        row = i * dim
        dot = 0.0
        aa = 0.0
        bb = 0.0
        if active:
            for k in range(lane, dim, lanes):
                x = float64(x1[row + k])
                y = float64(x2[row + k])
                dot += x * y
                aa += x * x
                bb += y * y
        dot, aa, bb = rt.group_sum3(sa, sb, sc, tid, lane, lanes, dot, aa, bb)
        if active:
            n1 = math.sqrt(aa)
            n2 = math.sqrt(bb)
            c1 = max(n1, eps)
            c2 = max(n2, eps)
            cos = float64(dot) / (c1 * c2)
            if want_loss and lane == 0:
                loss_out[i] = cos
            if want_grad:
                g = float64(go[i]) if upstream else float64(1.0)
                inv = g / (c1 * c2)
                r1 = cos * g / (c1 * n1) if n1 > 0 else 0.0
                r2 = cos * g / (c2 * n2) if n2 > 0 else 0.0
                for k in range(lane, dim, lanes):
                    x = float64(x1[row + k])
                    y = float64(x2[row + k])
                    g1_out[row + k] = y * inv - x * r1
                    g2_out[row + k] = x * inv - y * r2


@rt.kernel
def _cosine_embedding(
    x1, x2, t, rows, dim, margin, loss_out, g1_out, g2_out, go, scale, lanes, scratch
):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    sc = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    lane = tid % lanes
    per_block = THREADS // lanes
    want_loss = loss_out.size > 0
    want_grad = g1_out.size > 0
    upstream = go.size > 0
    acc = 0.0
    for base in range(cuda.blockIdx.x * per_block, rows, cuda.gridDim.x * per_block):
        i = base + tid // lanes
        active = i < rows
        row = i * dim
        dot = 0.0
        aa = 0.0
        bb = 0.0
        if active:
            for k in range(lane, dim, lanes):
                x = float64(x1[row + k])
                y = float64(x2[row + k])
                dot += x * y
                aa += x * x
                bb += y * y
        dot, aa, bb = rt.group_sum3(sa, sb, sc, tid, lane, lanes, dot, aa, bb)
        if active:
            m1 = aa + EMBEDDING_EPSILON
            m2 = bb + EMBEDDING_EPSILON
            denominator = math.sqrt(m1 * m2)
            cos = float64(dot) / denominator
            target = t[i]
            loss = 0.0
            sign = 0.0  # d loss / d cos
            if target == 1:
                loss = 1.0 - cos
                sign = -1.0
            elif target == -1:
                loss = max(cos - margin, 0.0)
                sign = 1.0 if cos - margin >= 0 else 0.0  # PyTorch's clamp_min gradient
            if lane == 0:
                if want_loss:
                    loss_out[i] = loss
                acc += loss
            if want_grad:
                g = sign * scale * (float64(go[i]) if upstream else 1.0)
                inv = float64(g) / denominator
                for k in range(lane, dim, lanes):
                    x = float64(x1[row + k])
                    y = float64(x2[row + k])
                    g1_out[row + k] = y * inv - g * cos * x / m1
                    g2_out[row + k] = x * inv - g * cos * y / m2
    rt.write_partials(sa, sb, scratch, acc, NO_FLAG)


def cosine_similarity(p, loss_out, grads, grad_output, scale):
    """``p.params``: ``eps``, ``moved``, ``dim``: ``moved`` is the input's shape with ``dim`` moved
    last when the rows are such a moved copy, else None."""
    x1, x2 = p.arrays
    eps, moved, dim = p.params["eps"], p.params["moved"], p.params["dim"]
    rows, size = x1.shape
    if rows == 0:
        return 0.0
    dtype = p.dtype
    g1 = g2 = None
    if grads:
        if moved is None:
            g1, g2 = grads
        else:
            g1, g2 = rt.empty(x1.shape, dtype), rt.empty(x2.shape, dtype)
    lanes, blocks = rt.rows_config(rows, size)
    _cosine_similarity[blocks, THREADS, rt.stream()](
        rt.flat(x1, dtype),
        rt.flat(x2, dtype),
        rows,
        size,
        float(eps),
        rt.flat(loss_out, dtype),
        rt.flat(g1, dtype),
        rt.flat(g2, dtype),
        rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
        lanes,
    )
    if grads and moved is not None:
        for final, rows_grad in zip(grads, (g1, g2)):
            rt.copy_into(final, rt.moveaxis(rows_grad.reshape(moved), -1, dim))
    return 0.0


def cosine_embedding_loss(p, loss_out, grads, grad_output, scale):
    x1, x2, t = p.arrays
    rows, size = x1.shape
    if rows == 0:
        return 0.0
    dtype = p.dtype
    lanes, blocks = rt.rows_config(rows, size)
    scratch = rt.partials(blocks)
    _cosine_embedding[blocks, THREADS, rt.stream()](
        rt.flat(x1, dtype),
        rt.flat(x2, dtype),
        t,
        rows,
        size,
        float(p.params["margin"]),
        rt.flat(loss_out, dtype),
        rt.flat(grads[0], dtype) if grads else rt.nothing(dtype),
        rt.flat(grads[1], dtype) if grads else rt.nothing(dtype),
        rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
        float(scale),
        lanes,
        scratch,
    )
    if p.reduction in ("mean", "sum"):
        return rt.finish(scratch)[0]
    return 0.0
