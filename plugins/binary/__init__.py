"""Binary and multi-label losses: ``binary_cross_entropy``,
``binary_cross_entropy_with_logits`` (family ``"binary"``) and
``multilabel_soft_margin_loss`` (family ``"multilabel"``), with PyTorch 2.13's semantics.

``weight`` (and ``pos_weight``) broadcast to the input's shape as in PyTorch; a weight that
is not the input's full shape is materialised to it before the kernel (one copy). ``"mean"``
is the plain element mean (not divided by the weights). Input and target must have the same
shape. ``binary_cross_entropy`` refuses inputs outside [0, 1] with ``ValueError``, as PyTorch
refuses them with an error; NaN inputs propagate.
"""

from __future__ import annotations

import math

import numpy as np
from lossforge.plugins.binary.cpu import BCE, BCE_LOGITS, first_outside_unit

from lossforge import KernelSpec, LossSpec, Prepared, hookimpl, validate

_SHAPE = """
    Shape:
        input: any shape. target: the input's shape. weight: broadcastable to the input.
        Output: a scalar for "mean" and "sum"; the input's shape for "none".
"""


def outside_unit(bad: float) -> ValueError:
    """The error for a ``binary_cross_entropy`` input ``bad`` outside [0, 1]."""
    return ValueError(
        f"binary_cross_entropy input must be probabilities in [0, 1], found {bad!r}; "
        "for logits use binary_cross_entropy_with_logits"
    )


def _broadcast(name, value, shape, dtype, backend, hint=""):
    """``value`` materialised to ``shape`` (C-contiguous ``dtype``), or None."""
    if value is None:
        return None
    array = validate.as_array(value, backend)
    validate.float_dtype(name, array)
    try:
        full = validate.broadcast_to(array, shape, backend)
    except ValueError:
        raise ValueError(
            f"{name} of shape {tuple(array.shape)} does not broadcast to the input's shape "
            f"{tuple(shape)}{hint}"
        ) from None
    return validate.as_float(name, full, dtype, backend)


def _prepare(kind, arrays, options, backend):
    (x, y), _, dtype, dtypes, shape = validate.elementwise(
        arrays, ("input", "target"), None, backend
    )
    w = _broadcast("weight", options["weight"], shape, dtype, backend)
    pw = None
    if kind == BCE:
        if backend == "cpu":  # the CUDA kernel flags bad inputs in its own pass
            bad = first_outside_unit(x.ravel())
            if bad is not None:
                raise outside_unit(bad)
    else:
        last = shape[-1] if shape else 1
        pw = _broadcast(
            "pos_weight",
            options["pos_weight"],
            shape,
            dtype,
            backend,
            f": its last dimension must have length {last} (one weight per class) or 1",
        )
    return Prepared(
        arrays=(x, y, w, pw),
        params=(kind,),
        reduction=options["reduction"],
        denominator=float(math.prod(shape)),
        value_shape=shape,
        grad_shapes=(shape,),
        dtype=dtype,
        result_dtypes=dtypes[:2],
        backend=backend,
    )


def _prepare_bce(arrays, options, backend):
    return _prepare(BCE, arrays, options, backend)


def _prepare_bce_logits(arrays, options, backend):
    return _prepare(BCE_LOGITS, arrays, options, backend)


def _prepare_multilabel(arrays, options, backend):
    (x, y), _, dtype, dtypes, shape = validate.elementwise(
        arrays, ("input", "target"), None, backend
    )
    if len(shape) not in (1, 2):
        raise ValueError(f"input must have shape (C) or (N, C), got {shape}")
    classes = shape[-1]
    w = _broadcast("weight", options["weight"], shape, dtype, backend)
    rows = shape[0] if len(shape) == 2 else 1
    return Prepared(
        arrays=(
            x.reshape(rows, classes),
            y.reshape(rows, classes),
            None if w is None else w.reshape(rows, classes),
        ),
        params=(),
        reduction=options["reduction"],
        denominator=float(rows),
        value_shape=shape[:1] if len(shape) == 2 else (),
        grad_shapes=(shape,),
        dtype=dtype,
        result_dtypes=dtypes[:2],
        backend=backend,
    )


# float64 references for the conformance kit: per-element losses.
def _ref_bce(input, target, weight=None, **_):
    x, y = np.asarray(input, np.float64), np.asarray(target, np.float64)
    with np.errstate(divide="ignore"):
        e = -(y * np.maximum(np.log(x), -100) + (1 - y) * np.maximum(np.log(1 - x), -100))
    return e if weight is None else e * weight


