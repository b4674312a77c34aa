"""Binary, multi-label and ranking losses: ``binary_cross_entropy``,
``binary_cross_entropy_with_logits``, ``soft_margin_loss``, ``hinge_embedding_loss``
(family ``"binary"``), ``multilabel_soft_margin_loss`` (family ``"multilabel"``) and
``margin_ranking_loss`` (family ``"ranking"``), with PyTorch 2.13's semantics.

``weight`` (and ``pos_weight``) broadcast to the input's shape as in PyTorch; a weight that
is not the input's full shape is materialised to it before the kernel (one copy). ``"mean"``
is the plain element mean (not divided by the weights). Input and target must have the same
shape. ``binary_cross_entropy`` refuses inputs and targets outside [0, 1] with ``ValueError``
naming the first such element in memory order (the input, when both are outside there), as
PyTorch refuses them with an error; NaN inputs and targets propagate (PyTorch refuses a NaN
target; lossforge treats NaN in any argument alike).

The kernels are made from the formulas below by ``lossforge.kernels.Elementwise``;
``multilabel_soft_margin_loss`` is the logits formula in its row-mean form.
"""

from __future__ import annotations

import math

import numpy as np

from lossforge import LossSpec, Prepared, hookimpl, validate
from lossforge.kernels import Elementwise, prepare
from lossforge.runtime import mathfn

_SHAPE = """
    Shape:
        input: any shape. target: the input's shape. weight: broadcastable to the input.
        Output: a scalar for "mean" and "sum"; the input's shape for "none".
"""

#: PyTorch clamps each log term of binary_cross_entropy at -100, and the denominator of its
#: gradient at 1e-12 held in a float32 (its CPU kernel's constant), so that inputs of exactly
#: 0 or 1 stay finite.
LOG_FLOOR = -100.0
GRAD_EPSILON = float(np.float32(1e-12))


# The formulas run in the input's precision (float32 runs 16 lanes a vector, as PyTorch
# computes float32), with runtime.mathfn's vectorizable exp and log; constants through
# mathfn.like so that a float32 formula stays float32. Selects, not branches; nan stays nan
# (a clamp written with max would replace it).


def bce(x, y, a, p):
    one = mathfn.like(x, 1.0)
    floor = mathfn.like(x, LOG_FLOOR)
    epsilon = mathfn.like(x, GRAD_EPSILON)
    log_x = mathfn.log_native(x)
    log_x = floor if log_x < floor else log_x
    log_1x = mathfn.log_native(one - x)
    log_1x = floor if log_1x < floor else log_1x
    denominator = (one - x) * x
    denominator = epsilon if denominator < epsilon else denominator
    return -(y * log_x + (one - y) * log_1x), (x - y) / denominator


def bce_hessian(x, y, a, p):
    """``y / x^2 + (1 - y) / (1 - x)^2``, each denominator floored at the gradient's epsilon
    (finite at inputs of exactly 0 or 1, as the gradient is)."""
    one = mathfn.like(x, 1.0)
    epsilon = mathfn.like(x, GRAD_EPSILON)
    xx = x * x
    xx = epsilon if xx < epsilon else xx
    yy = (one - x) * (one - x)
    yy = epsilon if yy < epsilon else yy
    return y / xx + (one - y) / yy


def outside_unit(x, y):
    """binary_cross_entropy's domain: an input or target outside [0, 1] (nan is not)."""
    return (x < 0) | (x > 1) | (y < 0) | (y > 1)


def outside_unit_error(index, x, y):
    """The error for the first element outside [0, 1], naming the input if it is outside."""
    if x < 0 or x > 1:
        return ValueError(
            f"binary_cross_entropy input must be probabilities in [0, 1], found {float(x)!r}; "
            "for logits use binary_cross_entropy_with_logits"
        )
    return ValueError(f"binary_cross_entropy target must be in [0, 1], found {float(y)!r}")


def bce_with_logits(x, y, a, p):
    """``a`` is the positive-class weight: ``a y softplus(-x) + (1 - y) softplus(x)`` with
    ``softplus(+-x) = s + max(+-x, 0)``, ``s = log1p(exp(-|x|))``; gradient
    ``(1 - y) sigmoid(x) - a y sigmoid(-x)``, which has no cancellation for hard labels."""
    one = mathfn.like(x, 1.0)
    zero = mathfn.like(x, 0.0)
    e = mathfn.exp_nonpositive(-abs(x))  # in (0, 1]
    s = mathfn.log1p_unit_native(e)
    r = one / (one + e)  # one division serves both sigmoids
    positive = x if x > zero else zero
    negative = -x if x < zero else zero
    loss = a * y * (s + negative) + (one - y) * (s + positive)
    sigmoid = r if x >= zero else e * r
    sigmoid_neg = e * r if x >= zero else r
    return loss, (one - y) * sigmoid - a * y * sigmoid_neg


