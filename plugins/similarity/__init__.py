"""The similarity family: ``cosine_similarity`` and ``cosine_embedding_loss``, with
PyTorch 2.13's semantics; gradients for both inputs.

``cosine_similarity`` broadcasts ``x1`` and ``x2`` as PyTorch does (one query row against
many: ``(1, D)`` or ``(D)`` against ``(N, D)``); the broadcast input is materialised (one
copy) and its gradient is summed over the broadcast dimensions back to its own shape, as
autograd does (on CUDA that sum is taken on the host, one round trip; inputs of one shape
need none). ``cosine_embedding_loss`` requires inputs of one shape. The kernels work on rows
along the reduced dimension, made by ``lossforge.kernels.Rowwise`` from the row formulas
below: for ``cosine_similarity`` with ``dim`` not the last dimension, the inputs are moved to
rows first (one copy) and the gradients moved back.

``triplet_margin_loss`` and ``triplet_margin_with_distance_loss`` (``triplet.py``,
``triplet_cuda.py``) and the soft overlap losses ``dice_loss`` and ``tversky_loss``
(``overlap.py``, ``overlap_cuda.py``) have hand-written kernels: three arrays and up to three
distances a row, and sums over whole samples or a whole batch, are not what ``Rowwise`` takes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from lossforge.plugins.similarity import overlap, triplet

from lossforge import KernelSpec, LossSpec, Prepared, dispatch, hookimpl, validate
from lossforge.kernels import Rowwise

#: The default ``eps`` of cosine_similarity and ``margin`` of cosine_embedding_loss.
DEFAULT_EPS, DEFAULT_MARGIN = 1e-8, 0.0

#: PyTorch's cosine_embedding_loss adds this to each squared norm: 1e-12 held in a C++ float.
EMBEDDING_EPSILON = float(np.float32(1e-12))


# The row formulas (float64): the sums of x y, x x and y y along a row pair, the row's value
# and its gradient coefficients, then each element's two gradients.


def dot_and_norms(x, y):
    return x * y, x * x, y * y


def cosine(sums, t, p):
    """PyTorch's ``sum(x1 / max(|x1|, eps) * x2 / max(|x2|, eps))``; in the gradient the
    norms' own derivative is that of the unclamped norm (0 at a zero vector), as autograd
    gives it there."""
    dot, aa, bb = sums
    (eps,) = p
    n1 = math.sqrt(aa)
    n2 = math.sqrt(bb)
    c1 = max(n1, eps)
    c2 = max(n2, eps)
    cos = dot / (c1 * c2)
    r1 = cos / (c1 * n1) if n1 > 0 else 0.0
    r2 = cos / (c2 * n2) if n2 > 0 else 0.0
    return cos, 1.0 / (c1 * c2), r1, r2


def embedding(sums, t, p):
    """``1 - cos`` for target 1, ``max(cos - margin, 0)`` for -1, 0 for any other target."""
    dot, aa, bb = sums
    (margin,) = p
    m1 = aa + EMBEDDING_EPSILON
    m2 = bb + EMBEDDING_EPSILON
    denominator = math.sqrt(m1 * m2)
    cos = dot / denominator
    loss = 0.0
    sign = 0.0  # d loss / d cos
    if t == 1:
        loss = 1.0 - cos
        sign = -1.0
    elif t == -1:
        loss = max(cos - margin, 0.0)
        sign = 1.0 if cos - margin >= 0 else 0.0  # PyTorch's clamp_min gradient
    return loss, sign / denominator, sign * cos / m1, sign * cos / m2


def pair_grads(x, y, inv, r1, r2):
    """d/dx1 = x2 inv - x1 r1, d/dx2 = x1 inv - x2 r2."""
    return y * inv - x * r1, x * inv - y * r2


COSINE = Rowwise(dot_and_norms, cosine, pair_grads, params=("eps",))
EMBEDDING = Rowwise(dot_and_norms, embedding, pair_grads, params=("margin",))


def _cosine_similarity(kernel):
    """The KernelSpec function of cosine_similarity on one backend: rows moved from ``dim``
    (``p.params["moved"]``, the moved shape, else None) get gradients moved back, and the
    gradient of an input broadcast to ``p.params["broadcast"]`` (else None) is summed back to
    the input's shape."""

    def run(p, loss_out, grads, grad_output, scale):
        moved, dim, full = p.params["moved"], p.params["dim"], p.params["broadcast"]
        if not grads or (moved is None and full is None):
            return kernel(p, loss_out, grads, grad_output, scale)
        rows = tuple(dispatch.empty(p.arrays[0].shape, p.dtype, p.backend) for _ in grads)
        total = kernel(p, loss_out, rows, grad_output, scale)
        for final, rows_grad in zip(grads, rows):
            if moved is not None:
                grad = validate.moveaxis(rows_grad.reshape(moved), -1, dim, p.backend)
            else:
                grad = rows_grad.reshape(full)
            if full is not None and tuple(final.shape) != full:
                dispatch.sum_into(final, grad, p.backend)
            else:
                dispatch.copy_into(final, grad, p.backend)
        return total

    return run


