"""The multi-class family: ``cross_entropy`` and ``nll_loss``, with PyTorch 2.13's semantics,
and the softmax losses built from row formulas by ``lossforge.kernels.Softmax``
(``formulas.py``): ``softmax_focal_loss``, ``poly1_cross_entropy`` and
``softmax_cross_entropy`` (``cross_entropy`` with a z-loss and logit soft-capping). These take
``cross_entropy``'s arguments and options, with its semantics, plus their own.

Shapes: input ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (classes along dimension 1);
class-index targets ``()``, ``(N)`` or ``(N, d1, ..., dk)`` of any integer dtype (uint64
while its values fit int64: a larger one is a ``ValueError``, never a wrapped index); for
``cross_entropy`` also class-probability targets of the input's shape (float). The kernels
work on rows of classes: K-dimensional inputs are moved to ``(N * d1 * ... * dk, C)`` first
(one copy), and the gradient is moved back.

``"mean"`` divides by the summed class weights of the non-ignored targets (their count
without weights), for ``label_smoothing`` too, as PyTorch does; with probability targets it
divides by the number of rows ``N * d1 * ... * dk``, whatever the weights, and
``ignore_index`` does not apply. A "mean" with every target ignored is ``nan``, with a zero
gradient.
"""

from __future__ import annotations

import numpy as np
from lossforge.plugins.multiclass import formulas
from lossforge.plugins.multiclass.cpu import (
    CROSS_ENTROPY_PARALLEL_MIN,
    IGNORE_INDEX,
    check_targets,
)

from lossforge import KernelSpec, LossSpec, Prepared, hookimpl, validate
from lossforge.kernels import Softmax

_SHAPE = """
    Shape:
        input: (C), (N, C) or (N, C, d1, ..., dk), classes along dimension 1.
        target: class indices (), (N) or (N, d1, ..., dk), any integer dtype (uint64 values
            must fit int64), in [0, C) or equal to ignore_index{probs}.
        weight: (C), one per class.
        Output: a scalar for "mean" and "sum"; for "none", the target's (index) shape.
"""


def _prepare(name, arrays, options, backend, params=None, transform=False):
    """``params``: a softmax formula's parameters by name, validated; ``transform``: apply
    its per-logit transform."""
    ignore_index = validate.check_int("ignore_index", options["ignore_index"])
    smoothing = 0.0
    if name != "nll_loss":
        smoothing = validate.check_range("label_smoothing", options["label_smoothing"], 0.0, 1.0)
    shape, z, t, weight, moved, probabilities, input_dtype, dtype, result = _normalise(
        name, arrays, options, backend
    )
    classes = z.shape[1]
    if probabilities:
        denominator = float(z.shape[0])
    else:
        if backend == "cpu":
            check = check_targets
        else:
            from lossforge.plugins.multiclass.cuda import check_targets as check
        bad, denominator = check(t, classes, ignore_index, weight if weight.size else None)
        if bad != ignore_index:
            raise IndexError(
                f"target {bad} is out of bounds: class indices must be in [0, {classes}) "
                f"or equal to ignore_index={ignore_index}"
            )
    value_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    return Prepared(
        arrays=(z, t, weight),
        params={
            "moved": moved,
            "probabilities": probabilities,
            "ignore_index": ignore_index,
            "label_smoothing": smoothing,
            "transform": transform,
            **(params or {}),
        },
        reduction=options["reduction"],
        denominator=denominator,
        value_shape=value_shape,
        grad_shapes=(shape,),
        dtype=dtype,
        result_dtypes=(result, input_dtype),
        backend=backend,
    )