def bce_with_logits_hessian(x, y, a, p):
    """``((1 - y) + a y) sigmoid(x) sigmoid(-x)``."""
    one = mathfn.like(x, 1.0)
    e = mathfn.exp_nonpositive(-abs(x))
    r = one / (one + e)
    return ((one - y) + a * y) * (e * r * r)


def soft_margin(x, y, a, p):
    """PyTorch's ``log1p(exp(t))``, ``t = -y x``, gradient ``-y z / (1 + z)`` with
    ``z = exp(t)``; computed as the stable ``max(t, 0) + log1p(exp(-|t|))`` (vectorizable
    exp and log1p of arguments in range) but, as PyTorch, inf with a nan gradient where its
    ``exp`` overflows (``t > 709.78``): in float64 for float32 input too, so finite where
    PyTorch's float32 overflows already (``t > 88.7``)."""
    t = -y * x
    e = mathfn.exp_nonpositive(-abs(t))  # in (0, 1]
    r = 1.0 / (1.0 + e)
    loss = (t if t > 0 else 0.0) + mathfn.log1p_unit(e)
    g = -y * (r if t >= 0 else e * r)  # -y sigmoid(t)
    overflow = t > EXP_OVERFLOW
    return (math.inf if overflow else loss), (math.nan if overflow else g)


def soft_margin_hessian(x, y, a, p):
    """``y^2 sigmoid(t) sigmoid(-t)``, ``t = -y x``; nan where the loss overflows."""
    t = -y * x
    e = mathfn.exp_nonpositive(-abs(t))
    r = 1.0 / (1.0 + e)
    return math.nan if t > EXP_OVERFLOW else y * y * (e * r * r)


#: Where float64's exp overflows: PyTorch's soft_margin_loss is inf from here.
EXP_OVERFLOW = 709.782712893384


def hinge_embedding(x, y, a, p):
    """PyTorch's ``max(margin - x, 0)`` where ``y != 1`` plus ``x`` where ``y != -1`` (both
    terms for any other target); the clamp passes its gradient where ``margin - x >= 0``."""
    (margin,) = p
    m = margin - x
    hinge = y != 1.0
    identity = y != -1.0
    loss = (0.0 if m < 0 else m) if hinge else 0.0  # nan stays nan, as PyTorch's clamp
    g = -1.0 if (m >= 0) & hinge else 0.0
    return loss + (x if identity else 0.0), g + (1.0 if identity else 0.0)


def margin_ranking(x, y, a, p):
    """``max(0, margin - t (x1 - x2))`` of inputs ``x1 = x``, ``x2 = y`` and target ``t = a``;
    the clamp passes the gradient where its argument is >= 0, as PyTorch's."""
    (margin,) = p
    m = margin - a * (x - y)
    return (0.0 if m < 0 else m), (-a if m >= 0 else 0.0)


def margin_ranking_input2(x, y, a, p):
    (margin,) = p
    return a if margin - a * (x - y) >= 0 else 0.0


MARGIN_RANKING = Elementwise(margin_ranking, target_grad=margin_ranking_input2)
SOFT_MARGIN = Elementwise(soft_margin, hessian=soft_margin_hessian)
HINGE_EMBEDDING = Elementwise(hinge_embedding)
#: The default ``margin`` of hinge_embedding_loss.
DEFAULT_HINGE_MARGIN = 1.0

BCE = Elementwise(
    bce,
    hessian=bce_hessian,
    native=True,
    wide=("float32", "float64"),
    invalid=outside_unit,
    error=outside_unit_error,
)
LOGITS = Elementwise(
    bce_with_logits, hessian=bce_with_logits_hessian, native=True, wide=("float32", "float64")
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


def _prepare(arrays, options, backend, pos_weight=False):
    (x, y), _, dtype, dtypes, shape = validate.elementwise(
        arrays, ("input", "target"), None, backend
    )
    w = _broadcast("weight", options["weight"], shape, dtype, backend)
    pw = None
    if pos_weight:
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
        params={},
        reduction=options["reduction"],
        denominator=float(math.prod(shape)),
        value_shape=shape,
        grad_shapes=(shape,),
        dtype=dtype,
        result_dtypes=dtypes[:2],
        backend=backend,
    )


def _prepare_bce(arrays, options, backend):
    return _prepare(arrays, options, backend)


def _prepare_bce_logits(arrays, options, backend):
    return _prepare(arrays, options, backend, pos_weight=True)


def _prepare_soft_margin(arrays, options, backend):
    return prepare(arrays, options, backend)


def _prepare_hinge_embedding(arrays, options, backend):
    margin = validate.check_real("margin", options["margin"])
    return prepare(arrays, options, backend, params={"margin": margin})


def _prepare_margin_ranking(arrays, options, backend):
    margin = validate.check_real("margin", options["margin"])
    names = ("input1", "input2", "target")
    return prepare(arrays, options, backend, names=names, params={"margin": margin}, grads=2)


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
            None,
        ),
        params={},
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


def _ref_soft_margin(input, target, **_):
    x, y = np.asarray(input, np.float64), np.asarray(target, np.float64)
    with np.errstate(over="ignore"):
        return np.log1p(np.exp(-y * x))


