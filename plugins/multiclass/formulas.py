"""Row formulas of the softmax losses built by ``lossforge.kernels.Softmax``: the loss of a
row whose target is class ``c`` from ``logp = log softmax(z)_c`` and ``lse = log sum_j
exp(z_j)``, with the coefficients of its gradient, ``d loss / d z_j = a p_j + b [j == c]``.
The template adds class weights, ``ignore_index``, label smoothing and probability targets.
"""

from __future__ import annotations

import math


def cross_entropy_z_loss(logp, lse, p):
    """``-logp + z_loss lse^2`` (PaLM's auxiliary z-loss; ``p = (z_loss, softcap)``)."""
    z_loss = p[0]
    return -logp + z_loss * lse * lse, 1.0 + 2.0 * z_loss * lse, -1.0


def softcap(z, p):
    """Gemma 2's logit soft-capping ``cap tanh(z / cap)`` and its derivative
    ``1 - tanh^2``."""
    th = math.tanh(z / p[1])
    return p[1] * th, 1.0 - th * th


def focal(logp, lse, p):
    """``-(1 - p_c)^gamma logp`` (Lin et al. 2017). With ``q = 1 - p_c`` and
    ``K = gamma p_c logp q^(gamma - 1) - q^gamma``, the gradient is ``K ([j == c] - p_j)``;
    ``q^(gamma - 1) p_c logp`` goes to 0 where ``q`` or ``p_c`` does, taken as 0 there."""
    gamma = p[0]
    prob = math.exp(logp)
    q = -math.expm1(logp)  # 1 - p_c, accurate where p_c is near 1
    qg = q**gamma
    term = gamma * prob * logp * q ** (gamma - 1.0) if q > 0.0 and prob > 0.0 else 0.0
    k = term - qg
    return -qg * logp, -k, k


def poly1(logp, lse, p):
    """``-logp + epsilon (1 - p_c)`` (Leng et al. 2022, Poly-1); gradient
    ``(1 + epsilon p_c)(p_j - [j == c])``."""
    prob = math.exp(logp)
    a = 1.0 + p[0] * prob
    return -logp + p[0] * (1.0 - prob), a, -a
