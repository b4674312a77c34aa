"""CPU kernels of the similarity family, on rows ``(R, D)`` of the two inputs: one pass for
the dot product and squared norms (float64), a second over the same (cached) rows for the two
gradients."""

from __future__ import annotations

import math

import numpy as np
from lossforge.plugins.similarity import DEFAULT_EPS, DEFAULT_MARGIN
from numba import prange

from lossforge import validate
from lossforge.runtime.cpu import (
    BLOCK,
    CHUNK,
    inline,
    ordered_sum,
    padded,
    parallel_kernel,
    tree_sum,
)


@inline
def _dot_and_norms(a, b, products):
    """(a.b, a.a, b.b) of two rows in float64, each summed by ``tree_sum`` over a row of
    ``products`` (scratch of shape (3, P), P a power of two >= the row length): a fixed order
    that vectorizes, where ``dot += x * y`` is a serial chain of float64 additions."""
    dim = a.size
    pd = products[0]
    pa = products[1]
    pb = products[2]
    for k in range(dim):
        x = np.float64(a[k])
        y = np.float64(b[k])
        pd[k] = x * y
        pa[k] = x * x
        pb[k] = y * y
    products[:, dim:] = 0.0
    return tree_sum(pd), tree_sum(pa), tree_sum(pb)


