"""The regression family: ``mse_loss``, ``l1_loss``, ``smooth_l1_loss``, ``huber_loss``.

A built-in plugin, registered through the same hooks as any other; its kernels are made from
the four formulas below by ``lossforge.kernels.Elementwise``.
Semantics are PyTorch 2.13's, including the element-wise ``weight`` (same shape as the
input): ``"mean"`` divides by the summed weights for ``mse_loss``/``l1_loss`` and by the
element count for ``huber_loss``. Input and target must have the same shape (PyTorch
broadcasts with a warning; lossforge refuses with ``ValueError``).
"""

from __future__ import annotations

import math

import numpy as np

from lossforge import LossSpec, hookimpl, validate
from lossforge.kernels import Elementwise, prepare
from lossforge.runtime import mathfn

#: The default ``beta`` of smooth_l1_loss and ``delta`` of huber_loss.
DEFAULT_BETA = DEFAULT_DELTA = 1.0
#: The default ``eps`` of poisson_nll_loss.
DEFAULT_POISSON_EPS = 1e-8

_SHAPE = """
    Shape:
        input: any shape. target: the input's shape. weight: the input's shape.
        Output: a scalar for "mean" and "sum"; the input's shape for "none".
"""


_SHAPE_NO_WEIGHT = _SHAPE.replace(" weight: the input's shape.", "")


# The formulas: (loss, d loss / d input) of one element in float64, selects rather than
# branches so that the loops vectorize, PyTorch's values at the boundaries and for nan.


def mse(x, y, a, p):
    d = x - y
    return d * d, 2.0 * d


def mse_hessian(x, y, a, p):
    return 2.0


def l1(x, y, a, p):  # PyTorch's sign: 0 for nan
    d = x - y
    g = 1.0 if d > 0 else 0.0
    g = -1.0 if d < 0 else g
    return abs(d), g


# The Hessian of a linear piece is 0 and a Newton step on it is infinite: grad_hess gives
# the curvature of the loss's quadratic piece everywhere instead (l1: 1, as XGBoost's
# reg:absoluteerror and LightGBM's l1 objective; huber: 1, as LightGBM's huber objective;
# smooth_l1: 1 / beta, and 1 for beta = 0, where it is l1).
def unit_hessian(x, y, a, p):
    return 1.0


def smooth_l1_hessian(x, y, a, p):
    beta, inverse = p
    return inverse if beta > 0 else 1.0


def smooth_l1(x, y, a, p):
    """p = (beta, 1 / beta); beta = 0 (inverse 0) is l1, as PyTorch computes it then."""
    beta, inverse = p
    d = x - y
    ad = abs(d)
    loss = 0.5 * d * d * inverse if ad < beta else ad - 0.5 * beta
    g = d * inverse if beta > 0 else 0.0
    g = 1.0 if (d >= beta) & (d > 0) else g  # & not and: no branch, the loop vectorizes
    g = -1.0 if (d <= -beta) & (d < 0) else g
    return loss, g


def huber(x, y, a, p):
    """p = (delta,), delta > 0."""
    (delta,) = p
    d = x - y
    ad = abs(d)
    loss = 0.5 * d * d if ad < delta else delta * (ad - 0.5 * delta)
    g = delta if d >= delta else d
    g = -delta if d <= -delta else g
    return loss, g


def poisson_nll(x, y, a, p):
    """p = (log_input, full, eps), the booleans as 1.0 or 0.0. PyTorch's: with log_input
    ``exp(x) - y x`` (gradient ``exp(x) - y``), else ``x - y log(x + eps)`` (gradient
    ``1 - y / (x + eps)``); ``full`` adds Stirling's ``y log y - y + log(2 pi y) / 2`` where
    ``y > 1`` (no gradient). Both forms computed, then selected: the loop vectorizes."""
    log_input, full, eps = p
    ex = mathfn.exp(x)
    loss = ex - y * x
    g = ex - y
    linear_loss = x - y * mathfn.log(x + eps)
    linear_g = 1.0 - y / (x + eps)
    loss = loss if log_input != 0 else linear_loss
    g = g if log_input != 0 else linear_g
    log_y = mathfn.log(y)
    stirling = y * log_y - y + 0.5 * (log_y + LOG_TWO_PI)
    return loss + (stirling if (full != 0) & (y > 1) else 0.0), g


def poisson_nll_hessian(x, y, a, p):
    """``exp(x)`` with log_input, else ``y / (x + eps)^2``."""
    log_input, _, eps = p
    return mathfn.exp(x) if log_input != 0 else y / ((x + eps) * (x + eps))