def _broadcast_pair(arrays, backend):
    """``validate.elementwise`` for two inputs that broadcast together: (the inputs
    materialised to the common shape, compute dtype, dtypes, common shape, the broadcast
    shape or None when both already have it)."""
    if backend == "cpu" and validate.ready_arrays(arrays) is not None:  # kept cheap
        (x1, x2), _, dtype, dtypes, shape = validate.elementwise(
            arrays, ("x1", "x2"), None, backend
        )
        return x1, x2, dtype, dtypes, shape, None
    raw = [validate.as_array(a, backend) for a in arrays]
    shapes = [tuple(a.shape) for a in raw]
    if shapes[0] == shapes[1]:
        (x1, x2), _, dtype, dtypes, shape = validate.elementwise(raw, ("x1", "x2"), None, backend)
        return x1, x2, dtype, dtypes, shape, None
    input_dtypes = [validate.float_dtype(n, a) for n, a in zip(("x1", "x2"), raw)]
    try:
        shape = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(
            f"x1 of shape {shapes[0]} and x2 of shape {shapes[1]} do not broadcast together"
        ) from None
    dtype, result = validate.compute_dtype(*input_dtypes)
    x1, x2 = (
        validate.as_float(n, validate.broadcast_to(a, shape, backend), dtype, backend)
        for n, a in zip(("x1", "x2"), raw)
    )
    return x1, x2, dtype, (result, *input_dtypes), shape, shape


def _prepare_cosine_similarity(arrays, options, backend):
    x1, x2, dtype, dtypes, shape, full = _broadcast_pair(arrays, backend)
    grad_shapes = (tuple(np.shape(arrays[0])), tuple(np.shape(arrays[1])))
    grad_shapes = (shape, shape) if full is None else grad_shapes
    dim = validate.check_int("dim", options["dim"])
    eps = validate.check_nonnegative("eps", options["eps"])
    ndim = len(shape)
    if ndim == 0 and dim in (-1, 0):  # PyTorch treats a 0-d input as one element along dim
        return Prepared(
            arrays=(x1.reshape(1, 1), x2.reshape(1, 1), None),
            params={"eps": eps, "moved": None, "dim": 0, "broadcast": None},
            reduction=None,
            denominator=1.0,
            value_shape=(),
            grad_shapes=(shape, shape),
            dtype=dtype,
            result_dtypes=dtypes,
            backend=backend,
        )
    if not -ndim <= dim < max(ndim, 1):
        raise IndexError(
            f"dim {dim} is out of range for inputs of {ndim} dimensions "
            f"(expected in [{-ndim}, {ndim - 1}])"
        )
    dim %= ndim
    size = shape[dim]
    moved = None
    if dim == ndim - 1:
        x1, x2 = x1.reshape(-1, size), x2.reshape(-1, size)
    else:  # one copy each: dim moved last, made contiguous, seen as rows
        x1 = validate.moveaxis(x1, dim, -1, backend)
        x2 = validate.moveaxis(x2, dim, -1, backend)
        moved = tuple(x1.shape)
        x1 = validate.as_float("x1", x1, dtype, backend).reshape(-1, size)
        x2 = validate.as_float("x2", x2, dtype, backend).reshape(-1, size)
    return Prepared(
        arrays=(x1, x2, None),
        params={"eps": eps, "moved": moved, "dim": dim, "broadcast": full},
        reduction=None,
        denominator=1.0,
        value_shape=shape[:dim] + shape[dim + 1 :],
        grad_shapes=grad_shapes,
        dtype=dtype,
        result_dtypes=dtypes,
        backend=backend,
    )