@parallel_kernel
def _cosine_similarity(x1, x2, eps, loss_out, g1_out, g2_out, go):
    """PyTorch's definition: ``sum(x1 / max(|x1|, eps) * x2 / max(|x2|, eps))``; in the
    gradient the norms' own derivative is that of the unclamped norm (0 at a zero vector),
    as autograd gives it there."""
    rows, dim = x1.shape
    per_chunk = max(1, CHUNK // max(dim, 1))
    chunks = (rows + per_chunk - 1) // per_chunk
    for c in prange(chunks):
        products = np.empty((3, padded(dim)))
        for i in range(c * per_chunk, min(c * per_chunk + per_chunk, rows)):
            a = x1[i]
            b = x2[i]
            dot, aa, bb = _dot_and_norms(a, b, products)
            n1 = math.sqrt(aa)
            n2 = math.sqrt(bb)
            c1 = max(n1, eps)
            c2 = max(n2, eps)
            cos = dot / (c1 * c2)
            if loss_out is not None:
                loss_out[i] = cos
            if g1_out is not None:
                g = 1.0 if go is None else np.float64(go[i])
                inv = g / (c1 * c2)
                r1 = cos * g / (c1 * n1) if n1 > 0 else 0.0
                r2 = cos * g / (c2 * n2) if n2 > 0 else 0.0
                ga = g1_out[i]
                gb = g2_out[i]
                for k in range(dim):
                    x = np.float64(a[k])
                    y = np.float64(b[k])
                    ga[k] = y * inv - x * r1
                    gb[k] = x * inv - y * r2
    return 0.0


#: PyTorch's cosine_embedding_loss adds this to each squared norm: 1e-12 held in a C++ float.
EMBEDDING_EPSILON = float(np.float32(1e-12))


@parallel_kernel
def _cosine_embedding(x1, x2, t, margin, loss_out, g1_out, g2_out, go, scale):
    rows, dim = x1.shape
    per_chunk = max(1, CHUNK // max(dim, 1))
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    for c in prange(chunks):
        products = np.empty((3, padded(dim)))
        buf = np.empty(BLOCK)
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                a = x1[i]
                b = x2[i]
                dot, aa, bb = _dot_and_norms(a, b, products)
                m1 = aa + EMBEDDING_EPSILON
                m2 = bb + EMBEDDING_EPSILON
                denominator = math.sqrt(m1 * m2)
                cos = dot / denominator
                target = t[i]
                loss = 0.0
                sign = 0.0  # d loss / d cos
                if target == 1:
                    loss = 1.0 - cos
                    sign = -1.0
                elif target == -1:
                    loss = max(cos - margin, 0.0)
                    sign = 1.0 if cos - margin >= 0 else 0.0  # PyTorch's clamp_min gradient
                if loss_out is not None:
                    loss_out[i] = loss
                if g1_out is not None:
                    g = sign * scale * (1.0 if go is None else np.float64(go[i]))
                    inv = g / denominator
                    r1 = g * cos / m1
                    r2 = g * cos / m2
                    ga = g1_out[i]
                    gb = g2_out[i]
                    for k in range(dim):
                        x = np.float64(a[k])
                        y = np.float64(b[k])
                        ga[k] = y * inv - x * r1
                        gb[k] = x * inv - y * r2
                buf[i - lo] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    return ordered_sum(partials)


def cosine_similarity(p, loss_out, grads, grad_output, scale):
    """``p.params``: ``eps``, ``moved``, ``dim``: ``moved`` is the input's shape with ``dim`` moved
    last when the rows are such a moved copy, else None."""
    x1, x2 = p.arrays
    eps, moved, dim = p.params["eps"], p.params["moved"], p.params["dim"]
    g1 = g2 = None
    if grads:
        if moved is None:
            g1, g2 = (g.reshape(x1.shape) for g in grads)
        else:
            g1, g2 = np.empty_like(x1), np.empty_like(x2)
    _cosine_similarity(
        x1.size,
        x1,
        x2,
        eps,
        None if loss_out is None else loss_out.reshape(-1),
        g1,
        g2,
        None if grad_output is None else grad_output.reshape(-1),
    )
    if grads and moved is not None:
        for final, rows in zip(grads, (g1, g2)):
            np.copyto(final, np.moveaxis(rows.reshape(moved), -1, dim))
    return 0.0


def cosine_embedding_loss(p, loss_out, grads, grad_output, scale):
    x1, x2, t = p.arrays
    g1 = g2 = None
    if grads:
        g1, g2 = (g.reshape(x1.shape) for g in grads)
    return _cosine_embedding(
        x1.size,
        x1,
        x2,
        t,
        p.params["margin"],
        None if loss_out is None else loss_out.reshape(-1),
        g1,
        g2,
        None if grad_output is None else grad_output.reshape(-1),
        scale,
    )


def _ready_pair(arrays, out):
    """``(g1, g2)`` when the inputs ``arrays[:2]`` are ready ``(N, D)`` NumPy rows
    (``validate.ready_arrays``, N > 0) and ``out`` is ``None`` (allocated here) or a tuple of
    two ready gradients that share no memory with each other or with an argument; else
    ``None``."""
    x1, x2 = arrays[0], arrays[1]
    dtype = validate.ready_arrays((x1, x2))
    if dtype is None or x1.ndim != 2 or x1.shape[0] == 0:
        return None
    if out is None:
        return np.empty(x1.shape, dtype), np.empty(x1.shape, dtype)
    if type(out) is not tuple or len(out) != 2:
        return None
    inputs = tuple(a for a in arrays if type(a) is np.ndarray)
    g1, g2 = out
    if validate.ready_out(g1, x1.shape, dtype, (*inputs, g2)) and validate.ready_out(
        g2, x1.shape, dtype, inputs
    ):
        return out
    return None


def fast_cosine_similarity(arrays, out):
    """``value_and_grad(x1, x2, out=out)`` with the default options (``dim=1``, ``eps``) on
    ready ``(N, D)`` rows: the general path's kernel and arguments, minus its per-call
    layers (see ``KernelSpec.fast``); ``None`` for anything else."""
    if len(arrays) != 2:
        return None
    x1, x2 = arrays
    grads = _ready_pair(arrays, out)
    if grads is None:
        return None
    value = np.empty(x1.shape[0], x1.dtype)
    _cosine_similarity(x1.size, x1, x2, DEFAULT_EPS, value, grads[0], grads[1], None)
    return value, grads


def fast_cosine_embedding_loss(arrays, out):
    """As ``fast_cosine_similarity``, for cosine_embedding_loss (``margin=0``, ``"mean"``)
    with a target of shape ``(N)``."""
    if len(arrays) != 3:
        return None
    x1, x2, t = arrays
    grads = _ready_pair(arrays, out)
    if grads is None or type(t) is not np.ndarray or t.shape != x1.shape[:1]:
        return None
    if t.dtype.kind not in "iuf":
        return None
    t = np.ascontiguousarray(t, np.float64)  # as prepare converts it
    rows = x1.shape[0]
    total = _cosine_embedding(
        x1.size, x1, x2, t, DEFAULT_MARGIN, None, grads[0], grads[1], None, 1 / rows
    )
    return x1.dtype.type(total / rows), grads
