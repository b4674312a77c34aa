"""The CPU kernel of sigmoid_focal_loss: value and gradient in one pass, float64 arithmetic,
partial sums per fixed chunk added in order (bitwise identical for any thread count)."""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from lossforge.runtime.cpu import CHUNK, ordered_sum, parallel_kernel


@parallel_kernel
def _focal(x, y, alpha, gamma, loss_out, grad_out, go, scale):
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    partials = np.zeros(chunks)
    for c in prange(chunks):
        s = 0.0
        for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
            v = np.float64(x[i])
            t = np.float64(y[i])
            e = math.exp(-abs(v))
            p = 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)
            softplus = math.log1p(e)  # log(1 + exp(-|v|))
            ce = t * (softplus + max(-v, 0.0)) + (1.0 - t) * (softplus + max(v, 0.0))
            q = 1.0 - (p * t + (1.0 - p) * (1.0 - t))  # 1 - p_t
            modulation = q**gamma
            weight = alpha * t + (1.0 - alpha) * (1.0 - t) if alpha >= 0 else 1.0
            loss = weight * ce * modulation
            s += loss
            if loss_out.size:
                loss_out[i] = loss
            if grad_out.size:
                # d ce = p - t; d (1 - p_t) = -p (1 - p)(2t - 1)
                d_mod = (
                    gamma * q ** (gamma - 1.0) * p * (1.0 - p) * (2.0 * t - 1.0) if gamma else 0.0
                )
                g = weight * ((p - t) * modulation - ce * d_mod)
                grad_out[i] = g * scale * (go[i] if go.size else 1.0)
        partials[c] = s
    return ordered_sum(partials)


def focal(p, loss_out, grads, grad_output, scale):
    x, y = p.arrays
    empty = np.empty(0, p.dtype)

    def flat(a):
        return empty if a is None else a.reshape(-1)

    alpha, gamma = p.params
    return _focal(
        x.size,
        x.reshape(-1),
        y.reshape(-1),
        alpha,
        gamma,
        flat(loss_out),
        flat(grads[0] if grads else None),
        flat(grad_output),
        scale,
    )
