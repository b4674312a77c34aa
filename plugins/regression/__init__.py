"""The regression family: ``mse_loss``, ``l1_loss``, ``smooth_l1_loss``, ``huber_loss``,
``poisson_nll_loss``, ``gaussian_nll_loss``, and three losses PyTorch does not have:
``log_cosh_loss``, ``pinball_loss`` (quantile regression) and ``tweedie_loss`` (XGBoost's
and LightGBM's); ``kl_div`` (family ``"divergence"``).

A built-in plugin, registered through the same hooks as any other; its kernels are made from
the four formulas below by ``lossforge.kernels.Elementwise``.
Semantics are PyTorch 2.13's, including the element-wise ``weight`` (same shape as the
input): ``"mean"`` divides by the summed weights for ``mse_loss``/``l1_loss`` and by the
element count for ``huber_loss``. Input and target must have the same shape (PyTorch
broadcasts with a warning; lossforge refuses with ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from fractions import Fraction

import numpy as np

from lossforge import KernelSpec, LossSpec, hookimpl, validate
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


def poisson_nll_log_rate(x, y, a, p):
    """``poisson_nll`` with its default options (log_input, not full): ``exp(x) - y x``."""
    ex = mathfn.exp(x)
    return ex - y * x, ex - y


def exp_hessian(x, y, a, p):
    return mathfn.exp(x)


POISSON = Elementwise(poisson_nll, hessian=poisson_nll_hessian)
# The default options get a kernel of their own: the general formula's loop runs ~12x
# slower (10^6 float32, one thread, measured side by side in one process): its selects on
# an option and the element (full's ``y > 1``), or the unused logs, keep LLVM from
# vectorizing the exp; the default formula alone vectorizes as mse's loop does.
POISSON_LOG_RATE = Elementwise(poisson_nll_log_rate, hessian=exp_hessian)
POISSON_DEFAULTS = (1.0, 0.0, DEFAULT_POISSON_EPS)


def _poisson_kernel(method):
    """The ``KernelSpec`` function ``method`` of the kernel for a call's options."""

    def kernel(p, *args):
        params = p.params
        chosen = POISSON_LOG_RATE if params["log_input"] and not params["full"] else POISSON
        return getattr(chosen, method)(p, *args)

    kernel.__name__ = kernel.__qualname__ = f"poisson_nll_{method}"
    return kernel


def kl_div(x, y, a, p):
    """p = (log_target,) as 1.0 or 0.0. PyTorch's pointwise ``xlogy(y, y) - y x`` (0 where
    ``y == 0``, nan for ``y < 0``), or ``exp(y) (y - x)`` for a log target; gradient ``-y``
    or ``-exp(y)``."""
    (log_target,) = p
    ylogy = 0.0 if y == 0 else y * mathfn.log(y)  # nan y fails the test and stays nan
    ey = mathfn.exp(y)
    loss = ylogy - y * x if log_target == 0 else ey * (y - x)
    return loss, (-y if log_target == 0 else -ey)


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
}


def kl_div_hessian(x, y, a, p):
    """0: the pointwise loss is linear in the input (the curvature of a KL objective comes
    from the log-softmax that makes the input, outside this loss)."""
    return 0.0


KL_DIV = Elementwise(kl_div, hessian=kl_div_hessian)


