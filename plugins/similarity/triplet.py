"""``triplet_margin_loss`` and ``triplet_margin_with_distance_loss``, with PyTorch 2.13's
semantics; gradients for anchor, positive and negative.

Per row ``i`` of the inputs broadcast together (``(N, D)``, the one row of ``(D)``, or
``(..., D)``; one number of dimensions, as PyTorch requires)::

    d(x, y) = ||x - y + eps||_p = (sum_k |x_k - y_k + eps|^p)^(1/p)   (pairwise_distance)
    d_neg   = d(a, n), or min(d(a, n), d(p, n)) with swap
    loss    = max(margin + d(a, p) - d_neg, 0)

with every ``p`` torch's ``linalg.vector_norm`` takes: p < 0 too, p = 0 (the count of
nonzero elements), p = inf (max |v|), p = -inf (min |v|), p = nan (nan).

The gradients are autograd's: ``clamp_min``'s passes where ``margin + d(a, p) - d_neg >= 0``,
``minimum``'s is split in half between tied distances, and the norm's derivative is torch's
``norm_backward``: ``sign(v) |v|^(p-1) / d^(p-1)``, 0 where ``v`` or (for p >= 1) ``d`` is
0; none for p = 0; for p = +-inf ``sign(v)`` shared evenly among the elements at the max
(min). The gradient of a broadcast input is summed over the dimensions it was broadcast
along, as autograd sums it (``broadcast_grads``).

The kernels (hand-written: a row template takes two arrays, a triplet three, and up to three
distances) work on chunks of whole rows, each row read twice (its distances, then its three
gradients), sums along a row in float64 and chunk partials added in order: the same bits
for any thread count.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from numba import prange

from lossforge import KernelSpec, Prepared, dispatch, validate
from lossforge.kernels import _kernel_name
from lossforge.kernels import unspecialised as inverse
from lossforge.kernels import unspecialised as power
from lossforge.kernels import unspecialised as root
from lossforge.kernels import unspecialised as row_weights
from lossforge.kernels import unspecialised as slope
from lossforge.kernels import unspecialised as unsummed
from lossforge.runtime.cpu import BLOCK, CHUNK, KernelPair, jit, ordered_sum, tree_sum

#: ``pairwise_distance``'s defaults, which ``triplet_margin_with_distance_loss`` uses.
DEFAULT_P, DEFAULT_EPS, DEFAULT_MARGIN = 2.0, 1e-6, 1.0


# -- the math, per element and per row (float64; the CPU and CUDA kernels share it) --------
# ``q`` is ``p``. Besides the p-norms of 0 < p < inf, torch's ``linalg.vector_norm`` (through
# ``pairwise_distance``) takes p < 0 (the same sum of powers: a zero element makes the sum
# inf and the norm 0), p = 0 (the count of nonzero elements), p = inf (max |v|) and p = -inf
# (min |v|); the last three are ``unsummed_norm``'s, outside the sums' loop, which keeps its
# speed (a branch for them inside it cost the p=2 value kernel 25%, measured).
INF = math.inf


def power_term(v, q):
    """``|v|^q``, one term of the norm's sum (``0^q = inf`` for q < 0)."""
    a = abs(v)
    if q == 2.0:
        return a * a
    if q == 1.0:
        return a
    return a**q


def unsummed_norm(x, i, y, j, dim, eps, q):
    """``(norm, n)`` of the row ``v = x[i + k] - y[j + k] + eps``, k < dim, for q = 0 (the
    count of nonzero elements, NaN included as in torch) and q = +-inf (``max |v|``, ``min
    |v|``, NaN sticking as in ``amax``; ``n`` how many elements attain it)."""
    s = 0.0
    n = 0.0
    for k in range(dim):
        v = np.float64(x[i + k]) - np.float64(y[j + k]) + eps
        a = abs(v)
        if q == 0.0:
            s += 1.0 if v != 0.0 else 0.0
        elif n > 0.0 and a == s:
            n += 1.0
        elif n == 0.0 or a != a or (a > s if q > 0.0 else a < s):
            s = a
            n = 1.0
    return s, n