def _ref_hinge_embedding(input, target, margin=1.0, **_):
    x, y = np.asarray(input, np.float64), np.asarray(target, np.float64)
    return np.where(y != 1, np.maximum(margin - x, 0), 0) + np.where(y != -1, x, 0)


def _ref_margin_ranking(input1, input2, target, margin=0.0, **_):
    x1, x2 = np.asarray(input1, np.float64), np.asarray(input2, np.float64)
    return np.maximum(margin - np.asarray(target, np.float64) * (x1 - x2), 0)


def _example_ranking(rng, size, dtype):
    shape = _shape(size)
    x1, x2 = rng.standard_normal((2, *shape)).astype(dtype)
    return (x1, x2, rng.choice([-1.0, 1.0], shape).astype(dtype)), {"margin": 0.3}


def _example_signs(rng, size, dtype):
    shape = _shape(size)
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    return (x, rng.choice([-1.0, 1.0], shape).astype(dtype)), {}


def _soft_labels(rng, arrays, dtype):  # an option set: targets other than +-1 are taken too
    return {"target": rng.uniform(-1.0, 1.0, np.shape(arrays[0])).astype(dtype)}


def _soft_ranking(rng, arrays, dtype):  # targets other than +-1
    return {"target": rng.uniform(-1.0, 1.0, np.shape(arrays[0])).astype(dtype)}


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


def _example_multilabel(rng, size, dtype, classes=8):
    shape = (max(size // classes, 1), classes)
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
        example_variants=({"classes": 100},),
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
    LossSpec(
        name="soft_margin_loss",
        family="binary",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"reduction": "mean"},
        prepare=_prepare_soft_margin,
        reference=_ref_soft_margin,
        example=_example_signs,
        option_sets=(_soft_labels,),
        doc="""Two-class logistic loss of targets ``y`` in {-1, 1}: ``log(1 + exp(-y x))``,
    computed as PyTorch does (``log1p(exp(-y x))``), so it overflows to inf where PyTorch's
    does (at ``-y x > 709.8``; for float32 input lossforge computes in float64 and stays
    finite up to there, where PyTorch's float32 gives inf from 88.7). Gradient
    ``-y exp(-y x) / (1 + exp(-y x))``; ``"mean"`` over the elements.

    Shape:
        input: any shape. target: the input's shape.
        Output: a scalar for "mean" and "sum"; the input's shape for "none".
""",
    ),
    LossSpec(
        name="hinge_embedding_loss",
        family="binary",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"margin": DEFAULT_HINGE_MARGIN, "reduction": "mean"},
        prepare=_prepare_hinge_embedding,
        reference=_ref_hinge_embedding,
        example=_example_signs,
        option_sets=({"margin": 0.5}, {"margin": -0.25}),
        doc="""Hinge embedding loss of distances ``x`` and targets ``y`` in {-1, 1}: ``x`` where
    ``y = 1``, ``max(0, margin - x)`` where ``y = -1``; as PyTorch, a target that is neither
    gets both terms. Gradient: 1 where ``y != -1``, minus 1 where ``y != 1`` and
    ``margin - x >= 0`` (PyTorch's clamp passes the gradient at equality).

    Shape:
        input: any shape. target: the input's shape.
        Output: a scalar for "mean" and "sum"; the input's shape for "none".
""",
    ),
    LossSpec(
        name="margin_ranking_loss",
        family="ranking",
        arguments=("input1", "input2", "target"),
        differentiable=("input1", "input2"),
        options={"margin": 0.0, "reduction": "mean"},
        prepare=_prepare_margin_ranking,
        reference=_ref_margin_ranking,
        example=_example_ranking,
        option_sets=({"margin": 0.0}, {"margin": -0.5}, _soft_ranking),
        doc="""Margin ranking loss: ``max(0, margin - target * (input1 - input2))``, target 1
    where ``input1`` should rank higher, -1 where ``input2`` should (other values are taken
    as they are, as PyTorch). Gradients for both inputs: ``-target`` and ``target`` where
    the clamp's argument is >= 0 (PyTorch's clamp passes the gradient at equality), else 0.

    Shape:
        input1, input2, target: one shape (lossforge does not broadcast them).
        Output: a scalar for "mean" and "sum"; the inputs' shape for "none".
""",
    ),
]


@hookimpl
def lossforge_losses():
    return SPECS


@hookimpl
def lossforge_kernels():
    yield from BCE.specs("binary_cross_entropy")
    yield from LOGITS.specs("binary_cross_entropy_with_logits")
    yield from LOGITS.specs("multilabel_soft_margin_loss", rows=True)
    yield from SOFT_MARGIN.specs("soft_margin_loss")
    yield from HINGE_EMBEDDING.specs("hinge_embedding_loss", (DEFAULT_HINGE_MARGIN,))
    yield from MARGIN_RANKING.specs("margin_ranking_loss", (0.0,))