def _normalise(name, arrays, options, backend):
    """(input shape, rows of logits, targets, weight, moved shape or None, probability
    targets?, input dtype, compute dtype, result dtype): the arguments checked and converted
    to what the kernels take."""
    ready = validate.ready_rows(*arrays) if backend == "cpu" and options["weight"] is None else None
    if ready is not None:  # the common case, kept cheap: nothing to convert or move
        x, t = arrays
        return x.shape, x, t, validate.no_weight(ready, backend), None, False, ready, ready, ready
    x = validate.as_array(arrays[0], backend)
    t = validate.as_array(arrays[1], backend)
    dtypes = [validate.float_dtype("input", x)]
    if x.ndim == 0:
        raise ValueError("input must have shape (C), (N, C) or (N, C, d1, ..., dk), got ()")
    classes = x.shape[1] if x.ndim > 1 else x.shape[0]
    probabilities = name != "nll_loss" and np.dtype(t.dtype).kind == "f"
    if probabilities:
        dtypes.append(validate.float_dtype("target", t))
        validate.check_same_shape(("input", "target"), (x, t))
    else:
        index_shape = (x.shape[0], *x.shape[2:]) if x.ndim > 1 else ()
        t = validate.as_index("target", t, backend)
        if tuple(t.shape) != index_shape:
            raise ValueError(
                f"target of class indices must have shape {index_shape} for input of shape "
                f"{tuple(x.shape)} (the input's shape without the class dimension 1), got "
                f"target of shape {tuple(t.shape)}"
            )
    dtype, result = validate.compute_dtype(*dtypes)
    weight = options["weight"]
    if weight is None:
        weight = validate.no_weight(dtype, backend)
    else:
        weight = validate.as_array(weight, backend)
        validate.float_dtype("weight", weight)
        validate.check_length("weight", weight, classes, "one per class")
        weight = validate.as_float("weight", weight, dtype, backend)

    moved = None  # the shape of the moved rows when the input is K-dimensional
    if x.ndim == 1:  # contiguous first: a device array's reshape does not copy
        z = validate.as_float("input", x, dtype, backend).reshape(1, classes)
        if probabilities:
            t = validate.as_float("target", t, dtype, backend).reshape(1, classes)
        else:
            t = t.reshape(1)
    elif x.ndim == 2:
        z = x
    else:  # one copy: the class dimension moved last, made contiguous, seen as rows
        z = validate.moveaxis(x, 1, -1, backend)
        moved = tuple(z.shape)
        z = validate.as_float("input", z, dtype, backend).reshape(-1, classes)
        if probabilities:
            t = validate.moveaxis(t, 1, -1, backend)
            t = validate.as_float("target", t, dtype, backend).reshape(-1, classes)
        else:
            t = t.reshape(-1)
    z = validate.as_float("input", z, dtype, backend)
    if probabilities:
        t = validate.as_float("target", t, dtype, backend)
    return tuple(x.shape), z, t, weight, moved, probabilities, dtypes[0], dtype, result


def _prepare_cross_entropy(arrays, options, backend):
    return _prepare("cross_entropy", arrays, options, backend)


def _prepare_nll(arrays, options, backend):
    return _prepare("nll_loss", arrays, options, backend)


# float64 references for the conformance kit: per-element (per-row) losses.
def _log_softmax(x):
    x = np.asarray(x, np.float64)
    axis = 1 if x.ndim > 1 else 0
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _ref_nll(input, target, weight=None, ignore_index=-100, **_):
    x = np.asarray(input, np.float64)
    axis = 1 if x.ndim > 1 else 0
    classes = x.shape[axis]
    w = np.ones(classes) if weight is None else np.asarray(weight, np.float64)
    t = np.asarray(target)
    keep = t != ignore_index
    safe = np.where(keep, t, 0)
    picked = np.take_along_axis(x, np.expand_dims(safe, axis), axis).squeeze(axis)
    return np.where(keep, -w[safe] * picked, 0.0)


def _ref_cross_entropy(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, **_):
    logp = _log_softmax(input)
    axis = 1 if logp.ndim > 1 else 0
    classes = logp.shape[axis]
    w = np.ones(classes) if weight is None else np.asarray(weight, np.float64)
    shape = [1] * logp.ndim
    shape[axis] = classes
    wb = w.reshape(shape)
    t = np.asarray(target)
    if t.dtype.kind == "f":
        y = t * (1 - label_smoothing) + label_smoothing / classes
        return -(logp * y * wb).sum(axis)
    smooth = -(logp * wb).sum(axis)
    smooth = np.where(t != ignore_index, smooth, 0.0)
    return (1 - label_smoothing) * _ref_nll(logp, t, weight, ignore_index) + (
        label_smoothing / classes
    ) * smooth


