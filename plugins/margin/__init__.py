"""The margin family: ``multi_margin_loss`` and ``multilabel_margin_loss``, with PyTorch
2.13's semantics.

Shapes: input ``(C)`` or ``(N, C)`` (a 0-d input is one score of one class, as PyTorch
takes it). ``multi_margin_loss`` takes class indices ``()``/``(1)`` or ``(N)`` of any integer
dtype, ``multilabel_margin_loss`` integer class ids of the input's shape. Both are row
losses: ``"mean"`` divides by the number of rows ``N`` (not by summed class weights), and a
``"mean"`` of no rows is ``nan`` (PyTorch returns 0 or garbage there).

Targets are bounds-checked (``IndexError`` naming the bad value): class indices in
``[0, C)``; for ``multilabel_margin_loss`` every entry in ``[-1, C)``, the whole row checked
as PyTorch checks it, though only the ids before the row's first -1 count.
"""

from __future__ import annotations

import numpy as np

from lossforge import KernelSpec, LossSpec, Prepared, hookimpl, validate


def _rows(name, x, backend):
    """(input, its float dtype, rows, classes): the input checked, seen as ``(N, C)`` rows."""
    x = validate.as_array(x, backend)
    dtype = validate.float_dtype("input", x)
    if x.ndim > 2:
        raise ValueError(f"{name}: input must have shape (C) or (N, C), got {tuple(x.shape)}")
    shape = tuple(x.shape)
    classes = shape[-1] if shape else 1
    if classes == 0:
        raise ValueError(f"{name}: input must have at least one class, got {shape}")
    rows = shape[0] if len(shape) == 2 else 1
    return x, dtype, rows, classes


def _finish(x, dtype, rows, classes, target, weight, params, value_shape, options, backend):
    compute, result = validate.compute_dtype(dtype)
    z = validate.as_float("input", x, compute, backend).reshape(rows, classes)
    return Prepared(
        arrays=(z, target, weight if weight is not None else validate.no_weight(compute, backend)),
        params=params,
        reduction=options["reduction"],
        denominator=float(rows),
        value_shape=value_shape,
        grad_shapes=(tuple(x.shape),),
        dtype=compute,
        result_dtypes=(result, dtype),
        backend=backend,
    )


def _prepare_multi_margin(arrays, options, backend):
    p = options["p"]
    number = isinstance(p, (int, float, np.integer, np.floating))
    if isinstance(p, (bool, np.bool_)) or not number or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2 (only p == 1 and p == 2 supported), got {p!r}")
    margin = validate.check_real("margin", options["margin"])
    x, dtype, rows, classes = _rows("multi_margin_loss", arrays[0], backend)
    t = validate.as_index("target", validate.as_array(arrays[1], backend), backend)
    expected = ((rows,),) if x.ndim == 2 else ((), (1,))
    if tuple(t.shape) not in expected:
        raise ValueError(
            f"target of class indices must have shape {expected[0]} for input of shape "
            f"{tuple(x.shape)}, got target of shape {tuple(t.shape)}"
        )
    compute = validate.compute_dtype(dtype)[0]
    weight = options["weight"]
    if weight is not None:
        weight = validate.as_array(weight, backend)
        validate.float_dtype("weight", weight)
        validate.check_length("weight", weight, classes, "one per class")
        weight = validate.as_float("weight", weight, compute, backend)
    return _finish(
        x,
        dtype,
        rows,
        classes,
        t.reshape(rows),
        weight,
        {"p": int(p), "margin": margin},
        tuple(t.shape),  # (N); for one row () or (1), as PyTorch
        options,
        backend,
    )


def _prepare_multilabel_margin(arrays, options, backend):
    x, dtype, rows, classes = _rows("multilabel_margin_loss", arrays[0], backend)
    t = validate.as_index("target", validate.as_array(arrays[1], backend), backend)
    validate.check_same_shape(("input", "target"), (x, t))
    return _finish(
        x,
        dtype,
        rows,
        classes,
        t.reshape(rows, classes),
        None,
        {},
        (rows,) if x.ndim == 2 else (),
        options,
        backend,
    )


# float64 references for the conformance kit: per-row losses, by loops over PyTorch's sums
def _ref_multi_margin(input, target, p=1, margin=1.0, weight=None, **_):
    x = np.asarray(input, np.float64)
    rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    t = np.asarray(target).reshape(-1)
    classes = rows.shape[1]
    w = np.ones(classes) if weight is None else np.asarray(weight, np.float64)
    losses = []
    for z, k in zip(rows, t):
        terms = [max(0.0, margin - z[k] + z[j]) ** p for j in range(classes) if j != k]
        losses.append(w[k] * sum(terms) / classes)
    return np.array(losses).reshape(np.shape(target) if x.ndim < 2 else (len(rows),))


def _ref_multilabel_margin(input, target, **_):
    x = np.asarray(input, np.float64)
    rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    ts = np.asarray(target).reshape(rows.shape)
    classes = rows.shape[1]
    losses = []
    for z, t in zip(rows, ts):
        ids = []
        for k in t:
            if k == -1:
                break
            ids.append(int(k))
        others = [c for c in range(classes) if c not in ids]
        losses.append(sum(max(0.0, 1 - z[y] + z[c]) for y in ids for c in others) / classes)
    return np.array(losses).reshape(() if x.ndim < 2 else (len(rows),))