def _ref_bce_logits(input, target, weight=None, pos_weight=None, **_):
    x, y = np.asarray(input, np.float64), np.asarray(target, np.float64)
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
    e = pw * y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x)
    return e if weight is None else e * weight


def _ref_multilabel(input, target, weight=None, **_):
    e = _ref_bce_logits(input, target)
    if weight is not None:
        e = e * np.asarray(weight, np.float64)
    return e.mean(axis=-1)


def _shape(size):
    return (size // 8, 8) if size >= 8 else (size,)


def _example_bce(rng, size, dtype):
    shape = _shape(size)
    x = rng.uniform(0.02, 0.98, shape).astype(dtype)
    return (x, rng.random(shape).astype(dtype)), {"weight": rng.random(shape[-1]).astype(dtype)}


def _example_logits(rng, size, dtype):
    shape = _shape(size)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    y = (rng.random(shape) < 0.3).astype(dtype)
    return (x, y), {"pos_weight": (rng.random(shape[-1]) * 3).astype(dtype)}


def _example_multilabel(rng, size, dtype):
    shape = _shape(size)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    return (x, (rng.random(shape) < 0.3).astype(dtype)), {}


# option sets for the conformance kit: a weight per element, and one per class (broadcast)
def _weight(rng, arrays, dtype):
    return {"weight": rng.uniform(0.5, 2.0, np.shape(arrays[0])).astype(dtype)}


def _class_weight(rng, arrays, dtype):
    return {"weight": rng.uniform(0.5, 2.0, np.shape(arrays[0])[-1:]).astype(dtype)}


SPECS = [
    LossSpec(
        name="binary_cross_entropy",
        family="binary",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"weight": None, "reduction": "mean"},
        prepare=_prepare_bce,
        reference=_ref_bce,
        example=_example_bce,
        option_sets=({"weight": None}, _weight),
        doc=f"""Binary cross entropy of probabilities ``x`` in [0, 1]:
    ``loss = -w (y max(log x, -100) + (1 - y) max(log(1 - x), -100))``; gradient
    ``w (x - y) / max(x (1 - x), 1e-12)``, PyTorch's clamps, so 0 and 1 stay finite.
{_SHAPE}""",
    ),
    LossSpec(
        name="binary_cross_entropy_with_logits",
        family="binary",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"weight": None, "reduction": "mean", "pos_weight": None},
        prepare=_prepare_bce_logits,
        reference=_ref_bce_logits,
        example=_example_logits,
        option_sets=({"pos_weight": None}, _weight, _class_weight),
        doc=f"""Binary cross entropy of logits ``x``, through a stable log-sigmoid:
    ``loss = w (p y softplus(-x) + (1 - y) softplus(x))`` with ``p`` the ``pos_weight``
    broadcast along the last dimension (one per class); finite for logits of +-1e4.
    Gradient: ``w ((p y + 1 - y) sigmoid(x) - p y)``.
{_SHAPE}""",
    ),
    LossSpec(
        name="multilabel_soft_margin_loss",
        family="multilabel",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"weight": None, "reduction": "mean"},
        prepare=_prepare_multilabel,
        reference=_ref_multilabel,
        example=_example_multilabel,
        option_sets=(_class_weight,),
        doc="""Multi-label one-versus-all loss: a sigmoid on every output and the log loss,
    averaged over the C classes of each sample:
    ``loss_n = -(1/C) sum_c w_c (y log sigmoid(x) + (1 - y) log sigmoid(-x))``.

    Shape:
        input: (C) or (N, C). target: the input's shape (floats, usually 0 or 1).
        weight: broadcastable to the input, usually (C), one per class.
        Output: a scalar for "mean" (over N) and "sum"; (N) or () for "none".
""",
    ),
]


@hookimpl
def lossforge_losses():
    return SPECS


@hookimpl
def lossforge_kernels():
    for spec in SPECS:
        kernel = "multilabel" if spec.name == "multilabel_soft_margin_loss" else "binary"
        cpu = "lossforge.plugins.binary.cpu"
        yield KernelSpec(spec.name, "cpu", f"{cpu}:{kernel}", fast=f"{cpu}:fast_{spec.name}")
        yield KernelSpec(spec.name, "cuda", f"lossforge.plugins.binary.cuda:{kernel}")