def _example(rng, size, dtype, classes=10):
    rows = max(size // classes, 1) if size else 0
    x = (rng.standard_normal((rows, classes)) * 2).astype(dtype)
    t = rng.integers(0, classes, rows)
    t[1::7] = -100  # ignored rows, but never the first (one row: counted)
    return (x, t), {"weight": (rng.random(classes) + 0.5).astype(dtype)}


def _example_cross_entropy(rng, size, dtype, classes=10):
    arrays, options = _example(rng, size, dtype, classes)
    return arrays, dict(options, label_smoothing=0.1)


# option sets for the conformance kit
def _ignore_class(rng, arrays, dtype):  # the example's ignored targets, ignored as class 3
    return {"target": np.where(arrays[1] == IGNORE_INDEX, 3, arrays[1]), "ignore_index": 3}


def _probabilities(rng, arrays, dtype):
    p = rng.random(np.shape(arrays[0]))
    return {"target": (p / p.sum(axis=1, keepdims=True)).astype(dtype)}


def _many_classes(rng, arrays, dtype):  # the example's rows, of more than FEW_CLASSES (cpu.py)
    (x, t), options = _example(rng, 40 * len(arrays[0]), dtype, classes=40)
    return dict(options, input=x, target=t)


# -- softmax losses from row formulas ------------------------------------------------------
CROSS_ENTROPY = Softmax(
    formulas.cross_entropy,
    row_hessian=formulas.cross_entropy_hessian,
    parallel_min=CROSS_ENTROPY_PARALLEL_MIN,
    constant_coefficients=True,
)
#: one kernel for the three losses: see formulas.py
SOFTMAX = Softmax(
    formulas.softmax_losses,
    transform=formulas.softcap,
    row_hessian=formulas.softmax_losses_hessian,
    transform_hessian=formulas.softcap_hessian,
    params=("gamma", "epsilon", "z_loss", "softcap"),
)
_NEUTRAL = {"gamma": 0.0, "epsilon": 0.0, "z_loss": 0.0, "softcap": 0.0}


def _prepare_softmax_cross_entropy(arrays, options, backend):
    z_loss = validate.check_nonnegative("z_loss", options["z_loss"])
    cap = options["softcap"]
    if cap is not None:
        cap = validate.check_real("softcap", cap)
        if not cap > 0:
            raise ValueError(f"softcap must be None or a positive number, got {cap!r}")
    params = {**_NEUTRAL, "z_loss": z_loss, "softcap": 0.0 if cap is None else cap}
    return _prepare("softmax_cross_entropy", arrays, options, backend, params, cap is not None)


def _prepare_focal(arrays, options, backend):
    params = {**_NEUTRAL, "gamma": validate.check_nonnegative("gamma", options["gamma"])}
    return _prepare("softmax_focal_loss", arrays, options, backend, params)


def _prepare_poly1(arrays, options, backend):
    epsilon = validate.check_real("epsilon", options["epsilon"])
    if not epsilon >= -1:
        raise ValueError(f"epsilon must be a number >= -1, got {epsilon!r}")
    params = {**_NEUTRAL, "epsilon": epsilon}
    return _prepare("poly1_cross_entropy", arrays, options, backend, params)


def _ref_softmax(input, target, per_class, weight, ignore_index, label_smoothing, logits=None):
    """``sum_c q_c w_c per_class(logp_c, lse)`` per row, ``q`` the (smoothed) target
    distribution: the template's definition, in float64 NumPy."""
    z = np.asarray(input, np.float64) if logits is None else logits
    axis = 1 if z.ndim > 1 else 0
    classes = z.shape[axis]
    m = np.max(z, axis=axis, keepdims=True)
    lse = m + np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True))
    shape = [1] * z.ndim
    shape[axis] = classes
    w = np.ones(classes) if weight is None else np.asarray(weight, np.float64)
    t = np.asarray(target)
    if t.dtype.kind == "f":
        q = t.astype(np.float64)
        keep = np.ones(np.delete(z.shape, axis), bool)
    else:
        keep = t != ignore_index
        q = np.moveaxis(np.eye(classes)[np.where(keep, t, 0)], -1, axis)
    q = (1 - label_smoothing) * q + label_smoothing / classes
    losses = (q * w.reshape(shape) * per_class(z - lse, lse)).sum(axis)
    return np.where(keep, losses, 0.0)


def _ref_softmax_cross_entropy(
    input,
    target,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    **_,
):
    z = np.asarray(input, np.float64)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    return _ref_softmax(
        z, target, lambda lp, lse: -lp + z_loss * lse**2, weight, ignore_index, label_smoothing
    )


def _ref_focal(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, gamma=2.0, **_):
    def per_class(lp, lse):
        return -((1 - np.exp(lp)) ** gamma) * lp

    return _ref_softmax(input, target, per_class, weight, ignore_index, label_smoothing)


def _ref_poly1(
    input, target, weight=None, ignore_index=-100, label_smoothing=0.0, epsilon=1.0, **_
):
    def per_class(lp, lse):
        return -lp + epsilon * (1 - np.exp(lp))

    return _ref_softmax(input, target, per_class, weight, ignore_index, label_smoothing)