def log_cosh(x, y, a, p):
    """``log(cosh(d))`` as ``|d| + log1p(exp(-2|d|)) - log 2`` (no overflow for large
    ``|d|``), gradient ``tanh(d) = sign(d) (1 - e) / (1 + e)`` with ``e = exp(-2|d|)``; both
    from their Taylor series below ``|d| = 1/8``, where those forms cancel (the series' first
    omitted term is below 1e-17 relative there).

    Both forms are computed for every element and one is selected (the loop vectorizes), so
    the cost is their sum, and it is arithmetic, not memory: 10^6 float32 ran at 19% of the
    bandwidth floor on 2 threads (mse_loss there: in cache, 323%). ``log1p(e)`` is
    ``log1p_unit``, as softplus's: ``e`` is in [0, 1], where the general ``log1p``'s exponent
    extraction, edge selects and rounding correction (a second division) are wasted; that
    took the loop from 4.1 to 2.9 ms (one thread, side by side in one process)."""
    d = x - y
    ad = abs(d)
    e = mathfn.exp_nonpositive(-2.0 * ad)
    z = d * d
    t = T8
    c = T8 / 16.0
    t = t * z + T7
    c = c * z + T7 / 14.0
    t = t * z + T6
    c = c * z + T6 / 12.0
    t = t * z + T5
    c = c * z + T5 / 10.0
    t = t * z + T4
    c = c * z + T4 / 8.0
    t = t * z + T3
    c = c * z + T3 / 6.0
    t = t * z + T2
    c = c * z + T2 / 4.0
    t = t * z + 1.0  # T1
    c = c * z + 0.5
    small = ad < 0.125
    loss = c * z if small else ad + mathfn.log1p_unit_native(e) - LOG_TWO
    g = t * ad if small else (1.0 - e) / (1.0 + e)
    return loss, (-g if d < 0 else g)


def log_cosh_hessian(x, y, a, p):
    """``1 - tanh(d)^2 = 4 e / (1 + e)^2`` with ``e = exp(-2|d|)``: no cancellation at any
    ``d``, 0 once ``e`` underflows."""
    e = mathfn.exp_nonpositive(-2.0 * abs(x - y))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


def _tanh_coefficients(terms):
    """Of ``tanh(d) = sum_n T_n d**(2n - 1)``: ``2**2n (2**2n - 1) B_2n / (2n)!``, with
    Bernoulli numbers B_2n; ``log(cosh(d)) = sum_n T_n / 2n d**2n`` is its integral."""
    bernoulli = [(1, 6), (-1, 30), (1, 42), (-1, 30), (5, 66), (-691, 2730), (7, 6), (-3617, 510)]
    return [
        float(Fraction(4**n * (4**n - 1) * b, d * math.factorial(2 * n)))
        for n, (b, d) in enumerate(bernoulli[:terms], 1)
    ]


T1, T2, T3, T4, T5, T6, T7, T8 = _tanh_coefficients(8)
LOG_TWO = math.log(2.0)


def pinball(x, y, a, p):
    """p = (quantile,). ``max(q d, (q - 1) d)`` with ``d = target - input``; gradient ``-q``
    where ``d > 0``, ``1 - q`` where ``d < 0``, and at ``d = 0`` the subdifferential's
    midpoint ``0.5 - q`` (PyTorch's autograd of ``torch.maximum`` at a tie)."""
    (q,) = p
    d = y - x
    loss = q * d if d >= 0 else (q - 1.0) * d
    g = -q if d > 0 else 0.5 - q
    return loss, (1.0 - q if d < 0 else g)


def tweedie(x, y, a, p):
    """p = (power,). The input is the log of the mean: ``-y exp((1-p) x) / (1-p) +
    exp((2-p) x) / (2-p)``, gradient ``-y exp((1-p) x) + exp((2-p) x)``.

    The divisions are by reciprocals of the parameter: LLVM hoists ``1 / (2 - p)`` out of
    the loop, where ``v / (2 - p)`` was a division per element (it may not rewrite one into
    the other itself: they round differently, by an ulp). With ``mathfn.exp``'s cheaper
    rounding, the loop went from 2.90 to 2.23 ms (10^6 float32, one thread, side by side in
    one process); the two full-range exps are most of what is left."""
    (power,) = p
    u = mathfn.exp((1.0 - power) * x)
    v = mathfn.exp((2.0 - power) * x)
    return v * (1.0 / (2.0 - power)) - y * u * (1.0 / (1.0 - power)), v - y * u


def tweedie_hessian(x, y, a, p):
    """``(2 - p) exp((2 - p) x) - (1 - p) y exp((1 - p) x)``, > 0 for ``y >= 0`` (XGBoost's)."""
    (power,) = p
    u = mathfn.exp((1.0 - power) * x)
    v = mathfn.exp((2.0 - power) * x)
    return (2.0 - power) * v - (1.0 - power) * y * u


def negative_target(x, y):
    return y < 0


