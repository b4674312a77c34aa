"""The row formula of the softmax losses built by ``lossforge.kernels.Softmax``: the loss of
a row whose target is class ``c`` from ``logp = log softmax(z)_c`` and ``lse = log sum_j
exp(z_j)``, with the coefficients of its gradient, ``d loss / d z_j = a p_j + b [j == c]``.
The template adds class weights, ``ignore_index``, label smoothing and probability targets.

``cross_entropy`` is the first. One formula serves ``softmax_focal_loss``,
``poly1_cross_entropy`` and ``softmax_cross_entropy``, each with the others' parameters at 0
(where each term vanishes exactly): every formula is a kernel of its own, and each costs
seconds of cold compile per dtype and variant, in CI and on a user's first call; the unused
terms cost a few operations a row.
"""

from __future__ import annotations

import math

from lossforge.runtime import mathfn


def cross_entropy(logp, lse, p):
    """``-logp``: its gradient is ``p_j - [j == c]``."""
    return -logp, 1.0, -1.0


def cross_entropy_hessian(logp, lse, p):
    """Linear in ``logp`` and free of ``lse``: the Hessian diagonal is ``A p_j (1 - p_j)``."""
    return 0.0, 0.0, 0.0


def softmax_losses(logp, lse, p):
    """``-(1 - p_c)^gamma logp + epsilon (1 - p_c) + z_loss lse^2`` with
    ``p = (gamma, epsilon, z_loss, softcap)``: the focal term (Lin et al. 2017; cross
    entropy at ``gamma = 0``), Poly-1's (Leng et al. 2022) and PaLM's z-loss.

    With ``q = 1 - p_c`` and ``K = gamma p_c logp q^(gamma - 1) - q^gamma``, the focal term's
    gradient is ``K ([j == c] - p_j)`` (``q^(gamma - 1) p_c logp`` goes to 0 where ``q`` or
    ``p_c`` does: taken as 0 there), Poly-1's ``epsilon p_c (p_j - [j == c])``, the
    z-loss's ``2 z_loss lse p_j``."""
    gamma, epsilon, z_loss = p[0], p[1], p[2]
    loss = -logp
    a = 1.0
    b = -1.0
    # branches, not selects: the formula runs once a row (a class with probability targets
    # or smoothing), and skipping the libm calls of unused terms halved rows of 100 classes
    if gamma != 0.0:
        prob = math.exp(logp)
        q = -math.expm1(logp)  # 1 - p_c, accurate where p_c is near 1
        qg = q**gamma
        k = -qg
        if q > 0.0 and prob > 0.0:
            k += gamma * prob * logp * q ** (gamma - 1.0)
        loss = -qg * logp
        a = -k
        b = k
    if epsilon != 0.0:
        prob = math.exp(logp)
        loss += epsilon * (1.0 - prob)
        a += epsilon * prob
        b -= epsilon * prob
    if z_loss != 0.0:
        loss += z_loss * lse * lse
        a += 2.0 * z_loss * lse
    return loss, a, b


def softmax_losses_hessian(logp, lse, p):
    """``(f_uu, f_uv, f_vv)`` of ``softmax_losses`` in ``u = logp``, ``v = lse``: the z-loss
    gives ``f_vv = 2 z_loss``, Poly-1 ``f_uu = -epsilon p_c`` and the focal term ``F(u) =
    -q^gamma u`` (``q = 1 - e^u``, ``dq/du = -p_c``)
    ``F'' = gamma p_c q^(gamma - 1) (u + 2 - (gamma - 1) p_c u / q)``. Where ``q`` or ``p_c``
    is 0 this is taken as 0, as the gradient's term (the template multiplies it by
    ``([j == c] - p_j)^2 <= q^2`` there, which goes to 0 faster)."""
    gamma, epsilon, z_loss = p[0], p[1], p[2]
    uu = 0.0
    if gamma != 0.0:
        prob = math.exp(logp)
        q = -math.expm1(logp)
        if q > 0.0 and prob > 0.0:
            uu = gamma * prob * q ** (gamma - 1.0) * (logp + 2.0 - (gamma - 1.0) * prob * logp / q)
    if epsilon != 0.0:
        uu -= epsilon * math.exp(logp)
    return uu, 0.0, 2.0 * z_loss


def softcap(z, p):
    """Gemma 2's logit soft-capping ``cap tanh(z / cap)`` (``cap = p[3]``) and its
    derivative ``sech^2 = 1 - tanh^2``. ``tanh`` from ``mathfn.exp``, not libm's (3x
    slower): ``(1 - e^(-2|x|)) / (1 + e^(-2|x|))``,
    within 1e-13 relative for ``|x| >= 1e-3``, and its Taylor series below."""
    x = z / p[3]
    ax = abs(x)
    u = mathfn.exp(-2.0 * ax)
    x2 = x * x
    small = x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)))
    big = (1.0 - u) / (1.0 + u)
    th = small if ax < 1e-3 else (big if x >= 0.0 else -big)
    # sech^2 = 4 u / (1 + u)^2 keeps its relative accuracy where tanh^2 is near 1
    slope = 1.0 - x2 if ax < 1e-3 else 4.0 * u / ((1.0 + u) * (1.0 + u))
    return p[3] * th, slope


def softcap_hessian(z, capped, slope, p):
    """``d^2/dz^2 cap tanh(z / cap) = -2 tanh(z / cap) sech^2(z / cap) / cap``, from
    ``softcap``'s outputs ``capped = cap tanh`` and ``slope = sech^2``."""
    return -2.0 * capped * slope / (p[3] * p[3])
