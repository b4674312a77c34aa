"""CPU kernels of the margin family, on rows of scores ``z`` of shape ``(R, C)``.

Each row's terms (hinges, their derivatives) are written into a float64 buffer padded to a
power of two and summed by ``tree_sum``: a fixed order that vectorizes. Rows are grouped
into chunks of about ``CHUNK`` elements (boundaries depend on the shape only), one float64
partial per chunk, added in chunk order: the same bits for any thread count.

Targets are bounds-checked in the kernels' own pass: a row whose target is out of range is
skipped and the first such row is returned, for the caller to raise ``IndexError`` (a raise
inside ``prange`` would make the loop serial).

Optional arrays (weight, per-row losses, gradient, Hessian, ``grad_output``) are always
arrays, of length 0 when absent: one compiled signature per dtype and variant.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from lossforge.runtime.cpu import CHUNK, jit, padded, parallel_kernel, tree_sum


@jit
def _first_bad(bad):
    """The first row flagged by any chunk (``bad`` holds one row or -1 per chunk), or -1."""
    for c in range(bad.size):
        if bad[c] >= 0:
            return bad[c]
    return -1


@parallel_kernel
def _multi_margin(z, t, w, p, margin, loss_out, grad_out, hess_out, go, scale):
    """Per row ``i`` of target ``k``: ``loss = w_k / C * sum_{j != k} max(0, v_j)^p`` with
    ``v_j = margin - z_k + z_j``; gradient ``g d_j`` at ``j != k`` and ``-g sum_j d_j`` at
    ``k`` (``d_j = [v_j > 0]`` for p=1, ``2 max(0, v_j)`` for p=2, ``g`` the row's factor
    ``w_k / C * scale * grad_output_i``); Hessian diagonal ``g c [v_j > 0]`` at ``j != k``
    and ``g c #{j: v_j > 0}`` at ``k`` (``c`` = 2 for p=2, 1 for p=1: see the loss's
    docstring). ``v_j > 0`` is false for nan, as in PyTorch. Returns (total, first bad row
    or -1)."""
    rows, classes = z.shape
    per_chunk = max(1, CHUNK // max(classes, 1))
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    bad = np.empty(chunks, np.int64)
    width = padded(classes)
    weighted = w.size > 0
    want_loss = loss_out.size > 0
    want_grad = grad_out.size > 0
    want_hess = hess_out.size > 0
    upstream = go.size > 0
    curvature = 2.0 if p == 2 else 1.0
    for c in prange(chunks):
        h = np.empty(width)
        d = np.empty(width)
        s = 0.0
        first = -1
        for i in range(c * per_chunk, min(c * per_chunk + per_chunk, rows)):
            k = t[i]
            zs = z[i]
            loss = 0.0
            if k < 0 or k >= classes:
                if first < 0:
                    first = i
                if want_grad:
                    grad_out[i * classes : (i + 1) * classes] = 0.0
                if want_hess:
                    hess_out[i * classes : (i + 1) * classes] = 0.0
            else:
                base = margin - np.float64(zs[k])
                if p == 2:
                    for j in range(classes):
                        v = base + np.float64(zs[j])
                        pos = v if v > 0.0 else 0.0
                        h[j] = pos * pos
                        d[j] = 2.0 * pos
                else:
                    for j in range(classes):
                        v = base + np.float64(zs[j])
                        on = v > 0.0
                        h[j] = v if on else 0.0
                        d[j] = 1.0 if on else 0.0
                h[k] = 0.0
                d[k] = 0.0
                h[classes:] = 0.0
                d[classes:] = 0.0
                coef = (np.float64(w[k]) if weighted else 1.0) / classes
                loss = coef * tree_sum(h)
                if want_grad:
                    g = coef * scale * (np.float64(go[i]) if upstream else 1.0)
                    gs = grad_out[i * classes : (i + 1) * classes]
                    if want_hess:
                        hs = hess_out[i * classes : (i + 1) * classes]
                        active = 0
                        for j in range(classes):
                            on = d[j] > 0.0
                            hs[j] = g * curvature if on else 0.0
                            active += 1 if on else 0
                        hs[k] = g * curvature * active
                    for j in range(classes):
                        gs[j] = g * d[j]
                    gs[k] = -g * tree_sum(d)
            if want_loss:
                loss_out[i] = loss
            s += loss
        partials[c] = s
        bad[c] = first
    total = 0.0
    for c in range(chunks):
        total += partials[c]
    return total, _first_bad(bad)


@parallel_kernel
def _multilabel_margin(z, t, loss_out, grad_out, go, scale):
    """Per row with target list ``y`` (the row's class ids before its first -1, repeats
    counted as PyTorch counts them) and the set ``T`` of those ids:
    ``loss = sum_{y_j} sum_{c not in T} max(0, 1 - z_{y_j} + z_c) / C``; each active pair
    adds ``g`` to the gradient at ``c`` and ``-g`` at ``y_j`` (``g = scale * grad_output_i /
    C``). Every target entry must be in [-1, C), as PyTorch checks. Returns (total, first
    bad row or -1)."""
    rows, classes = z.shape
    per_chunk = max(1, CHUNK // max(classes, 1))
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    bad = np.empty(chunks, np.int64)
    width = padded(classes)
    want_loss = loss_out.size > 0
    want_grad = grad_out.size > 0
    upstream = go.size > 0
    for c in prange(chunks):
        acc = np.empty(width)  # summed hinges per non-target class
        hits = np.empty(width)  # active pairs per non-target class
        other = np.empty(width)  # 1 for a non-target class, 0 for a target
        pairs = np.empty(max(classes, 1))  # active pairs per target entry
        s = 0.0
        first = -1
        for i in range(c * per_chunk, min(c * per_chunk + per_chunk, rows)):
            zs = z[i]
            ts = t[i]
            valid = True
            for j in range(classes):
                valid &= (ts[j] >= -1) & (ts[j] < classes)
            loss = 0.0
            if not valid:
                if first < 0:
                    first = i
                if want_grad:
                    grad_out[i * classes : (i + 1) * classes] = 0.0
            else:
                other[:] = 1.0
                n = 0
                while n < classes and ts[n] >= 0:
                    other[ts[n]] = 0.0
                    n += 1
                acc[:] = 0.0
                hits[:] = 0.0
                for q in range(n):
                    base = 1.0 - np.float64(zs[ts[q]])
                    count = 0.0
                    for j in range(classes):
                        v = base + np.float64(zs[j])
                        on = (v > 0.0) & (other[j] > 0.0)
                        acc[j] += v if on else 0.0
                        hits[j] += 1.0 if on else 0.0
                        count += 1.0 if on else 0.0
                    pairs[q] = count
                loss = tree_sum(acc) / classes
                if want_grad:
                    g = scale * (np.float64(go[i]) if upstream else 1.0) / classes
                    gs = grad_out[i * classes : (i + 1) * classes]
                    for j in range(classes):
                        gs[j] = g * hits[j]
                    for q in range(n):  # targets have no hits: only these terms
                        gs[ts[q]] -= g * pairs[q]
            if want_loss:
                loss_out[i] = loss
            s += loss
        partials[c] = s
        bad[c] = first
    total = 0.0
    for c in range(chunks):
        total += partials[c]
    return total, _first_bad(bad)


def _flat(a, dtype):
    return np.empty(0, dtype) if a is None else a.reshape(-1)


def raise_bad(t, classes, row):
    """The ``IndexError`` for row ``row`` of targets ``t`` (host arrays): class indices
    ``(R)``, or class-id lists ``(R, C)``."""
    if t.ndim == 1:
        raise IndexError(
            f"target {int(t[row])} is out of bounds: class indices must be in [0, {classes})"
        )
    ts = t[row]
    value = int(ts[(ts < -1) | (ts >= classes)][0])
    raise IndexError(
        f"target {value} is out of bounds: class ids must be in [0, {classes}), "
        f"a row's list ending at its first -1"
    )


def _margin(p, loss_out, grads, hessians, grad_output, scale):
    z, t, w = p.arrays
    dtype = z.dtype
    total, row = _multi_margin(
        z.size,
        z,
        t,
        w,
        p.params["p"],
        p.params["margin"],
        _flat(loss_out, dtype),
        _flat(grads[0] if grads else None, dtype),
        _flat(hessians[0] if hessians else None, dtype),
        _flat(grad_output, dtype),
        scale,
    )
    if row >= 0:
        raise_bad(p.arrays[1], z.shape[1], row)
    return total


def multi_margin_loss(p, loss_out, grads, grad_output, scale):
    return _margin(p, loss_out, grads, None, grad_output, scale)


def multi_margin_loss_hessian(p, loss_out, grads, hessians, grad_output, scale):
    return _margin(p, loss_out, grads, hessians, grad_output, scale)


def multilabel_margin_loss(p, loss_out, grads, grad_output, scale):
    z, t = p.arrays[:2]
    dtype = z.dtype
    total, row = _multilabel_margin(
        z.size,
        z,
        t,
        _flat(loss_out, dtype),
        _flat(grads[0] if grads else None, dtype),
        _flat(grad_output, dtype),
        scale,
    )
    if row >= 0:
        raise_bad(p.arrays[1], z.shape[1], row)
    return total