def norm_root(s, q):
    """The p-norm from its sum of powers (itself for q = 0, +-inf)."""
    if q == 2.0:
        return math.sqrt(s)
    if q == 1.0 or q == 0.0 or q == INF or q == -INF:
        return s
    if s == 0.0 and q < 0.0:
        return INF
    return s ** (1.0 / q)


def norm_inverse(d, n, q):
    """The row's factor of the norm's derivative (torch's ``norm_backward``): ``1 / d^(q-1)``,
    0 for a zero norm; ``d^(1-q)`` for q < 1 (torch multiplies, 0 at a zero norm); for
    q = +-inf ``1 / n``, the gradient split evenly among the ``n`` elements at the max (min)."""
    if q == 2.0:
        return 0.0 if d == 0.0 else 1.0 / d
    if q == INF or q == -INF:
        return 1.0 / n
    if q < 1.0:  # (q = 0 included: its slope is 0 anyway)
        return d ** (1.0 - q)
    if d == 0.0:
        return 0.0
    if q == 1.0:
        return 1.0
    return 1.0 / d ** (q - 1.0)


def norm_slope(v, c, d, q):
    """``c sign(v) |v|^(q-1)``: with ``c = g`` times ``norm_inverse``, ``g`` times
    d ||v||_q / d v_k; where v_k is 0, ``0 * c`` (NaN for a NaN norm, as torch's masked
    product). 0 for q = 0 (torch gives no gradient); for q = +-inf ``c sign(v)`` at the
    elements with ``|v| = d``, 0 elsewhere (NaN elements too: torch's ``sgn(nan)`` is 0)."""
    if q == 2.0:
        return v * c
    if q == 0.0:
        return 0.0
    if q == INF or q == -INF:
        if abs(v) != d or v == 0.0:
            return 0.0
        return c if v > 0.0 else -c
    if v == 0.0:
        return 0.0 * c
    s = c if v > 0.0 else -c
    if q == 1.0:
        return s
    return s * abs(v) ** (q - 1.0)


def triplet_row(dp, dn, ds, p):
    """``(loss, cp, cn, cs)``: the row's loss and the derivatives of the loss with respect
    to d(a, p), d(a, n) and d(p, n) (the last 0 without swap)."""
    margin = p[0]
    swap = p[3]
    neg = dn
    wn = 1.0
    ws = 0.0
    if swap != 0.0:
        if ds < dn:
            neg = ds
            wn = 0.0
            ws = 1.0
        elif ds == dn:  # torch.minimum's gradient: half to each
            wn = 0.5
            ws = 0.5
    z = margin + dp - neg
    loss = 0.0 if z < 0.0 else z  # nan stays nan, as in clamp_min
    on = 1.0 if z >= 0.0 else 0.0  # clamp_min's gradient mask
    return loss, on, -on * wn, -on * ws