_SOFTMAX_OPTIONS = {
    "weight": None,
    "ignore_index": IGNORE_INDEX,
    "reduction": "mean",
    "label_smoothing": 0.0,
}
_SOFTMAX_SETS = ({"weight": None, "label_smoothing": 0.0}, _ignore_class, _probabilities)
_SOFTMAX_DOC = """
    A row's loss is ``sum_c q_c w_c l(log p_c)`` over its target distribution ``q``: one-hot
    for a class index (0 for ``ignore_index``), the probabilities for a float target, each
    smoothed to ``(1 - label_smoothing) q + label_smoothing / C``; ``w`` the class weights.
    ``"mean"`` divides by the summed weights of the counted targets (by the row count for
    probability targets), as ``cross_entropy`` does. ``grad_hess``: the exact Hessian
    diagonal, derived from the row formula (docs/softmax.md), scaled like the gradient (0
    for an ignored target).
"""

SPECS = [
    LossSpec(
        name="cross_entropy",
        family="multiclass",
        arguments=("input", "target"),
        differentiable=("input",),
        options={
            "weight": None,
            "ignore_index": IGNORE_INDEX,
            "reduction": "mean",
            "label_smoothing": 0.0,
        },
        prepare=_prepare_cross_entropy,
        reference=_ref_cross_entropy,
        example=_example_cross_entropy,
        # a kernel for few classes, one for rows up to 256, one for longer rows; a vocabulary
        example_variants=({"classes": 10}, {"classes": 100}, {"classes": 1000}, {"classes": 32000}),
        option_sets=(
            {"weight": None, "label_smoothing": 0.0},
            _ignore_class,
            _probabilities,
            _many_classes,
        ),
        doc="""Cross entropy of logits: ``log_softmax`` then the negative log-likelihood.

    For a class-index target ``t`` with smoothing ``e`` and class weights ``w``:
    ``loss = (1 - e) w_t (lse - z_t) + (e / C) sum_c w_c (lse - z_c)``, with
    ``lse = log sum_c exp(z_c)`` computed stably (finite for logits of +-1e4).
    For probability targets ``y``: ``loss = -sum_c w_c y'_c log_softmax(z)_c`` with
    ``y' = (1 - e) y + e / C``. Gradient: ``A softmax(z) - a`` where ``a`` are the
    coefficients of ``-log_softmax(z)_c`` above and ``A = sum_c a_c``.

    ``grad_hess``: the Hessian's diagonal, ``A p_c (1 - p_c)`` with ``p = softmax(z)``,
    scaled like the gradient (0 for an ignored target). This is the exact diagonal, what
    scikit-learn's ``HalfMultinomialLoss`` gives; the boosting libraries scale it
    (XGBoost by 2, LightGBM by ``C / (C - 1)``): ``lossforge.boosting`` does that for them.
"""
        + _SHAPE.format(probs="; or probabilities of the input's shape (float)"),
    ),
    LossSpec(
        name="nll_loss",
        family="multiclass",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"weight": None, "ignore_index": IGNORE_INDEX, "reduction": "mean"},
        prepare=_prepare_nll,
        reference=_ref_nll,
        example=_example,
        example_variants=({"classes": 100},),
        option_sets=({"weight": None}, _ignore_class),
        doc="""Negative log-likelihood of log-probabilities: ``loss = -w_t input[t]``,
    0 where ``target == ignore_index``. Gradient: ``-w_t`` at the target class, 0 elsewhere.
"""
        + _SHAPE.format(probs=""),
    ),
    LossSpec(
        name="softmax_cross_entropy",
        family="multiclass",
        arguments=("input", "target"),
        differentiable=("input",),
        options={**_SOFTMAX_OPTIONS, "z_loss": 0.0, "softcap": None},
        prepare=_prepare_softmax_cross_entropy,
        reference=_ref_softmax_cross_entropy,
        example=lambda rng, size, dtype, classes=100: _example_cross_entropy(
            rng, size, dtype, classes
        ),
        example_variants=({"classes": 100}, {"classes": 1000}, {"classes": 32000}),
        option_sets=(
            *_SOFTMAX_SETS,
            {"z_loss": 1e-2, "softcap": 5.0},
            {"z_loss": 1e-4, "weight": None, "label_smoothing": 0.0},
        ),
        doc="""``cross_entropy`` with the two extras of large language model training:
    PaLM's z-loss and Gemma 2's logit soft-capping.

    ``loss = cross_entropy(z') + z_loss lse(z')^2`` (weighted as the cross entropy is), with
    ``z' = softcap tanh(z / softcap)`` where ``softcap`` is given, else ``z' = z``, and
    ``lse(z') = log sum_j exp(z'_j)``. Gradient with respect to ``z``:
    ``(A p_j - q_j w_j) (1 - (z'_j / softcap)^2)`` with ``p = softmax(z')`` and
    ``A = sum_c q_c w_c (1 + 2 z_loss lse)``. With both options at their defaults this is
    ``cross_entropy`` (a separate loss so that ``cross_entropy``'s signature stays
    PyTorch's; its kernel is generated from a row formula). Typical values: ``z_loss=1e-4``
    (PaLM), ``softcap=30.0`` (Gemma 2's final logits).
"""
        + _SOFTMAX_DOC
        + _SHAPE.format(probs="; or probabilities of the input's shape (float)"),
    ),
    LossSpec(
        name="softmax_focal_loss",
        family="multiclass",
        arguments=("input", "target"),
        differentiable=("input",),
        options={**_SOFTMAX_OPTIONS, "gamma": 2.0},
        prepare=_prepare_focal,
        reference=_ref_focal,
        example=lambda rng, size, dtype, classes=100: _example_cross_entropy(
            rng, size, dtype, classes
        ),
        example_variants=({"classes": 100},),
        option_sets=(*_SOFTMAX_SETS, {"gamma": 0.5}, {"gamma": 0.0, "weight": None}),
        doc="""Softmax focal loss (Lin et al. 2017, the multi-class form of torchvision's
    ``sigmoid_focal_loss``): ``loss = -w_t (1 - p_t)^gamma log p_t``, ``p = softmax(z)``;
    ``gamma = 0`` is ``cross_entropy``. The focal papers' ``alpha_t`` is the class
    ``weight``; note that ``"mean"`` divides by the summed weights of the counted targets
    (as ``cross_entropy``), so a uniform weight does not scale it: kornia's ``focal_loss``
    with a scalar ``alpha`` is ``alpha *`` this loss with ``weight=None``. Gradient:
    ``w_t K ([j == t] - p_j)`` with ``q = 1 - p_t``,
    ``K = gamma p_t log(p_t) q^(gamma - 1) - q^gamma``. ``gamma`` >= 0.
"""
        + _SOFTMAX_DOC
        + _SHAPE.format(probs="; or probabilities of the input's shape (float)"),
    ),
    LossSpec(
        name="poly1_cross_entropy",
        family="multiclass",
        arguments=("input", "target"),
        differentiable=("input",),
        options={**_SOFTMAX_OPTIONS, "epsilon": 1.0},
        prepare=_prepare_poly1,
        reference=_ref_poly1,
        example=lambda rng, size, dtype, classes=100: _example_cross_entropy(
            rng, size, dtype, classes
        ),
        example_variants=({"classes": 100},),
        option_sets=(*_SOFTMAX_SETS, {"epsilon": -1.0}, {"epsilon": 2.0, "weight": None}),
        doc="""Poly-1 cross entropy (Leng et al. 2022, "PolyLoss"):
    ``loss = w_t (-log p_t + epsilon (1 - p_t))``, ``p = softmax(z)``; for a target
    distribution ``q`` (probabilities, or label smoothing) and no weights this is the
    paper's ``CE + epsilon (1 - sum_c q_c p_c)``. Gradient: ``w_t (1 + epsilon p_t)
    (p_j - [j == t])``. ``epsilon`` >= -1 (the paper's range); ``epsilon = 0`` is
    ``cross_entropy``.
"""
        + _SOFTMAX_DOC
        + _SHAPE.format(probs="; or probabilities of the input's shape (float)"),
    ),
]


@hookimpl
def lossforge_losses():
    return SPECS


@hookimpl
def lossforge_kernels():
    cpu, cuda = "lossforge.plugins.multiclass.cpu", "lossforge.plugins.multiclass.cuda"
    yield from CROSS_ENTROPY.specs("cross_entropy", defaults={})
    # nll_loss is linear in its input: no Hessian (a zero one would make Newton steps infinite)
    yield KernelSpec("nll_loss", "cpu", f"{cpu}:nll_loss", fast=f"{cpu}:fast_nll_loss")
    yield KernelSpec("nll_loss", "cuda", f"{cuda}:nll_loss")
    for spec in SPECS[2:]:  # the fast lane's parameters: the defaults (softcap None: off)
        defaults = {k: spec.options.get(k) or 0.0 for k in _NEUTRAL}
        yield from SOFTMAX.specs(spec.name, defaults=defaults)