def negative_target_error(index, x, y):
    return ValueError(f"tweedie_loss target must be non-negative, found {float(y)!r}")


#: The defaults of pinball_loss's ``quantile`` and tweedie_loss's ``power`` (XGBoost's
#: ``tweedie_variance_power``, LightGBM's default too).
DEFAULT_QUANTILE, DEFAULT_POWER = 0.5, 1.5
KERNELS["log_cosh_loss"] = (Elementwise(log_cosh, hessian=log_cosh_hessian), ())
# pinball's pieces are linear: its Hessian is l1's, 1 (LightGBM's quantile objective and
# XGBoost's reg:quantileerror use 1 too), an upper bound of the true 0
KERNELS["pinball_loss"] = (Elementwise(pinball, hessian=unit_hessian), (DEFAULT_QUANTILE,))
KERNELS["tweedie_loss"] = (
    Elementwise(
        tweedie, hessian=tweedie_hessian, invalid=negative_target, error=negative_target_error
    ),
    (DEFAULT_POWER,),
)


# gaussian_nll_loss: the kernel's arrays are (input, var, -, target), so that the template's
# second gradient (``target_grad``) is var's and its domain check sees var; p = (eps, c), c
# the constant term (0.5 log(2 pi) with ``full``, else 0).
def gaussian_nll(x, y, a, p):
    """``0.5 (log v + (x - t)^2 / v) + c`` with ``v = max(var, eps)``; gradient ``(x - t) /
    v``."""
    eps, c = p
    v = eps if y < eps else y  # var.clamp(min=eps): nan stays nan
    d = x - a
    r = 1.0 / v
    return 0.5 * (mathfn.log(v) + d * d * r) + c, d * r


def gaussian_nll_var(x, y, a, p):
    """d loss / d var, ``0.5 (1 - (x - t)^2 / v) / v`` at the clamped ``v``: PyTorch clamps
    under ``no_grad``, so the gradient passes the clamp as an identity (also where var <
    eps)."""
    eps, _ = p
    v = eps if y < eps else y  # var.clamp(min=eps): nan stays nan
    d = x - a
    r = 1.0 / v
    return 0.5 * r * (1.0 - d * d * r)


def gaussian_nll_target(x, y, a, p):
    """d loss / d target, ``-(x - t) / v``: written through the template's third output,
    which finishes a value as it does the gradient (weight, grad_output, scale)."""
    eps, _ = p
    return (a - x) / (eps if y < eps else y)


def gaussian_nll_hessian(x, y, a, p):
    """d^2 loss / d input^2 = ``1 / v``."""
    eps, _ = p
    return 1.0 / (eps if y < eps else y)


def negative_var(x, y):
    return y < 0


def negative_var_error(index, x, y):
    return ValueError(f"var has negative entry/entries (found {float(y)!r})")


#: value_and_grad's kernel: the input's gradient, var's (``target_grad``) and the target's
#: (the Hessian's output slot); grad_hess's: the input's gradient and Hessian diagonal.
GAUSSIAN = Elementwise(
    gaussian_nll,
    target_grad=gaussian_nll_var,
    hessian=gaussian_nll_target,
    invalid=negative_var,
    error=negative_var_error,
)
GAUSSIAN_HESSIAN = Elementwise(
    gaussian_nll, hessian=gaussian_nll_hessian, invalid=negative_var, error=negative_var_error
)
#: The default ``eps`` of gaussian_nll_loss.
DEFAULT_GAUSSIAN_EPS = 1e-6
HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def var_axes(shape, var_shape):
    """``(outer, middle, inner)``: var's full-size gradient, reshaped so, is summed over its
    middle axis to var's shape (its one broadcast axis, or every axis for a scalar var);
    ``None`` where var has the input's shape."""
    if var_shape == shape:
        return None
    n = math.prod(shape)
    if not var_shape:
        return 1, n, 1
    if var_shape == shape[:-1]:
        var_shape = (*var_shape, 1)
    axes = [i for i, (s, v) in enumerate(zip(shape, var_shape)) if s != v]
    if not axes:  # var (N,) for an input (N, 1)
        return n, 1, 1
    (axis,) = axes
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def gaussian_nll_cpu(p, loss_out, grads, grad_output, scale):
    """value_and_grad's CPU kernel: one pass writes all three gradients; var's, where var
    was broadcast, into a full-size buffer summed afterwards over the broadcast axis in
    float64 (NumPy's sum along an axis: the same order on every call)."""
    if not grads:
        return GAUSSIAN.cpu(p, loss_out, grads, grad_output, scale)
    g_input, g_target, g_var = grads
    axes = var_axes(p.value_shape, p.grad_shapes[2])
    full = g_var if axes is None else np.empty(p.value_shape, p.dtype)
    total = GAUSSIAN.cpu_hessian(p, loss_out, (g_input, full), (g_target,), grad_output, scale)
    if axes is not None:
        summed = full.reshape(axes).sum(axis=1, dtype=np.float64)
        g_var[...] = summed.reshape(g_var.shape)
    return total


