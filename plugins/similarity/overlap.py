"""``dice_loss`` and ``tversky_loss``: soft overlap losses for segmentation (no PyTorch
function; the conventions are MONAI's ``DiceLoss``/``TverskyLoss`` with one ``smooth``).

With ``q`` the probabilities (``input``, or ``sigmoid(input)`` with ``sigmoid=True``) and
``t`` the target, summed over each sample's elements (every dimension but the first), or
over the whole batch with ``batch=True``::

    I = sum(q t),  P = sum(q),  T = sum(t)      (FP = P - I, FN = T - I)
    dice    = 1 - (2 I + smooth) / (P + T + smooth)
    tversky = 1 - (I + smooth) / (I + alpha FP + beta FN + smooth)

``tversky_loss(alpha=0.5, beta=0.5, smooth=s)`` equals ``dice_loss(smooth=2 s)`` (so the two
agree exactly at ``smooth=0``). Both are one formula, ``1 - (k I + s) / (m I + a P + b T +
s)``; the gradient is with respect to ``input`` only. The kernels are hand-written, not
``lossforge.kernels.Rowwise``: a batch (or a few large samples) is one long row there, summed
by one thread into a scratch row of its length.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from lossforge import Prepared, validate
from lossforge.runtime import mathfn
from lossforge.runtime.cpu import CHUNK, TILE, KernelPair, inline, tree_sum

DEFAULT_SMOOTH = 1e-5


# -- the math ------------------------------------------------------------------------------
# Three passes: the sums of each sample's segments (kernels, float64), the samples' values and
# derivatives from their sums (NumPy, float64, on the host: one small array of samples), the
# gradient element by element (kernels). A segment is at most CHUNK elements of one sample, so
# a batch (or a few large samples) is summed in parallel too; segments are summed by NumPy in
# segment order: the same bits for any thread count.
def segments(columns: int) -> tuple[int, int]:
    """``(length, count)`` of the segments a sample of ``columns`` elements is cut into."""
    length = max(1, min(columns, CHUNK))
    return length, max(1, -(-columns // length))


def sigmoid(x):
    """The probability of a logit, from a vectorizable exp of ``-|x|`` (no overflow)."""
    e = mathfn.exp_nonpositive(-abs(x))
    return (1.0 if x >= 0 else e) / (1.0 + e)


@inline
def probability(x, logits):
    """``x``, or its sigmoid where ``logits`` is True: a runtime flag, not a pruned ``None``,
    so that a dtype compiles one kernel (the loop is unswitched on it)."""
    if logits:
        return sigmoid_cpu(x)
    return x


def overlap_sums(x, y, columns, logits, out):
    """``out[r] = (sum q y, sum q, sum y)`` over segment ``r`` of flat ``x``, ``y`` (samples
    of ``columns`` elements); element ``k`` of each ``TILE`` goes to running sum ``k``."""
    length = max(1, min(columns, CHUNK))
    count = max(1, -(-columns // length))
    total = out.shape[0]
    per_chunk = max(1, CHUNK // length)
    chunks = (total + per_chunk - 1) // per_chunk
    for c in prange(chunks):
        acc = np.empty((3, TILE))
        for r in range(c * per_chunk, min(c * per_chunk + per_chunk, total)):
            base = (r // count) * columns
            lo = base + (r % count) * length
            hi = min(lo + length, base + columns)
            xs = x[lo:hi]
            ys = y[lo:hi]
            acc[:] = 0.0
            n = hi - lo
            whole = n - n % TILE
            for t0 in range(0, whole, TILE):
                for k in range(TILE):
                    q = probability(np.float64(xs[t0 + k]), logits)
                    v = np.float64(ys[t0 + k])
                    acc[0, k] += q * v
                    acc[1, k] += q
                    acc[2, k] += v
            for k in range(n - whole):
                q = probability(np.float64(xs[whole + k]), logits)
                v = np.float64(ys[whole + k])
                acc[0, k] += q * v
                acc[1, k] += q
                acc[2, k] += v
            out[r, 0] = tree_sum(acc[0])
            out[r, 1] = tree_sum(acc[1])
            out[r, 2] = tree_sum(acc[2])
    return 0.0


def overlap_grad(x, y, columns, logits, c_i, c_p, grad):
    """``grad = (c_i y + c_p) dq/dx`` element by element, with sample ``s``'s coefficients
    ``c_i[s]`` (d loss / d I) and ``c_p[s]`` (d loss / d P), already times the upstream
    gradient and scale."""
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    for c in prange(chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        while lo < hi:  # the chunk's pieces of one sample each
            s = lo // columns
            end = min(hi, s * columns + columns)
            a = c_i[s]
            b = c_p[s]
            xs = x[lo:end]
            ys = y[lo:end]
            gs = grad[lo:end]
            for k in range(end - lo):
                xk = np.float64(xs[k])
                g = a * np.float64(ys[k]) + b
                if logits:
                    q = sigmoid_cpu(xk)
                    g *= q * (1.0 - q)
                gs[k] = g
            lo = end
    return 0.0


sigmoid_cpu = inline(sigmoid)
SUMS = KernelPair(overlap_sums, name="overlap_sums")
GRAD = KernelPair(overlap_grad, name="overlap_grad")


def _row_values(sums, p):
    """Each sample's loss ``1 - N / D`` (``N = k I + s``, ``D = m I + a P + b T + s``) and
    its derivatives with respect to I and P, from the ``(samples, 3)`` float64 sums."""
    i, pp, tt = sums.T
    num = p["k"] * i + p["smooth"]
    den = p["m"] * i + p["a"] * pp + p["b"] * tt + p["smooth"]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
        return 1.0 - r, (r * p["m"] - p["k"]) / den, r * p["a"] / den


def _run(p, loss_out, grads, grad_output, scale, sums_of, gradient, to_host, put):
    """The three passes; ``sums_of``, ``gradient`` launch the kernels, ``to_host``/``put``
    move the per-sample arrays (identities on the CPU)."""
    x, y = p.arrays
    samples, columns = p.params["samples"], p.params["columns"]
    if samples == 0:
        return 0.0
    count = segments(columns)[1]
    sums = sums_of(x, y, columns, samples * count).reshape(samples, count, 3).sum(axis=1)
    values, c_i, c_p = _row_values(sums, p.params)
    if loss_out is not None:
        put(loss_out, values.astype(loss_out.dtype).reshape(loss_out.shape))
    if grads:
        g = np.float64(scale)
        if grad_output is not None:
            g = scale * to_host(grad_output).astype(np.float64).reshape(-1)
        gradient(x, y, columns, c_i * g, c_p * g, grads[0])
    return float(np.sum(values))


def _logits(p):
    return bool(p.params["sigmoid"])


def cpu(p, loss_out, grads, grad_output, scale):
    """The ``KernelSpec`` function on the CPU."""
    logits = _logits(p)

    def sums_of(x, y, columns, total):
        out = np.empty((total, 3))
        SUMS(x.size, x, y, columns, logits, out)
        return out

    def gradient(x, y, columns, c_i, c_p, grad):
        GRAD(x.size, x, y, columns, logits, c_i, c_p, grad.reshape(-1))

    def put(out, values):
        out[...] = values

    return _run(p, loss_out, grads, grad_output, scale, sums_of, gradient, np.asarray, put)


def cuda(p, loss_out, grads, grad_output, scale):
    """The ``KernelSpec`` function on CUDA (``overlap_cuda``): the per-sample sums come to the
    host and the coefficients go back, two small copies a call."""
    from lossforge.plugins.similarity import overlap_cuda

    return overlap_cuda.run(p, loss_out, grads, grad_output, scale, _run)


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
    columns = math.prod(shape) if batch else math.prod(shape[1:])
    return Prepared(
        arrays=(x.reshape(-1), y.reshape(-1)),
        params={
            **params,
            "smooth": smooth,
            "sigmoid": sigmoid,
            "samples": rows,
            "columns": columns,
        },
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
