"""``sigmoid_focal_loss`` for lossforge, with torchvision's semantics: an example of a
third-party plugin, found by lossforge through its ``"lossforge"`` entry point alone.

``loss = alpha_t * BCE_with_logits(x, y) * (1 - p_t) ** gamma`` with ``p = sigmoid(x)``,
``p_t = p y + (1 - p)(1 - y)``, ``alpha_t = alpha y + (1 - alpha)(1 - y)`` (no alpha
weighting when ``alpha < 0``). The default reduction is ``"none"``, as in torchvision.
"""

from __future__ import annotations

import math

import numpy as np

import lossforge
from lossforge import KernelSpec, LossSpec, Prepared, validate


def _prepare(arrays, options, backend):
    (x, y), _, dtype, dtypes, shape = validate.elementwise(
        arrays, ("inputs", "targets"), None, backend
    )
    alpha = validate.check_real("alpha", options["alpha"])
    gamma = validate.check_nonnegative("gamma", options["gamma"])
    return Prepared(
        arrays=(x, y),
        params=(alpha, gamma),
        reduction=options["reduction"],
        denominator=float(math.prod(shape)),
        value_shape=shape,
        grad_shapes=(shape,),
        dtype=dtype,
        result_dtypes=dtypes[:2],
        backend=backend,
    )


def _reference(inputs, targets, alpha=0.25, gamma=2.0, **_):
    x, y = np.asarray(inputs, np.float64), np.asarray(targets, np.float64)
    p = 1 / (1 + np.exp(-x))
    ce = np.logaddexp(0, -x) * y + np.logaddexp(0, x) * (1 - y)
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss


def _example(rng, size, dtype):
    shape = (size // 8, 8) if size >= 8 else (size,)
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    return (x, (rng.random(shape) < 0.25).astype(dtype)), {"reduction": "mean"}


SPEC = LossSpec(
    name="sigmoid_focal_loss",
    family="detection",
    arguments=("inputs", "targets"),
    differentiable=("inputs",),
    options={"alpha": 0.25, "gamma": 2.0, "reduction": "none"},
    prepare=_prepare,
    reference=_reference,
    example=_example,
    doc=__doc__,
)


@lossforge.hookimpl
def lossforge_losses():
    yield SPEC


@lossforge.hookimpl
def lossforge_kernels():
    yield KernelSpec("sigmoid_focal_loss", "cpu", "lossforge_focal.cpu:focal")
    yield KernelSpec("sigmoid_focal_loss", "cuda", "lossforge_focal.cuda:focal")