LOG_TWO_PI = math.log(2.0 * math.pi)

# 512-bit vectors for float32 smooth L1 and Huber (10^6 in cache: 15-38% faster, 10^7:
# 3-18%); not for MSE and L1, whose elements are the cheapest (MSE 5% slower at 10^7, L1 5%
# at 10^6 and 10^7), nor for float64 input, where all four measured 6-25% slower.
KERNELS = {
    "mse_loss": (Elementwise(mse, hessian=mse_hessian), ()),
    "l1_loss": (Elementwise(l1, hessian=unit_hessian), ()),
    "smooth_l1_loss": (
        Elementwise(smooth_l1, hessian=smooth_l1_hessian, wide=("float32",)),
        (DEFAULT_BETA, DEFAULT_BETA),
    ),
    "huber_loss": (Elementwise(huber, hessian=unit_hessian, wide=("float32",)), (DEFAULT_DELTA,)),
    "poisson_nll_loss": (
        Elementwise(poisson_nll, hessian=poisson_nll_hessian),
        (1.0, 0.0, DEFAULT_POISSON_EPS),
    ),
}


def _prepare_poisson(arrays, options, backend):
    params = {
        "log_input": float(validate.check_bool("log_input", options["log_input"])),
        "full": float(validate.check_bool("full", options["full"])),
        "eps": validate.check_real("eps", options["eps"]),
    }
    return prepare(arrays, options, backend, params=params)


def _prepare_mse(arrays, options, backend):
    return prepare(arrays, options, backend, weighted_mean=True)


def _prepare_l1(arrays, options, backend):
    return prepare(arrays, options, backend, weighted_mean=True)


def _prepare_smooth_l1(arrays, options, backend):
    beta = validate.check_nonnegative("beta", options["beta"])
    params = {"beta": beta, "inverse": 1.0 / beta if beta > 0 else 0.0}
    return prepare(arrays, options, backend, params=params)


def _prepare_huber(arrays, options, backend):
    delta = validate.check_nonnegative("delta", options["delta"])
    if delta == 0:
        raise ValueError("delta must be positive (huber_loss is undefined for delta = 0), got 0.0")
    return prepare(arrays, options, backend, params={"delta": delta})


# float64 references for the conformance kit: per-element losses.
def _ref_mse(input, target, weight=None, **_):
    e = (np.asarray(input, np.float64) - np.asarray(target, np.float64)) ** 2
    return e if weight is None else e * weight


def _ref_l1(input, target, weight=None, **_):
    e = np.abs(np.asarray(input, np.float64) - np.asarray(target, np.float64))
    return e if weight is None else e * weight


def _ref_smooth_l1(input, target, beta=1.0, **_):
    a = np.abs(np.asarray(input, np.float64) - np.asarray(target, np.float64))
    if beta == 0:
        return a
    return np.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def _ref_huber(input, target, delta=1.0, weight=None, **_):
    a = np.abs(np.asarray(input, np.float64) - np.asarray(target, np.float64))
    e = np.where(a < delta, 0.5 * a * a, delta * (a - 0.5 * delta))
    return e if weight is None else e * weight