def _prepare_gaussian(arrays, options, backend):
    """PyTorch 2.13's checks of var: a number or an array; negative entries are a
    ValueError (arrays: by the kernel's domain check); an array of the input's shape, of it
    without its last dimension (a trailing 1 is added), or of its number of dimensions with
    exactly one of size 1 where the input's is not, else "var is of incorrect size"."""
    input, target, var = arrays
    params = {
        "eps": validate.check_real("eps", options["eps"]),
        "constant": HALF_LOG_TWO_PI if validate.check_bool("full", options["full"]) else 0.0,
    }
    x = validate.as_array(input, backend)
    shape = tuple(x.shape)
    if isinstance(var, (int, float, np.integer, np.floating)) and not isinstance(var, bool):
        value = validate.check_real("var", var)
        if value < 0:
            raise ValueError(f"var has negative entry/entries (got {value!r})")
        var_shape: tuple = ()
        # PyTorch: var * ones_like(input), in the input's dtype
        host = np.asarray(value, x.dtype if x.dtype.kind == "f" else np.float64)
        v = validate.as_array(host, backend)
    else:
        v = validate.as_array(var, backend)
        validate.float_dtype("var", v)
        var_shape = tuple(v.shape)
        if var_shape != shape:
            if var_shape == shape[:-1]:
                v = v.reshape((*var_shape, 1))
            elif len(var_shape) != len(shape) or (
                sum(b for a, b in zip(shape, var_shape) if a != b) != 1
            ):
                raise ValueError(
                    f"var is of incorrect size: {var_shape} for an input of shape {shape}"
                )
    try:  # (broadcast_to's view is read-only, a kernel signature of its own: not for var
        # of the input's shape, the common case)
        v = v if tuple(v.shape) == shape else validate.broadcast_to(v, shape, backend)
    except ValueError:
        raise ValueError(
            f"var is of incorrect size: {var_shape} for an input of shape {shape}"
        ) from None
    p = prepare(
        (x, v, target), options, backend, names=("input", "var", "target"), params=params, grads=3
    )
    result, dt_input, dt_var, dt_target = p.result_dtypes
    p.grad_shapes = (shape, shape, var_shape)
    p.result_dtypes = (result, dt_input, dt_target, dt_var)
    return p


def _open_interval(name, value, lo, hi):
    value = validate.check_real(name, value)
    if not lo < value < hi:  # also rejects nan
        raise ValueError(f"{name} must be in the open interval ({lo}, {hi}), got {value!r}")
    return value


def _prepare_log_cosh(arrays, options, backend):
    return prepare(arrays, options, backend)


def _prepare_pinball(arrays, options, backend):
    quantile = _open_interval("quantile", options["quantile"], 0.0, 1.0)
    return prepare(arrays, options, backend, params={"quantile": quantile})


def _prepare_tweedie(arrays, options, backend):
    power = _open_interval("power", options["power"], 1.0, 2.0)
    return prepare(arrays, options, backend, params={"power": power})