def _prepare_cosine_embedding(arrays, options, backend):
    (x1, x2), _, dtype, dtypes, shape = validate.elementwise(
        arrays[:2], ("input1", "input2"), None, backend
    )
    t = validate.as_array(arrays[2], backend)
    if np.dtype(t.dtype).kind not in "iuf":
        raise TypeError(f"target must hold 1 or -1 (integer or float), got dtype {t.dtype}")
    if len(shape) not in (1, 2) or tuple(t.shape) != shape[:-1]:
        raise ValueError(
            "cosine_embedding_loss expects inputs (N, D) with target (N), or inputs (D) with "
            f"target (); got inputs of shape {shape} and target of shape {tuple(t.shape)}"
        )
    margin = validate.check_real("margin", options["margin"])
    rows = shape[0] if len(shape) == 2 else 1
    return Prepared(
        arrays=(
            x1.reshape(rows, shape[-1]),
            x2.reshape(rows, shape[-1]),
            validate.as_float("target", t, np.dtype(np.float64), backend).reshape(-1),
        ),
        params={"margin": margin},
        reduction=options["reduction"],
        denominator=float(rows),
        value_shape=shape[:-1],
        grad_shapes=(shape, shape),
        dtype=dtype,
        result_dtypes=dtypes,
        backend=backend,
    )


# float64 references for the conformance kit.
def _ref_cosine_similarity(x1, x2, dim=1, eps=1e-8, **_):
    a, b = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    n1 = np.maximum(np.linalg.norm(a, axis=dim, keepdims=True), eps)
    n2 = np.maximum(np.linalg.norm(b, axis=dim, keepdims=True), eps)
    return ((a / n1) * (b / n2)).sum(axis=dim)


def _ref_cosine_embedding(input1, input2, target, margin=0.0, **_):
    a, b = np.asarray(input1, np.float64), np.asarray(input2, np.float64)
    eps = float(np.float32(1e-12))  # PyTorch's constant is a C++ float
    cos = (a * b).sum(-1) / np.sqrt(((a * a).sum(-1) + eps) * ((b * b).sum(-1) + eps))
    t = np.asarray(target)
    return np.where(t == 1, 1 - cos, np.where(t == -1, np.maximum(cos - margin, 0), 0.0))