# -- the CPU kernel ------------------------------------------------------------------------
def triplet_rows(rows, a, b, c, p, loss_out, ga, gb, gc, go, scale):
    """``rows`` rows of anchor ``a``, positive ``b``, negative ``c`` (each ``(rows, D)``, or
    ``(1, D)`` for an input broadcast along the rows: read at stride 0); ``p`` is
    ``(margin, q, eps, swap)``. The gradients are ``(rows, D)``. Absent outputs are empty
    arrays, not ``None``: one compiled signature a dtype (the checks are once a row).
    Returns the float64 sum of the rows' losses."""
    dim = a.shape[1]
    want_loss = loss_out.size > 0
    want_grad = ga.size > 0
    upstream = go.size > 0
    q = p[1]
    eps = p[2]
    swap = p[3] != 0.0
    special = q == 0.0 or q == INF or q == -INF
    sa = 1 if a.shape[0] > 1 else 0
    sb = 1 if b.shape[0] > 1 else 0
    sc = 1 if c.shape[0] > 1 else 0
    per_chunk = max(1, CHUNK // max(dim, 1))
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    for ch in prange(chunks):
        buf = np.empty(BLOCK)
        norms = np.zeros((BLOCK if special else 0, 6))
        s = 0.0
        end = min(ch * per_chunk + per_chunk, rows)
        for lo in range(ch * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            if special:  # the block's norms first: in the rows' loop they would slow it down
                for i in range(lo, hi):
                    row = norms[i - lo]
                    row[0], row[1] = unsummed(a[i * sa], 0, b[i * sb], 0, dim, eps, q)
                    row[2], row[3] = unsummed(a[i * sa], 0, c[i * sc], 0, dim, eps, q)
                    if swap:
                        row[4], row[5] = unsummed(b[i * sb], 0, c[i * sc], 0, dim, eps, q)
            for i in range(lo, hi):
                ra = a[i * sa]
                rb = b[i * sb]
                rc = c[i * sc]
                sp = 0.0
                sn = 0.0
                ss = 0.0
                np_ = nn = ns = 0.0
                if special:
                    row = norms[i - lo]
                    sp, np_, sn, nn, ss, ns = row[0], row[1], row[2], row[3], row[4], row[5]
                else:
                    for k in range(dim):
                        xa = np.float64(ra[k])
                        xb = np.float64(rb[k])
                        xc = np.float64(rc[k])
                        sp += power(xa - xb + eps, q)
                        sn += power(xa - xc + eps, q)
                        if swap:
                            ss += power(xb - xc + eps, q)
                dp = root(sp, q)
                dn = root(sn, q)
                ds = root(ss, q)
                value, cp, cn, cs = row_weights(dp, dn, ds, p)
                if want_loss:
                    loss_out[i] = value
                if want_grad:
                    g = scale * np.float64(go[i]) if upstream else scale
                    cp *= g * inverse(dp, np_, q)
                    cn *= g * inverse(dn, nn, q)
                    cs *= g * inverse(ds, ns, q) if swap else 0.0
                    oa = ga[i]
                    ob = gb[i]
                    oc = gc[i]
                    for k in range(dim):
                        xa = np.float64(ra[k])
                        xb = np.float64(rb[k])
                        xc = np.float64(rc[k])
                        up = slope(xa - xb + eps, cp, dp, q)
                        un = slope(xa - xc + eps, cn, dn, q)
                        us = slope(xb - xc + eps, cs, ds, q) if swap else 0.0
                        oa[k] = up + un
                        ob[k] = us - up
                        oc[k] = -un - us
                buf[i - lo] = value
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[ch] = s
    return ordered_sum(partials)


FORMULAS = {
    "power": power_term,
    "unsummed": unsummed_norm,
    "root": norm_root,
    "inverse": norm_inverse,
    "slope": norm_slope,
    "row_weights": triplet_row,
}

# The helpers are called, not inlined: a third less compile time (4.4 -> 3.2 s a variant,
# measured), the same speed (LLVM inlines them; pow keeps the p != 2 loops scalar anyway).
KERNEL = KernelPair(
    triplet_rows,
    name=_kernel_name(triplet_row, "triplet_rows"),
    namespace={key: jit(fn) for key, fn in FORMULAS.items()},
)


def _params(p: Prepared) -> tuple[float, float, float, float]:
    prm = p.params
    return (float(prm["margin"]), float(prm["p"]), float(prm["eps"]), float(prm["swap"]))


def cpu(p: Prepared, loss_out, grads, grad_output, scale):
    """The ``KernelSpec`` function on the CPU (gradients of the rows' shape, see
    ``broadcast_grads``)."""
    a, b, c = p.arrays
    rows, dim = p.params["rows"], a.shape[1]
    none, empty = np.empty((0, 0), a.dtype), np.empty(0, a.dtype)
    ga, gb, gc = (g.reshape(rows, dim) for g in grads) if grads else (none, none, none)
    return KERNEL(
        rows * dim,
        rows,
        a,
        b,
        c,
        _params(p),
        empty if loss_out is None else loss_out.reshape(-1),
        ga,
        gb,
        gc,
        empty if grad_output is None else grad_output.reshape(-1),
        scale,
    )


def broadcast_grads(kernel):
    """``kernel`` (``cpu``, the CUDA ``run``) for inputs broadcast together: the gradient of
    an input of another shape than the broadcast one is written for every row into a
    scratch array of the broadcast shape, then summed over the broadcast dimensions into the
    input's shape (``dispatch.sum_into``), as autograd sums it. The kernels run in parallel
    over rows: summing a stride-0 input's rows inside them would need per-chunk partial rows
    added in order (for bitwise determinism); the scratch is the size of the other inputs'
    gradients, and inputs of one shape (the common case) need none."""

    def run(p, loss_out, grads, grad_output, scale):
        full = p.params["broadcast"]
        if not grads or full is None:
            return kernel(p, loss_out, grads, grad_output, scale)
        rows = tuple(
            g if tuple(g.shape) == full else dispatch.empty(full, p.dtype, p.backend) for g in grads
        )
        total = kernel(p, loss_out, rows, grad_output, scale)
        for final, grad in zip(grads, rows, strict=True):
            if grad is not final:
                dispatch.sum_into(final, grad, p.backend)
        return total

    return run


# -- preparation -----------------------------------------------------------------------------
NAMES = ("anchor", "positive", "negative")


def prepare(arrays, options, backend, *, distance=False):
    """Three float arrays seen as rows ``(R, D)`` of the broadcast shape (distances along the
    last dimension). PyTorch's ``RuntimeError`` for unequal dimension counts, shapes that do
    not broadcast, and an empty last dimension for p < 0 or p = +-inf (its norm has no
    identity) are ``ValueError`` here (API.md 5)."""
    if distance:
        q, eps = _distance(options["distance_function"])
    else:
        q, eps = options["p"], validate.check_real("eps", options["eps"])
    q = validate.check_real("p", q)
    margin = validate.check_real("margin", options["margin"])
    if not margin > 0:  # PyTorch's check, for both losses
        raise ValueError(f"margin must be greater than 0, got {margin}")
    swap = validate.check_bool("swap", options["swap"])
    ndims = [np.ndim(x) for x in arrays]
    if len(set(ndims)) != 1 or ndims[0] == 0:
        raise ValueError(
            "anchor, positive and negative must have one number of dimensions, at least 1 "
            "(rows along the last); got "
            + ", ".join(f"{n} of {d}" for n, d in zip(NAMES, ndims, strict=True))
        )
    (a, b, c), dtype, dtypes, shape, full = _broadcast(arrays, backend)
    rows, dim = math.prod(shape[:-1]), shape[-1]
    if dim == 0 and (q < 0 or q == math.inf):
        raise ValueError(
            f"the p={q} norm of an empty last dimension has no value (PyTorch raises too); "
            f"got inputs of broadcast shape {shape}"
        )
    return Prepared(
        arrays=(a, b, c),
        params={
            "margin": margin,
            "p": q,
            "eps": eps,
            "swap": float(swap),
            "rows": rows,
            "broadcast": full,
        },
        reduction=options["reduction"],
        denominator=float(rows),
        value_shape=shape[:-1],
        grad_shapes=(shape,) * 3 if full is None else tuple(np.shape(x) for x in arrays),
        dtype=dtype,
        result_dtypes=dtypes,
        backend=backend,
    )


def _broadcast(arrays, backend):
    """``(rows of a, b, c, compute dtype, dtypes, broadcast shape, that shape again or None
    when all three have it)``. Each input is ``(R, D)``, or ``(1, D)`` where it holds one
    row for all (one anchor against many rows: the kernels read it at stride 0, no copy);
    any other broadcast (along the last dimension, or along some leading dimensions only) is
    materialised, one copy: its rows are not one stride apart."""
    if backend == "cpu" and validate.ready_arrays(arrays) is not None:  # kept cheap
        out, _, dtype, dtypes, shape = validate.elementwise(arrays, NAMES, None, backend)
        full = None
    else:
        raw = [validate.as_array(x, backend) for x in arrays]
        shapes = [tuple(x.shape) for x in raw]
        dtypes = [validate.float_dtype(n, x) for n, x in zip(NAMES, raw, strict=True)]
        try:
            shape = tuple(np.broadcast_shapes(*shapes))
        except ValueError:
            raise ValueError(
                ", ".join(f"{n} of shape {s}" for n, s in zip(NAMES, shapes, strict=True))
                + " do not broadcast together"
            ) from None
        dtype, result = validate.compute_dtype(*dtypes)
        dtypes = [result, *dtypes]
        full = None if all(s == shape for s in shapes) else shape
        out = [
            validate.as_float(
                n,
                x
                if s == shape or (math.prod(s[:-1]) == 1 and s[-1] == shape[-1])
                else validate.broadcast_to(x, shape, backend),
                dtype,
                backend,
            )
            for n, x, s in zip(NAMES, raw, shapes, strict=True)
        ]
    dim = shape[-1]
    rows = (x.reshape(math.prod(x.shape[:-1]), dim) for x in out)  # (-1, 0) is ambiguous
    return tuple(rows), dtype, tuple(dtypes), shape, full


def _distance(function):
    """``(p, eps)`` of a ``distance_function`` the kernel can compute: ``None`` or PyTorch's
    ``pairwise_distance`` (p=2, eps=1e-6), or a ``torch.nn.PairwiseDistance`` module (its
    own ``norm`` and ``eps``); any other callable is a ``TypeError``."""
    if function is None:
        return DEFAULT_P, DEFAULT_EPS
    torch = sys.modules.get("torch")  # a torch callable implies torch is imported
    if torch is not None:
        if function is torch.pairwise_distance or function is torch.nn.functional.pairwise_distance:
            return DEFAULT_P, DEFAULT_EPS
        if isinstance(function, torch.nn.PairwiseDistance) and not function.keepdim:
            return function.norm, function.eps
    raise TypeError(
        "triplet_margin_with_distance_loss: distance_function must be None, "
        "torch.pairwise_distance or a torch.nn.PairwiseDistance(keepdim=False); a Python "
        f"callable ({function!r}) cannot run in a compiled kernel (triplet_margin_loss takes "
        "any p-norm through p and eps)"
    )


def prepare_with_distance(arrays, options, backend):
    return prepare(arrays, options, backend, distance=True)


# -- float64 reference for the conformance kit -------------------------------------------------
def reference(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False, **_):
    a, b, c = (np.asarray(x, np.float64) for x in (anchor, positive, negative))

    def dist(x, y):
        v = np.abs(x - y + eps)
        if p == 0:
            return np.count_nonzero(v, axis=-1).astype(np.float64)
        if p == math.inf:
            return v.max(-1)
        if p == -math.inf:
            return v.min(-1)
        with np.errstate(divide="ignore"):  # 0 ** p = inf for p < 0: that norm is 0
            return (v**p).sum(-1) ** (1 / p)

    neg = dist(a, c)
    if swap:
        neg = np.minimum(neg, dist(b, c))
    return np.maximum(margin + dist(a, b) - neg, 0.0)


def example(rng, size, dtype, features=8):
    rows = max(size // features, 1)
    arrays = tuple(rng.standard_normal((rows, features)).astype(dtype) for _ in NAMES)
    return arrays, {"margin": 0.5}


def specs() -> list[KernelSpec]:
    cuda = "lossforge.plugins.similarity.triplet_cuda:run"
    return [
        KernelSpec(name, backend, function)
        for name in ("triplet_margin_loss", "triplet_margin_with_distance_loss")
        for backend, function in (("cpu", broadcast_grads(cpu)), ("cuda", cuda))
    ]
