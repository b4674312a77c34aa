"""torchvision's ``sigmoid_focal_loss``: ``alpha_t BCE_with_logits(x, y) (1 - p_t)**gamma`` with
``p = sigmoid(x)``, ``p_t = p y + (1 - p)(1 - y)``, ``alpha_t = alpha y + (1 - alpha)(1 - y)`` (1 if
alpha < 0). Where p_t rounds to 1 its focal derivatives are 0 (torch's: nan if gamma < 1)."""

import numpy as np

import lossforge
from lossforge import LossSpec, validate
from lossforge.kernels import Elementwise, prepare
from lossforge.runtime import mathfn


def terms(x, y, p):  # a helper of both formulas: p, BCE, alpha_t q**gamma, (dq/dx) / q
    alpha, gamma = p
    e = mathfn.exp_nonpositive(-abs(x))
    prob = (1.0 if x >= 0 else e) / (1.0 + e)
    q = prob * (1.0 - y) + (1.0 - prob) * y  # 1 - p_t
    w = alpha * y + (1.0 - alpha) * (1.0 - y) if alpha >= 0 else 1.0
    wq = w * mathfn.exp(gamma * mathfn.log(q) if gamma != 0 else 0.0)  # ** does not vectorize
    r = prob * (1.0 - prob) * (1.0 - 2.0 * y) / q if q > 0 else 0.0
    return prob, mathfn.log1p_unit(e) + max(x, 0.0) - x * y, wq, r


def focal(x, y, a, p):  # one element, in float64: (loss, d loss / d x)
    prob, ce, wq, r = terms(x, y, p)
    return wq * ce, wq * (prob - y + p[1] * ce * r)


def focal_hessian(x, y, a, p):  # d2 loss / dx2, for grad_hess (gradient boosting)
    prob, ce, wq, r = terms(x, y, p)
    g = p[1]
    return wq * (prob * (1 - prob) + g * r * (2 * (prob - y) + ce * (1 - 2 * prob + (g - 1) * r)))


def _prepare(arrays, options, backend):
    alpha = validate.check_real("alpha", options["alpha"])
    params = {"alpha": alpha, "gamma": validate.check_nonnegative("gamma", options["gamma"])}
    return prepare(arrays, options, backend, names=("inputs", "targets"), params=params)


def _reference(inputs, targets, alpha=0.25, gamma=2.0, **_):  # torchvision's, in float64
    x, y = np.asarray(inputs, np.float64), np.asarray(targets, np.float64)
    p_t = y / (1 + np.exp(-x)) + (1 - y) / (1 + np.exp(x))
    loss = (np.logaddexp(0, x) - x * y) * (1 - p_t) ** gamma
    return (alpha * y + (1 - alpha) * (1 - y)) * loss if alpha >= 0 else loss


def _example(rng, size, dtype):  # logits and 0/1 targets
    x = rng.standard_normal((size // 8, 8) if size >= 8 else size) * 2
    return (x.astype(dtype), (rng.random(x.shape) < 0.25).astype(dtype)), {"reduction": "mean"}


@lossforge.hookimpl
def lossforge_losses():
    yield LossSpec(
        "sigmoid_focal_loss",
        "detection",
        ("inputs", "targets"),
        ("inputs",),
        {"alpha": 0.25, "gamma": 2.0, "reduction": "none"},
        _prepare,
        _reference,
        _example,
        doc=__doc__,
        option_sets=({"alpha": -1.0}, {"alpha": 0.8, "gamma": 1.5}, {"gamma": 0.0}),
    )


@lossforge.hookimpl
def lossforge_kernels():
    yield from Elementwise(focal, hessian=focal_hessian).specs(
        "sigmoid_focal_loss", (0.25, 2.0), reduction="none"
    )
