"""CUDA kernel of ``ctc_loss``: one block a sample, its threads over the positions of the
extended label sequence (the alpha and beta recursions, a barrier between time steps),
then over the (time step, class) entries of the gradient. The recursions are kept in
float64 device arrays, one ``(T, 2 * max(target_lengths) + 1)`` slab per sample; each
block writes its sample's (divided) loss as its partial, and the partials are added in
sample order (``runtime.cuda.finish``), as on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from lossforge.runtime import cuda as rt
from lossforge.runtime.cuda import NO_FLAG, THREADS


@rt.device
def _lse3(a, b, c):
    m = max(a, max(b, c))
    if m == -math.inf:
        m = 0.0
    return rt.log(math.exp(a - m) + math.exp(b - m) + math.exp(c - m)) + m


@rt.device
def _label(targets, off, s, blank):
    return blank if s % 2 == 0 else targets[off + s // 2]


@rt.device
def _skip(targets, off, s):
    return s % 2 == 1 and s >= 2 and targets[off + s // 2] != targets[off + s // 2 - 1]


@rt.kernel
def _ctc(
    lp, batch, classes, targets, offsets, il, tl, blank, zero_infinity, mean,
    alpha, beta, loss_out, grad_out, go, scale, scratch,
):  # fmt: skip
    n = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    steps_max = alpha.shape[1]
    off, length, steps = offsets[n], tl[n], il[n]
    width = 2 * length + 1
    want_grad = grad_out.size > 0
    a = alpha[n]
    if steps > 0:
        for s in range(tid, width, THREADS):
            v = -math.inf
            if s < 2:
                v = float64(lp[n * classes + _label(targets, off, s, blank)])
            a[0, s] = v
        cuda.syncthreads()
        for t in range(1, steps):
            for s in range(tid, width, THREADS):
                b = a[t - 1, s - 1] if s > 0 else -math.inf
                c = a[t - 1, s - 2] if _skip(targets, off, s) else -math.inf
                x = float64(lp[(t * batch + n) * classes + _label(targets, off, s, blank)])
                a[t, s] = _lse3(a[t - 1, s], b, c) + x
            cuda.syncthreads()
    bt = beta[n] if want_grad else beta[0]
    if want_grad and steps > 0:
        last = steps - 1
        for s in range(tid, width, THREADS):
            v = -math.inf
            if s >= width - 2:
                v = float64(lp[(last * batch + n) * classes + _label(targets, off, s, blank)])
            bt[last, s] = v
        cuda.syncthreads()
        for t in range(last - 1, -1, -1):
            for s in range(tid, width, THREADS):
                b = bt[t + 1, s + 1] if s + 1 < width else -math.inf
                c = bt[t + 1, s + 2] if s + 2 < width and _skip(targets, off, s + 2) else -math.inf
                x = float64(lp[(t * batch + n) * classes + _label(targets, off, s, blank)])
                bt[t, s] = _lse3(bt[t + 1, s], b, c) + x
            cuda.syncthreads()
    if steps == 0:
        nll = 0.0 if length == 0 else math.inf
    else:
        tail = a[steps - 1, width - 2] if length > 0 else -math.inf
        nll = -_lse3(a[steps - 1, width - 1], tail, -math.inf)
    zeroed = zero_infinity and nll == math.inf
    if zeroed:
        nll = 0.0
    weight = 1.0 / max(length, 1) if mean else 1.0
    if tid == 0:
        if loss_out.size > 0:
            loss_out[n] = nll
        scratch[0, n] = nll * weight
        scratch[1, n] = NO_FLAG
    if want_grad:
        g = scale * weight
        if go.size > 0:
            g *= float64(go[n])
        for i in range(tid, steps_max * classes, THREADS):
            t = i // classes
            k = i % classes
            at = (t * batch + n) * classes + k
            if t >= steps or zeroed:
                grad_out[at] = 0.0
                continue
            lcab = -math.inf
            for s in range(width):
                if _label(targets, off, s, blank) == k:
                    v = a[t, s] + bt[t, s]
                    m = max(lcab, v)
                    if m != -math.inf:
                        lcab = rt.log(math.exp(lcab - m) + math.exp(v - m)) + m
            x = float64(lp[at])
            grad_out[at] = (math.exp(x) - math.exp(lcab + nll - x)) * g


def ctc_loss(p, loss_out, grads, grad_output, scale):
    lp, targets, offsets, il, tl = p.arrays
    steps, batch, classes = lp.shape
    if batch == 0:
        return 0.0
    stream = rt.stream()
    wide = 2 * int(tl.max()) + 1
    alpha = cuda.device_array((batch, steps, wide), np.float64, stream=stream)
    beta = cuda.device_array((batch if grads else 1, steps, wide), np.float64, stream=stream)
    device = [cuda.to_device(a, stream=stream) for a in (targets, offsets, il, tl)]
    if targets.size == 0:  # a length-0 array: Numba's to_device gives one it can launch with
        device[0] = cuda.to_device(np.zeros(1, np.int64), stream=stream)
    scratch = rt.partials(batch)
    _ctc[batch, THREADS, stream](
        rt.flat(lp, p.dtype),
        batch,
        classes,
        *device,
        p.params["blank"],
        p.params["zero_infinity"],
        p.reduction == "mean",
        alpha,
        beta,
        rt.flat(loss_out, p.dtype),
        rt.flat(grads[0] if grads else None, p.dtype),
        rt.flat(grad_output, p.dtype) if grads else rt.nothing(p.dtype),
        float(scale),
        scratch,
    )
    return rt.finish(scratch)[0]
