"""``sigmoid_focal_loss`` for lossforge, with torchvision's semantics: an example of a
third-party plugin, found by lossforge through its ``"lossforge"`` entry point alone.

``loss = alpha_t * BCE_with_logits(x, y) * (1 - p_t) ** gamma`` with ``p = sigmoid(x)``,
``p_t = p y + (1 - p)(1 - y)``, ``alpha_t = alpha y + (1 - alpha)(1 - y)`` (no alpha
weighting when ``alpha < 0``). The default reduction is ``"none"``, as in torchvision.
"""

import numpy as np

import lossforge
from lossforge import LossSpec, validate
from lossforge.kernels import Elementwise, prepare
from lossforge.runtime import mathfn


def focal(x, y, a, p):  # one element, in float64: (loss, d loss / d x)
    alpha, gamma = p
    e = mathfn.exp_nonpositive(-abs(x))  # in (0, 1]
    r = 1.0 / (1.0 + e)
    prob = r if x >= 0 else e * r  # sigmoid(x)
    softplus = mathfn.log1p_unit(e)  # log(1 + exp(-|x|))
    positive = x if x > 0 else 0.0
    ce = y * (softplus + positive - x) + (1.0 - y) * (softplus + positive)
    q = 1.0 - (prob * y + (1.0 - prob) * (1.0 - y))  # 1 - p_t
    weight = alpha * y + (1.0 - alpha) * (1.0 - y) if alpha >= 0 else 1.0
    # q ** gamma and q ** (gamma - 1) through exp and log, which vectorize (** does not);
    # computed, then selected: a select of two cheap values keeps the loop vectorized
    log_q = mathfn.log(q)
    q_gamma = mathfn.exp_nonpositive(gamma * log_q)  # gamma >= 0
    q_gamma = q_gamma if gamma != 0 else 1.0
    q_gamma1 = mathfn.exp((gamma - 1.0) * log_q)
    q_gamma1 = q_gamma1 if gamma != 1 else 1.0
    # d ce / dx = p - y; d (1 - p_t) / dx = -p (1 - p) (2y - 1)
    d_mod = gamma * q_gamma1 * prob * (1.0 - prob) * (2.0 * y - 1.0)
    d_mod = d_mod if gamma != 0 else 0.0
    return weight * ce * q_gamma, weight * ((prob - y) * q_gamma - ce * d_mod)


def focal_hessian(x, y, a, p):  # d2 loss / dx2, for grad_hess (gradient boosting)
    alpha, gamma = p
    e = mathfn.exp_nonpositive(-abs(x))
    r = 1.0 / (1.0 + e)
    prob = r if x >= 0 else e * r
    positive = x if x > 0 else 0.0
    ce = mathfn.log1p_unit(e) + positive - x * y
    q = 1.0 - (prob * y + (1.0 - prob) * (1.0 - y))
    weight = alpha * y + (1.0 - alpha) * (1.0 - y) if alpha >= 0 else 1.0
    log_q = mathfn.log(q)
    q_gamma = mathfn.exp_nonpositive(gamma * log_q)
    q_gamma = q_gamma if gamma != 0 else 1.0
    q_gamma1 = mathfn.exp((gamma - 1.0) * log_q)
    q_gamma1 = q_gamma1 if gamma != 1 else 1.0
    q_gamma2 = mathfn.exp((gamma - 2.0) * log_q)
    q_gamma2 = q_gamma2 if gamma != 2 else 1.0
    s1 = prob * (1.0 - prob)
    dq = -s1 * (2.0 * y - 1.0)  # d q / dx, then d2 q / dx2
    ddq = dq * (1.0 - 2.0 * prob)
    # (ce q^g)'' = ce'' q^g + 2 ce' g q^(g-1) q' + ce g ((g-1) q^(g-2) q'^2 + q^(g-1) q'')
    curve = (gamma - 1.0) * q_gamma2 * dq * dq if (gamma != 1) & (q > 0) else 0.0
    terms = 2.0 * (prob - y) * q_gamma1 * dq + ce * (curve + q_gamma1 * ddq)
    return weight * (s1 * q_gamma + (gamma * terms if gamma != 0 else 0.0))


KERNEL = Elementwise(focal, hessian=focal_hessian)


def _prepare(arrays, options, backend):
    alpha = validate.check_real("alpha", options["alpha"])
    gamma = validate.check_nonnegative("gamma", options["gamma"])
    params = {"alpha": alpha, "gamma": gamma}
    return prepare(arrays, options, backend, names=("inputs", "targets"), params=params)


def _reference(inputs, targets, alpha=0.25, gamma=2.0, **_):
    x, y = np.asarray(inputs, np.float64), np.asarray(targets, np.float64)
    p = 1 / (1 + np.exp(-x))
    ce = np.logaddexp(0, -x) * y + np.logaddexp(0, x) * (1 - y)
    loss = ce * (1 - (p * y + (1 - p) * (1 - y))) ** gamma
    return (alpha * y + (1 - alpha) * (1 - y)) * loss if alpha >= 0 else loss


def _example(rng, size, dtype):
    shape = (size // 8, 8) if size >= 8 else (size,)
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    return (x, (rng.random(shape) < 0.25).astype(dtype)), {"reduction": "mean"}


@lossforge.hookimpl
def lossforge_losses():
    yield LossSpec(
        name="sigmoid_focal_loss",
        family="detection",
        arguments=("inputs", "targets"),
        differentiable=("inputs",),
        options={"alpha": 0.25, "gamma": 2.0, "reduction": "none"},  # torchvision's defaults
        prepare=_prepare,
        reference=_reference,
        example=_example,
        option_sets=({"alpha": -1.0}, {"alpha": 0.8, "gamma": 1.5}, {"gamma": 0.0}),
        doc=__doc__,
    )


@lossforge.hookimpl
def lossforge_kernels():
    yield from KERNEL.specs("sigmoid_focal_loss", (0.25, 2.0), reduction="none")