def _example_multi_margin(rng, size, dtype, classes=10):
    rows = max(size // classes, 1) if size else 0
    x = rng.standard_normal((rows, classes)).astype(dtype)
    t = rng.integers(0, classes, rows)
    return (x, t), {"weight": (rng.random(classes) + 0.5).astype(dtype), "margin": 0.5}


def _example_multilabel_margin(rng, size, dtype, classes=10):
    rows = max(size // classes, 1) if size else 0
    x = rng.standard_normal((rows, classes)).astype(dtype)
    t = np.full((rows, classes), -1, np.int64)
    for i in range(rows):  # 1 to 3 ids (a repeat now and then), then -1, then leftovers
        n = int(rng.integers(1, 4))
        t[i, :n] = rng.integers(0, classes, n)
        t[i, n + 1 :] = rng.integers(0, classes, classes - n - 1)
    return (x, t), {}


def _many_ids(rng, arrays, dtype):  # rows of half their classes as ids, or all of them
    rows, classes = np.shape(arrays[0])
    t = np.array([rng.permutation(classes) for _ in range(rows)], np.int64).reshape(rows, classes)
    t[::2, classes // 2] = -1
    return {"target": t}


def _squared(rng, arrays, dtype):
    return {"p": 2, "weight": None, "margin": 2.0}


SPECS = [
    LossSpec(
        name="multi_margin_loss",
        family="margin",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"p": 1, "margin": 1.0, "weight": None, "reduction": "mean"},
        prepare=_prepare_multi_margin,
        reference=_ref_multi_margin,
        example=_example_multi_margin,
        example_variants=({"classes": 10}, {"classes": 1000}),
        option_sets=({"weight": None, "margin": 1.0}, _squared),
        hessian_bound=True,
        doc="""Multi-class hinge loss of scores ``x`` with class-index target ``y``:
    ``loss = w_y / C * sum_{j != y} max(0, margin - x_y + x_j)^p``, ``p`` 1 or 2
    (``ValueError`` otherwise, as PyTorch), ``w`` the class weights (ones by default).
    ``"mean"`` divides by the number of rows ``N``, whatever the weights, as PyTorch does.

    Gradient, with ``v_j = margin - x_y + x_j``: ``w_y / C * d_j`` at ``j != y`` and minus
    their sum at ``y``, where ``d_j = [v_j > 0]`` (p=1) or ``2 max(0, v_j)`` (p=2); a hinge
    exactly at 0 contributes nothing, and a nan score makes its hinges inactive (the loss
    stays finite), both as PyTorch's ``v_j > 0`` test.

    ``grad_hess``: for p=2 the exact (piecewise) diagonal, ``2 w_y / C`` at each ``j != y``
    with an active hinge and ``2 w_y / C`` times their count at ``y``, 0 elsewhere. For p=1
    the true diagonal is 0 wherever it exists, which would make a Newton step infinite: it
    gives the same pattern with ``w_y / C`` (the curvature of ``v^2 / 2`` per active hinge),
    an upper bound as ``l1_loss``'s Hessian is.

    Shape:
        input: (C) or (N, C).
        target: class indices () or (1) for input (C), (N) for input (N, C), any integer
            dtype, in [0, C).
        weight: (C), one per class.
        Output: a scalar for "mean" and "sum"; for "none", (N), or the target's shape.
""",
    ),
    LossSpec(
        name="multilabel_margin_loss",
        family="margin",
        arguments=("input", "target"),
        differentiable=("input",),
        options={"reduction": "mean"},
        prepare=_prepare_multilabel_margin,
        reference=_ref_multilabel_margin,
        example=_example_multilabel_margin,
        example_variants=({"classes": 10}, {"classes": 1000}),
        option_sets=(_many_ids,),
        doc="""Multi-label hinge loss of scores ``x`` with target class ids ``y``:
    ``loss = sum_{j} sum_{c not in Y} max(0, 1 - x_{y_j} + x_c) / C``, over the row's ids
    ``y_j`` before its first -1 (later entries ignored; a repeated id counts each time, as
    in PyTorch) and the classes ``c`` not among them (``Y``). ``"mean"`` divides by ``N``.

    Gradient: each active pair ``(y_j, c)`` adds ``1 / C`` at ``c`` and ``-1 / C`` at
    ``y_j``; a hinge exactly at 0, or nan, is inactive, as PyTorch's ``> 0`` test. The loss
    is piecewise linear: it has no Hessian (``grad_hess`` raises ``NotImplementedError``).

    Shape:
        input: (C) or (N, C).
        target: the input's shape, integer class ids in [-1, C) (every entry is checked,
            as PyTorch does; an ``IndexError`` names a bad one).
        Output: a scalar for "mean" and "sum"; for "none", (N), or () for input (C).
""",
    ),
]


@hookimpl
def lossforge_losses():
    return SPECS


@hookimpl
def lossforge_kernels():
    cpu, cuda = "lossforge.plugins.margin.cpu", "lossforge.plugins.margin.cuda"
    yield KernelSpec(
        "multi_margin_loss",
        "cpu",
        f"{cpu}:multi_margin_loss",
        hessian=f"{cpu}:multi_margin_loss_hessian",
    )
    yield KernelSpec(
        "multi_margin_loss",
        "cuda",
        f"{cuda}:multi_margin_loss",
        hessian=f"{cuda}:multi_margin_loss_hessian",
    )
    # piecewise linear: no Hessian (a zero one would make Newton steps infinite)
    yield KernelSpec("multilabel_margin_loss", "cpu", f"{cpu}:multilabel_margin_loss")
    yield KernelSpec("multilabel_margin_loss", "cuda", f"{cuda}:multilabel_margin_loss")