def _ref_poisson(input, target, log_input=True, full=False, eps=1e-8, **_):
    x, y = np.asarray(input, np.float64), np.asarray(target, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = np.exp(x) - y * x if log_input else x - y * np.log(x + eps)
        if full:
            stirling = y * np.log(y) - y + 0.5 * np.log(2 * np.pi * y)
            loss = loss + np.where(y > 1, stirling, 0.0)
    return loss


def _example_poisson(rng, size, dtype):
    shape = (size // 8, 8) if size >= 8 else (size,)
    x = (rng.standard_normal(shape) * 0.5).astype(dtype)  # log rates
    return (x, rng.poisson(2.0, shape).astype(dtype)), {}


def _rates(rng, arrays, dtype):  # an option set: log_input=False takes rates, not log rates
    return {"log_input": False, "input": np.exp(arrays[0]).astype(dtype)}


def _rates_eps(rng, arrays, dtype):
    return {**_rates(rng, arrays, dtype), "eps": 0.1}


def _example(rng, size, dtype):
    shape = (size // 8, 8) if size >= 8 else (size,)
    x = rng.standard_normal(shape).astype(dtype)
    return (x, rng.standard_normal(shape).astype(dtype)), {}


def _weight(rng, arrays, dtype):  # an option set for the conformance kit
    return {"weight": rng.uniform(0.5, 2.0, np.shape(arrays[0])).astype(dtype)}


SPECS = [
    LossSpec(
        name="mse_loss",
        family="regression",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"reduction": "mean", "weight": None},
        prepare=_prepare_mse,
        reference=_ref_mse,
        example=_example,
        option_sets=(_weight,),
        doc=f"""Mean squared error: ``loss_i = weight_i * (input_i - target_i) ** 2``.

    ``"mean"`` divides the sum by the element count, or by ``sum(weight)`` when a weight is
    given (PyTorch 2.13). Gradient: ``2 * weight_i * (input_i - target_i)``; Hessian
    diagonal (``grad_hess``): ``2 * weight_i``.
{_SHAPE}
    Example:
        >>> import numpy as np, lossforge as lf
        >>> float(lf.mse_loss(np.array([1.0, 2.0]), np.array([0.0, 0.0])))
        2.5
""",
    ),
    LossSpec(
        name="l1_loss",
        family="regression",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"reduction": "mean", "weight": None},
        prepare=_prepare_l1,
        reference=_ref_l1,
        example=_example,
        option_sets=(_weight,),
        hessian_bound=True,
        doc=f"""Mean absolute error: ``loss_i = weight_i * |input_i - target_i|``.

    ``"mean"`` divides by the element count, or by ``sum(weight)`` when a weight is given.
    Gradient: ``weight_i * sign(input_i - target_i)`` (0 where they are equal, as PyTorch).
    Hessian diagonal (``grad_hess``): ``weight_i``, not the true 0, which would make a Newton
    step infinite (XGBoost's ``reg:absoluteerror`` and LightGBM's ``l1`` use the same).
{_SHAPE}""",
    ),
    LossSpec(
        name="smooth_l1_loss",
        family="regression",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"reduction": "mean", "beta": DEFAULT_BETA},
        prepare=_prepare_smooth_l1,
        reference=_ref_smooth_l1,
        example=_example,
        option_sets=({"beta": 0.5}, {"beta": 0.0}),
        hessian_bound=True,
        doc=f"""Smooth L1: ``0.5 d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 beta``,
    with ``d = input - target``; ``beta = 0`` is ``l1_loss``. ``beta`` must be >= 0.
    Hessian diagonal (``grad_hess``): ``1 / beta`` everywhere (1 for ``beta = 0``), the
    quadratic piece's curvature, also on the linear pieces, where the true value is 0.
{_SHAPE}""",
    ),
    LossSpec(
        name="huber_loss",
        family="regression",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"reduction": "mean", "delta": DEFAULT_DELTA, "weight": None},
        prepare=_prepare_huber,
        reference=_ref_huber,
        example=_example,
        option_sets=({"delta": 0.3}, _weight),
        hessian_bound=True,
        doc=f"""Huber: ``0.5 d**2`` where ``|d| < delta``, else ``delta (|d| - 0.5 delta)``,
    times ``weight_i`` when given; ``delta`` must be > 0. Unlike ``mse_loss``, the weighted
    ``"mean"`` divides by the element count (PyTorch 2.13). Hessian diagonal
    (``grad_hess``): ``weight_i`` everywhere, also where the loss is linear (true value 0),
    as LightGBM's ``huber`` objective.
{_SHAPE}""",
    ),
    LossSpec(
        name="poisson_nll_loss",
        family="regression",
        arguments=("input", "target"),
        differentiable=("input",),
        options={
            "log_input": True,
            "full": False,
            "eps": DEFAULT_POISSON_EPS,
            "reduction": "mean",
        },
        prepare=_prepare_poisson,
        reference=_ref_poisson,
        example=_example_poisson,
        # (log_input=False with full=True is in tests/test_catalogue.py: its values come near 0,
        # where the kit's relative comparison with the reference is too strict)
        option_sets=({"full": True}, _rates, _rates_eps),
        doc=f"""Poisson negative log likelihood of ``target`` given ``input``, PyTorch's:
    ``exp(input) - target * input`` when ``log_input`` (the input is the log rate), else
    ``input - target * log(input + eps)``; with ``full``, Stirling's approximation of
    ``log(target!)`` is added where ``target > 1``. Gradient: ``exp(input) - target``, or
    ``1 - target / (input + eps)``. ``"mean"`` divides by the element count.
{_SHAPE_NO_WEIGHT}""",
    ),
]


@hookimpl
def lossforge_losses():
    return SPECS


@hookimpl
def lossforge_kernels():
    for name, (kernel, defaults) in KERNELS.items():
        yield from kernel.specs(name, defaults)