#: PyTorch 2.13's warning for kl_div's "mean" (UserWarning, every call that asks for it).
KL_DIV_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def _prepare_kl_div(arrays, options, backend):
    reduction = options["reduction"]
    if reduction == "mean":  # stacklevel: the caller of Loss.__call__/grad/value_and_grad
        warnings.warn(KL_DIV_MEAN_WARNING, UserWarning, stacklevel=5)
    log_target = float(validate.check_bool("log_target", options["log_target"]))
    p = prepare(arrays, options, backend, params={"log_target": log_target})
    if reduction == "batchmean":  # a mean over the first dimension (LossSpec.reductions)
        p.reduction = "mean"
        p.denominator = float(p.value_shape[0]) if p.value_shape else 1.0
    return p


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


def _ref_kl_div(input, target, log_target=False, **_):
    x, y = np.asarray(input, np.float64), np.asarray(target, np.float64)
    if log_target:
        return np.exp(y) * (y - x)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(y == 0, 0.0, y * np.log(y)) - y * x


def _example_kl_div(rng, size, dtype):
    """Log-probabilities against probabilities, rows of 8 (a few exact zeros among them)."""
    shape = (size // 8, 8) if size >= 8 else (size,)
    x = rng.standard_normal(shape)
    x = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    y = rng.random(shape) * (rng.random(shape) > 0.1)
    y = y / np.maximum(y.sum(axis=-1, keepdims=True), 1e-12)
    return (x.astype(dtype), y.astype(dtype)), {}


def _log_target(rng, arrays, dtype):  # an option set: the target given as log-probabilities
    y = np.maximum(np.asarray(arrays[1], np.float64), 1e-3)
    return {"log_target": True, "target": np.log(y).astype(dtype)}


def _ref_log_cosh(input, target, **_):
    d = np.asarray(input, np.float64) - np.asarray(target, np.float64)
    return np.logaddexp(d, -d) - np.log(2.0)  # cosh overflows from |d| = 710


def _ref_pinball(input, target, quantile=DEFAULT_QUANTILE, **_):
    d = np.asarray(target, np.float64) - np.asarray(input, np.float64)
    return np.maximum(quantile * d, (quantile - 1) * d)


def _ref_tweedie(input, target, power=DEFAULT_POWER, **_):
    x, y = np.asarray(input, np.float64), np.asarray(target, np.float64)
    return np.exp((2 - power) * x) / (2 - power) - y * np.exp((1 - power) * x) / (1 - power)


def _large_differences(rng, arrays, dtype):  # an option set: |d| far beyond cosh's range
    return {"input": (np.asarray(arrays[0]) * 300).astype(dtype)}


def _example_tweedie(rng, size, dtype):
    """Log-means against compound Poisson-gamma targets (exact zeros, then positive)."""
    shape = (size // 8, 8) if size >= 8 else (size,)
    x = rng.standard_normal(shape) * 0.5
    y = rng.poisson(1.0, shape) * rng.gamma(2.0, 0.5, shape)
    return (x.astype(dtype), y.astype(dtype)), {}


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


def _ref_gaussian(input, target, var, full=False, eps=DEFAULT_GAUSSIAN_EPS, **_):
    x, t = np.asarray(input, np.float64), np.asarray(target, np.float64)
    v = np.asarray(var, np.float64)
    if v.shape != x.shape and v.shape == x.shape[:-1]:
        v = v[..., None]
    v = np.maximum(v, eps)  # nan stays nan
    loss = 0.5 * (np.log(v) + (x - t) ** 2 / v) + (0.5 * np.log(2 * np.pi) if full else 0.0)
    return np.broadcast_to(loss, x.shape)


def _example_gaussian(rng, size, dtype):
    """Means, samples and a variance per element, away from the eps clamp."""
    (x, t), _ = _example(rng, size, dtype)
    return (x, t, rng.uniform(0.2, 2.0, x.shape).astype(dtype)), {}


def _var_per_row(rng, arrays, dtype):  # option sets: var broadcast over the last axis
    return {"var": rng.uniform(0.2, 2.0, np.shape(arrays[0])[:-1]).astype(dtype)}


def _var_column(rng, arrays, dtype):
    return {"var": rng.uniform(0.2, 2.0, (*np.shape(arrays[0])[:-1], 1)).astype(dtype)}


def _var_per_column(rng, arrays, dtype):  # broadcast over the first axis
    return {"var": rng.uniform(0.2, 2.0, (1, *np.shape(arrays[0])[1:])).astype(dtype)}


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
    LossSpec(
        name="log_cosh_loss",
        family="regression",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"reduction": "mean"},
        prepare=_prepare_log_cosh,
        reference=_ref_log_cosh,
        example=_example,
        option_sets=(_large_differences,),
        doc=f"""Log-cosh loss (Keras's ``log_cosh``, not in PyTorch): ``log(cosh(d))`` with
    ``d = input - target``, computed as ``|d| + log1p(exp(-2|d|)) - log 2`` so that it stays
    finite for any finite ``d``: about ``d**2 / 2`` for small ``|d|``, ``|d| - log 2`` for large.
    Gradient: ``tanh(d)``; Hessian diagonal (``grad_hess``): ``1 - tanh(d)**2``.
    ``"mean"`` divides by the element count.
{_SHAPE_NO_WEIGHT}""",
    ),
    LossSpec(
        name="pinball_loss",
        family="regression",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"quantile": DEFAULT_QUANTILE, "reduction": "mean"},
        prepare=_prepare_pinball,
        reference=_ref_pinball,
        example=_example,
        option_sets=({"quantile": 0.1}, {"quantile": 0.9}),
        hessian_bound=True,
        doc=f"""Pinball (quantile) loss for the ``quantile`` q in (0, 1) (scikit-learn's
    ``mean_pinball_loss``, LightGBM's ``quantile``): ``max(q d, (q - 1) d)`` with
    ``d = target - input``; its minimiser is the q-quantile of the target. Gradient: ``-q``
    where the input is below the target, ``1 - q`` above, and ``0.5 - q`` where they are equal
    (the middle of the subgradients, as PyTorch's autograd gives for ``torch.maximum``; for
    q = 0.5 the loss is half ``l1_loss`` and that gradient is 0, as ``l1_loss``'s).
    Hessian diagonal (``grad_hess``): 1 everywhere, not the true 0 of the linear pieces,
    which would make a Newton step infinite (as ``l1_loss``; LightGBM's ``quantile`` and
    XGBoost's ``reg:quantileerror`` objectives use 1 too). ``"mean"`` divides by the element
    count.
{_SHAPE_NO_WEIGHT}""",
    ),
    LossSpec(
        name="tweedie_loss",
        family="regression",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"power": DEFAULT_POWER, "reduction": "mean"},
        prepare=_prepare_tweedie,
        reference=_ref_tweedie,
        example=_example_tweedie,
        option_sets=({"power": 1.1}, {"power": 1.9}),
        doc=f"""Tweedie negative log-likelihood for ``power`` p in (1, 2) (compound
    Poisson-gamma: claims, rainfall, sales with many exact zeros). As XGBoost's
    ``reg:tweedie`` and LightGBM's ``tweedie``, the input is the log of the predicted mean
    (a raw score; the mean is ``exp(input)``):
    ``loss = exp((2 - p) x) / (2 - p) - y exp((1 - p) x) / (1 - p)``, the likelihood's terms
    that depend on the prediction (XGBoost's ``tweedie-nloglik`` metric; the terms of the
    target alone are left out, so the loss is not 0 at its minimum ``x = log y``).
    Gradient: ``exp((2 - p) x) - y exp((1 - p) x)``; Hessian diagonal (``grad_hess``):
    ``(2 - p) exp((2 - p) x) - (1 - p) y exp((1 - p) x)``. The target must be >= 0: a negative
    one is a ``ValueError`` (XGBoost refuses it too). ``"mean"`` divides by the element count.
{_SHAPE_NO_WEIGHT}""",
    ),
    LossSpec(
        name="gaussian_nll_loss",
        family="regression",
        arguments=("input", "target", "var"),
        differentiable=("input", "target", "var"),
        options={"full": False, "eps": DEFAULT_GAUSSIAN_EPS, "reduction": "mean"},
        prepare=_prepare_gaussian,
        reference=_ref_gaussian,
        example=_example_gaussian,
        option_sets=(
            {"full": True, "eps": 1e-3},
            _var_per_row,
            _var_column,
            _var_per_column,
        ),
        doc="""Gaussian negative log likelihood of ``target`` under means ``input`` and variances
    ``var``, PyTorch 2.13's ``gaussian_nll_loss``:
    ``0.5 * (log(v) + (input - target) ** 2 / v)`` with ``v = max(var, eps)``, plus
    ``0.5 * log(2 pi)`` with ``full``. ``"mean"`` divides by the element count.

    ``var`` is an array of the input's shape (one variance per element), of the input's
    shape without its last dimension, or of the input's number of dimensions with one
    dimension of size 1 where the input's is not (one variance shared along that axis); or a
    number (one for all; PyTorch takes a Python float, lossforge any real number). Any other
    shape is a ``ValueError`` ("var is of incorrect size"), and so is a negative entry ("var
    has negative entry/entries"). ``nan`` in var propagates.

    Gradients (``grad`` returns three, for ``input``, ``target`` and ``var``):
    ``(input - target) / v``, its negative, and ``0.5 * (1 - (input - target) ** 2 / v) / v``
    summed over the axis along which var was broadcast (in float64, in a fixed order), so
    of var's shape (0-d for a number). As in PyTorch, where ``eps`` clamps var the clamp
    is done outside autograd: var's gradient is the formula's at ``v = eps``, not 0.
    Hessian diagonal (``grad_hess``, for ``input``): ``1 / v``.

    Shape:
        input: any shape. target: the input's shape (lossforge does not broadcast it).
        var: see above. Output: a scalar for "mean" and "sum"; the input's shape for "none".
""",
    ),
    LossSpec(
        name="kl_div",
        family="divergence",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"reduction": "mean", "log_target": False},
        reductions=("batchmean",),
        prepare=_prepare_kl_div,
        reference=_ref_kl_div,
        example=_example_kl_div,
        option_sets=(_log_target,),
        doc=f"""Kullback-Leibler divergence of ``target`` from the distribution whose
    log-probabilities are ``input``, pointwise as PyTorch 2.13:
    ``xlogy(target, target) - target * input`` (0 where ``target == 0``), or, with
    ``log_target``, ``exp(target) * (target - input)``. Gradient (for ``input`` only):
    ``-target``, or ``-exp(target)``. Hessian diagonal (``grad_hess``): 0, exactly: the
    pointwise loss is linear in the input (the curvature of a KL objective over
    log-probabilities comes from the log-softmax that makes them; with a zero Hessian it
    makes no gradient-boosting objective on its own).

    ``reduction``: ``"batchmean"`` divides the sum by the size of the first dimension (the
    batch; 1 for a 0-d input): the KL divergence per sample, what most callers want.
    ``"mean"`` (the default, as in PyTorch) divides by the element count and warns, with
    PyTorch's ``UserWarning``, that it does; ``"sum"``, ``"none"`` as usual.
    ``partial(..., reduction="batchmean")`` returns the batch size as the denominator. With
    the default ``"mean"`` every call takes the general path (it warns), not the fast lane.
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
    fast = functools.partial(POISSON_LOG_RATE.fast, params=POISSON_DEFAULTS)
    cpu, hessian = _poisson_kernel("cpu"), _poisson_kernel("cpu_hessian")
    yield KernelSpec("poisson_nll_loss", "cpu", cpu, fast=fast, hessian=hessian)
    cuda, hessian = _poisson_kernel("cuda"), _poisson_kernel("cuda_hessian")
    yield KernelSpec("poisson_nll_loss", "cuda", cuda, hessian=hessian)
    yield KernelSpec(
        "gaussian_nll_loss", "cpu", gaussian_nll_cpu, hessian=GAUSSIAN_HESSIAN.cpu_hessian
    )
    yield KernelSpec(
        "gaussian_nll_loss",
        "cuda",
        "lossforge.plugins.regression.cuda:gaussian_nll",
        hessian=GAUSSIAN_HESSIAN.cuda_hessian,
    )
    for spec in KL_DIV.specs("kl_div"):  # no fast lane: the default "mean" warns
        yield dataclasses.replace(spec, fast=None)