def _pair(rng, size, dtype, features=8):
    shape = (max(size // features, 1), features)
    return (
        rng.standard_normal(shape).astype(dtype),
        rng.standard_normal(shape).astype(dtype),
    )


def _example_similarity(rng, size, dtype, features=8):
    x1, x2 = _pair(rng, size, dtype, features)
    return (x1, x2), {"dim": -1}


def _example_embedding(rng, size, dtype, features=8):
    x1, x2 = _pair(rng, size, dtype, features)
    return (x1, x2, rng.choice([-1.0, 1.0], x1.shape[:-1]).astype(dtype)), {"margin": 0.1}


def _zero_rows(rng, arrays, dtype):
    """An option set for the conformance kit: ``eps`` clamping the norm of zero rows. Not of
    rows of small norm: PyTorch's gradient, and so lossforge's, ignores the clamp there, and
    differs from the derivative of the value that the kit compares it with."""
    x1 = np.array(arrays[0], copy=True)
    x1[::3] = 0
    return {"eps": 0.5, "x1": x1}


SPECS = [
    LossSpec(
        name="cosine_similarity",
        family="similarity",
        arguments=("x1", "x2"),
        differentiable=("x1", "x2"),
        options={"dim": 1, "eps": DEFAULT_EPS},
        prepare=_prepare_cosine_similarity,
        reference=_ref_cosine_similarity,
        example=_example_similarity,
        example_variants=({"features": 128},),
        option_sets=(_zero_rows, {"dim": 0}),
        doc="""Cosine similarity along ``dim`` (a similarity: not reduced, no ``reduction``):
    ``sum(x1 / max(|x1|, eps) * x2 / max(|x2|, eps))``, as PyTorch computes it.
    ``grad`` returns ``(d/dx1, d/dx2)``; ``grad_output`` has the value's shape.

    Shape:
        x1, x2: shapes that broadcast together (PyTorch's rules), any number of
            dimensions; ``dim`` in [-ndim, ndim) of the broadcast shape.
        Output: the broadcast shape without ``dim``. Gradients: each input's own shape.
""",
    ),
    LossSpec(
        name="cosine_embedding_loss",
        family="similarity",
        arguments=("input1", "input2", "target"),
        differentiable=("input1", "input2"),
        options={"margin": DEFAULT_MARGIN, "reduction": "mean"},
        prepare=_prepare_cosine_embedding,
        reference=_ref_cosine_embedding,
        example=_example_embedding,
        example_variants=({"features": 128},),
        option_sets=({"margin": 0.5}, {"margin": -0.5}),
        doc="""Cosine embedding loss: ``1 - cos`` where ``target == 1`` and
    ``max(0, cos - margin)`` where ``target == -1`` (other targets give 0, as in PyTorch),
    with ``cos = x1.x2 / sqrt((|x1|^2 + e)(|x2|^2 + e))``, ``e`` PyTorch's 1e-12 held in a float32.
    ``grad`` returns ``(d/dinput1, d/dinput2)``.

    Shape:
        input1, input2: (N, D) or (D). target: (N) or ().
        Output: a scalar for "mean" and "sum"; (N) or () for "none".
""",
    ),
    LossSpec(
        name="triplet_margin_loss",
        family="similarity",
        arguments=triplet.NAMES,
        differentiable=triplet.NAMES,
        options={
            "margin": triplet.DEFAULT_MARGIN,
            "p": triplet.DEFAULT_P,
            "eps": triplet.DEFAULT_EPS,
            "swap": False,
            "reduction": "mean",
        },
        prepare=triplet.prepare,
        reference=triplet.reference,
        example=triplet.example,
        example_variants=({"features": 128},),
        option_sets=(
            {"swap": True, "margin": 2.0},
            {"p": 1.0},
            {"p": 3.0, "eps": 0.0},
            {"p": math.inf, "swap": True},
            {"p": -1.0, "margin": 0.2},
        ),
        doc="""Triplet margin loss, as PyTorch 2.13 computes it: per row
    ``max(margin + d(anchor, positive) - d_neg, 0)`` with ``d(x, y) = ||x - y + eps||_p``
    (pairwise_distance) and ``d_neg = d(anchor, negative)``, or with ``swap``
    ``min(d(anchor, negative), d(positive, negative))``; ``margin`` > 0 (PyTorch's check).
    ``p`` is any ``p`` PyTorch takes: ``||v||_p = (sum |v_k|^p)^(1/p)`` for ``p > 0`` and
    ``p < 0`` (a zero element makes that norm 0), the count of nonzero elements for ``p = 0``,
    ``max |v_k|`` for ``p = inf``, ``min |v_k|`` for ``p = -inf``.
    ``grad`` returns ``(d/danchor, d/dpositive, d/dnegative)``: autograd's, with ``clamp_min``
    passing the gradient where its argument is >= 0, tied ``swap`` distances sharing it
    half and half, and the norm's derivative as torch's ``norm_backward`` takes it: 0 where an
    element is 0 (or the norm, for p >= 1), none for ``p = 0``, and for ``p = +-inf`` shared
    evenly among the elements at the max (min).
    No Hessian diagonal (``grad_hess`` raises): the loss couples the three inputs through
    norms, and its diagonal alone is no useful Newton step.

    Shape:
        anchor, positive, negative: (N, D) or (D) (or (..., D): distances along the last
            dimension, as PyTorch computes them), of one number of dimensions, broadcast
            together as PyTorch broadcasts them (one anchor (1, D) against (N, D) rows).
            Shapes that do not broadcast, unequal numbers of dimensions, and an empty last
            dimension for ``p < 0`` or ``+-inf`` are a ``ValueError`` (PyTorch's
            ``RuntimeError``).
        Output: a scalar for "mean" and "sum"; the broadcast shape without its last
            dimension for "none". Gradients: each input's own shape (summed over the
            dimensions it was broadcast along, as autograd sums them).
""",
    ),
    LossSpec(
        name="triplet_margin_with_distance_loss",
        family="similarity",
        arguments=triplet.NAMES,
        differentiable=triplet.NAMES,
        options={
            "distance_function": None,
            "margin": triplet.DEFAULT_MARGIN,
            "swap": False,
            "reduction": "mean",
        },
        prepare=triplet.prepare_with_distance,
        reference=triplet.reference,
        example=triplet.example,
        example_variants=({"features": 128},),
        option_sets=({"swap": True, "margin": 0.25},),
        doc="""Triplet margin loss with a distance function, for the distances a kernel can
    compute: ``distance_function=None`` (the default) or ``torch.pairwise_distance`` is
    ``triplet_margin_loss(p=2, eps=1e-6)``; a ``torch.nn.PairwiseDistance(p, eps)`` module
    (``keepdim=False``, any ``p``) is ``triplet_margin_loss(p=p, eps=eps)``. Any other
    callable raises ``TypeError``: Python code cannot run inside a compiled kernel
    (``triplet_margin_loss`` takes any p-norm). ``margin`` must be > 0, as PyTorch requires
    (``ValueError``).
    ``grad`` returns ``(d/danchor, d/dpositive, d/dnegative)``.

    Shape:
        anchor, positive, negative: (N, D) or (D) (or (..., D)), broadcast together as
            for ``triplet_margin_loss``.
        Output: as for ``triplet_margin_loss``; gradients in each input's own shape.
""",
    ),
    LossSpec(
        name="dice_loss",
        family="similarity",
        arguments=("input", "target"),
        differentiable=("input",),
        options={
            "smooth": overlap.DEFAULT_SMOOTH,
            "sigmoid": False,
            "batch": False,
            "reduction": "mean",
        },
        prepare=overlap.prepare,
        reference=overlap.reference_dice,
        example=overlap.example,
        option_sets=(overlap.logits, {"batch": True, "smooth": 1.0}),
        doc="""Soft Dice loss (no PyTorch function; MONAI's ``DiceLoss`` convention):
    ``1 - (2 sum(q t) + smooth) / (sum(q) + sum(t) + smooth)`` with ``q = input`` (probabilities)
    or ``q = sigmoid(input)`` with ``sigmoid=True`` (logits), the sums over each sample's
    elements (every dimension but the first), or over the whole batch with ``batch=True``.
    ``smooth`` (>= 0) keeps an empty sample and target at 0 loss instead of 0 / 0. Input
    values are not range-checked. The gradient is with respect to ``input``; no Hessian.

    Shape:
        input, target: (N, ...) of one shape, float; any shape with ``batch=True``.
        Output: a scalar for "mean" and "sum"; (N) for "none", () with ``batch=True``.
""",
    ),
    LossSpec(
        name="tversky_loss",
        family="similarity",
        arguments=("input", "target"),
        differentiable=("input",),
        options={
            "alpha": 0.5,
            "beta": 0.5,
            "smooth": overlap.DEFAULT_SMOOTH,
            "sigmoid": False,
            "batch": False,
            "reduction": "mean",
        },
        prepare=overlap.prepare_tversky,
        reference=overlap.reference_tversky,
        example=overlap.example,
        option_sets=(
            {"alpha": 0.3, "beta": 0.7},
            overlap.logits,
            {"batch": True, "alpha": 0.8, "beta": 0.1, "smooth": 1.0},
        ),
        doc="""Soft Tversky loss (MONAI's ``TverskyLoss`` convention with one ``smooth``):
    ``1 - (TP + smooth) / (TP + alpha FP + beta FN + smooth)`` with ``TP = sum(q t)``,
    ``FP = sum(q (1 - t))``, ``FN = sum((1 - q) t)``; ``q``, ``sigmoid``, ``batch`` and the
    shapes as for ``dice_loss``. ``alpha`` weighs false positives, ``beta`` false negatives
    (both >= 0). ``alpha = beta = 0.5`` with ``smooth = s`` is ``dice_loss`` with
    ``smooth = 2 s``. The gradient is with respect to ``input``; no Hessian.

    Shape:
        input, target: (N, ...) of one shape, float; any shape with ``batch=True``.
        Output: a scalar for "mean" and "sum"; (N) for "none", () with ``batch=True``.
""",
    ),
]


@hookimpl
def lossforge_losses():
    return SPECS


@hookimpl
def lossforge_kernels():
    for spec in COSINE.specs("cosine_similarity", (DEFAULT_EPS,), reduction=None):
        yield dataclasses.replace(spec, function=_cosine_similarity(spec.function))
    yield from EMBEDDING.specs("cosine_embedding_loss", (DEFAULT_MARGIN,))
    yield from triplet.specs()
    for name in ("dice_loss", "tversky_loss"):
        yield KernelSpec(name, "cpu", overlap.cpu)
        yield KernelSpec(name, "cuda", overlap.cuda)
