"""``dice_loss`` and ``tversky_loss``: soft overlap losses for segmentation (no PyTorch
function; the conventions are MONAI's ``DiceLoss``/``TverskyLoss`` with one ``smooth``).

With ``q`` the probabilities (``input``, or ``sigmoid(input)`` with ``sigmoid=True``) and
``t`` the target, summed over each sample's elements (every dimension but the first), or
over the whole batch with ``batch=True``::

    I = sum(q t),  P = sum(q),  T = sum(t)      (FP = P - I, FN = T - I)
    dice    = 1 - (2 I + smooth) / (P + T + smooth)
    tversky = 1 - (I + smooth) / (I + alpha FP + beta FN + smooth)

``tversky_loss(alpha=0.5, beta=0.5, smooth=s)`` equals ``dice_loss(smooth=2 s)`` (so the two
agree exactly at ``smooth=0``). Both are one row formula, ``1 - (k I + s) / (m I + a P + b T +
s)``, built by ``lossforge.kernels.Rowwise`` on rows of ``(samples, elements)``; the
gradient is with respect to ``input`` only.
"""

from __future__ import annotations

import math

import numpy as np

from lossforge import Prepared, validate
from lossforge.kernels import Rowwise

DEFAULT_SMOOTH = 1e-5


def probability_terms(x, y):
    return x * y, x, y


# sigmoid written out in each formula: a formula calls no helper of its own (the templates
# compile the formula alone, for the CPU and as a CUDA device function)
def sigmoid_terms(x, y):
    q = 1.0 / (1.0 + math.exp(-x))
    return q * y, q, y


def overlap_row(sums, t, p):
    """The row's loss ``1 - N / D``, ``N = k I + s``, ``D = m I + a P + b T + s``, and its
    derivatives with respect to I, P and T."""
    i, pp, tt = sums
    k, m, a, b, s = p
    num = k * i + s
    den = m * i + a * pp + b * tt + s
    r = num / den
    return 1.0 - r, (r * m - k) / den, r * a / den, r * b / den


def probability_grads(x, y, c0, c1, c2):
    return c0 * y + c1, c0 * x + c2


def sigmoid_grads(x, y, c0, c1, c2):
    q = 1.0 / (1.0 + math.exp(-x))
    return (c0 * y + c1) * q * (1.0 - q), c0 * q + c2


PARAMS = ("k", "m", "a", "b", "smooth")
PROBABILITIES = Rowwise(probability_terms, overlap_row, probability_grads, params=PARAMS)
LOGITS = Rowwise(sigmoid_terms, overlap_row, sigmoid_grads, params=PARAMS)


def _kernel(backend):
    """The KernelSpec function on ``backend``: the template of the input's kind."""

    def run(p, loss_out, grads, grad_output, scale):
        kernel = LOGITS if p.params["sigmoid"] else PROBABILITIES
        return getattr(kernel, backend)(p, loss_out, grads, grad_output, scale)

    return run


cpu, cuda = _kernel("cpu"), _kernel("cuda")


def prepare(arrays, options, backend, *, tversky=False):
    smooth = validate.check_nonnegative("smooth", options["smooth"])
    sigmoid = validate.check_bool("sigmoid", options["sigmoid"])
    batch = validate.check_bool("batch", options["batch"])
    if tversky:
        alpha = validate.check_nonnegative("alpha", options["alpha"])
        beta = validate.check_nonnegative("beta", options["beta"])
        params = {"k": 1.0, "m": 1.0 - alpha - beta, "a": alpha, "b": beta}
    else:
        params = {"k": 2.0, "m": 0.0, "a": 1.0, "b": 1.0}
    (x, y), _, dtype, dtypes, shape = validate.elementwise(
        arrays, ("input", "target"), None, backend
    )
    if batch:
        rows, value_shape = 1, ()
    elif len(shape) >= 2:
        rows, value_shape = shape[0], shape[:1]
    else:
        raise ValueError(
            f"input must be (N, ...) with a batch dimension, got shape {shape}: "
            "use batch=True to reduce one sample over all its elements"
        )
    size = math.prod(shape)
    columns = size // rows if rows else math.prod(shape[1:])
    return Prepared(
        arrays=(x.reshape(rows, columns), y.reshape(rows, columns), None),
        params={**params, "smooth": smooth, "sigmoid": sigmoid},
        reduction=options["reduction"],
        denominator=float(rows),
        value_shape=value_shape,
        grad_shapes=(shape,),
        dtype=dtype,
        result_dtypes=dtypes[:2],
        backend=backend,
    )


def prepare_tversky(arrays, options, backend):
    return prepare(arrays, options, backend, tversky=True)


# -- float64 references for the conformance kit ----------------------------------------------
def _sums(input, target, sigmoid, batch):
    q = np.asarray(input, np.float64)
    q = 1 / (1 + np.exp(-q)) if sigmoid else q
    t = np.asarray(target, np.float64)
    axes = None if batch else tuple(range(1, q.ndim))
    return (q * t).sum(axes), q.sum(axes), t.sum(axes)


def reference_dice(input, target, smooth=DEFAULT_SMOOTH, sigmoid=False, batch=False, **_):
    i, p, t = _sums(input, target, sigmoid, batch)
    return 1 - (2 * i + smooth) / (p + t + smooth)


def reference_tversky(
    input, target, alpha=0.5, beta=0.5, smooth=DEFAULT_SMOOTH, sigmoid=False, batch=False, **_
):
    i, p, t = _sums(input, target, sigmoid, batch)
    return 1 - (i + smooth) / (i + alpha * (p - i) + beta * (t - i) + smooth)


def example(rng, size, dtype, features=64):
    shape = (max(size // features, 1), 1, features)
    q = rng.uniform(0, 1, shape).astype(dtype)
    return (q, (rng.uniform(0, 1, shape) > 0.5).astype(dtype)), {}


def logits(rng, arrays, dtype):
    """An option set: logits for ``sigmoid=True``."""
    return {"sigmoid": True, "input": rng.standard_normal(arrays[0].shape).astype(dtype)}
