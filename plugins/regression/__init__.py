"""The regression family: ``mse_loss``, ``l1_loss``, ``smooth_l1_loss``, ``huber_loss``.

A built-in plugin, registered through the ``"lossforge"`` entry point like any other.
Semantics are PyTorch 2.13's, including the element-wise ``weight`` (same shape as the
input): ``"mean"`` divides by the summed weights for ``mse_loss``/``l1_loss`` and by the
element count for ``huber_loss``. Input and target must have the same shape (PyTorch
broadcasts with a warning; lossforge refuses with ``ValueError``).
"""

from __future__ import annotations

import math

import numpy as np

from lossforge import KernelSpec, LossSpec, Prepared, hookimpl, validate

MSE, L1, SMOOTH_L1, HUBER = 0, 1, 2, 3  # the kernels' switch (see cpu.py)
#: The default ``beta`` of smooth_l1_loss and ``delta`` of huber_loss.
DEFAULT_BETA = DEFAULT_DELTA = 1.0

_SHAPE = """
    Shape:
        input: any shape. target: the input's shape. weight: the input's shape.
        Output: a scalar for "mean" and "sum"; the input's shape for "none".
"""


def _prepare(kind, param, weighted_mean, arrays, options, backend):
    weight = options.get("weight")
    (x, y), w, dtype, dtypes, shape = validate.elementwise(
        arrays, ("input", "target"), weight, backend
    )
    n = math.prod(shape)
    denominator = validate.total(w, backend) if weighted_mean and w.size else float(n)
    return Prepared(
        arrays=(x, y, w),
        params=(kind, param),
        reduction=options["reduction"],
        denominator=denominator,
        value_shape=shape,
        grad_shapes=(shape,),
        dtype=dtype,
        result_dtypes=dtypes[:2],
        backend=backend,
    )


def _prepare_mse(arrays, options, backend):
    return _prepare(MSE, 0.0, True, arrays, options, backend)


def _prepare_l1(arrays, options, backend):
    return _prepare(L1, 0.0, True, arrays, options, backend)


def _prepare_smooth_l1(arrays, options, backend):
    beta = validate.check_nonnegative("beta", options["beta"])
    if beta == 0:  # PyTorch computes l1_loss then, gradient included
        return _prepare(L1, 0.0, False, arrays, options, backend)
    return _prepare(SMOOTH_L1, beta, False, arrays, options, backend)


def _prepare_huber(arrays, options, backend):
    delta = validate.check_nonnegative("delta", options["delta"])
    if delta == 0:
        raise ValueError("delta must be positive (huber_loss is undefined for delta = 0), got 0.0")
    return _prepare(HUBER, delta, False, arrays, options, backend)


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
    given (PyTorch 2.13). Gradient: ``2 * weight_i * (input_i - target_i)``.
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
        doc=f"""Mean absolute error: ``loss_i = weight_i * |input_i - target_i|``.

    ``"mean"`` divides by the element count, or by ``sum(weight)`` when a weight is given.
    Gradient: ``weight_i * sign(input_i - target_i)`` (0 where they are equal, as PyTorch).
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
        doc=f"""Smooth L1: ``0.5 d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 beta``,
    with ``d = input - target``; ``beta = 0`` is ``l1_loss``. ``beta`` must be >= 0.
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
        doc=f"""Huber: ``0.5 d**2`` where ``|d| < delta``, else ``delta (|d| - 0.5 delta)``,
    times ``weight_i`` when given; ``delta`` must be > 0. Unlike ``mse_loss``, the weighted
    ``"mean"`` divides by the element count (PyTorch 2.13).
{_SHAPE}""",
    ),
]


@hookimpl
def lossforge_losses():
    return SPECS


@hookimpl
def lossforge_kernels():
    for spec in SPECS:
        yield KernelSpec(
            spec.name,
            "cpu",
            "lossforge.plugins.regression.cpu:regression",
            fast=f"lossforge.plugins.regression.cpu:fast_{spec.name}",
        )
        yield KernelSpec(spec.name, "cuda", "lossforge.plugins.regression.cuda:regression")
