"""``triplet_margin_loss`` and ``triplet_margin_with_distance_loss``, with PyTorch 2.13's
semantics; gradients for anchor, positive and negative.

Per row ``i`` of ``(N, D)`` inputs (or the one row of ``(D)`` inputs)::

    d(x, y) = ||x - y + eps||_p = (sum_k |x_k - y_k + eps|^p)^(1/p)   (pairwise_distance)
    d_neg   = d(a, n), or min(d(a, n), d(p, n)) with swap
    loss    = max(margin + d(a, p) - d_neg, 0)

The gradients are autograd's: ``clamp_min``'s passes where ``margin + d(a, p) - d_neg >= 0``,
``minimum``'s is split in half between tied distances, and the norm's derivative is
``sign(v) |v|^(p-1) / d^(p-1)``, 0 where ``v`` or ``d`` is 0 (torch's ``norm_backward``).

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

from lossforge import KernelSpec, Prepared, validate
from lossforge.kernels import _kernel_name
from lossforge.kernels import unspecialised as inverse
from lossforge.kernels import unspecialised as power
from lossforge.kernels import unspecialised as root
from lossforge.kernels import unspecialised as row_weights
from lossforge.kernels import unspecialised as slope
from lossforge.runtime.cpu import BLOCK, CHUNK, KernelPair, jit, ordered_sum, tree_sum

#: ``pairwise_distance``'s defaults, which ``triplet_margin_with_distance_loss`` uses.
DEFAULT_P, DEFAULT_EPS, DEFAULT_MARGIN = 2.0, 1e-6, 1.0


# -- the math, per element and per row (float64; the CPU and CUDA kernels share it) --------
def power_term(v, q):
    """``|v|^q``, one term of the p-norm's sum."""
    a = abs(v)
    if q == 2.0:
        return a * a
    if q == 1.0:
        return a
    return a**q


def norm_root(s, q):
    """The p-norm from its sum of powers."""
    if q == 2.0:
        return math.sqrt(s)
    if q == 1.0:
        return s
    return s ** (1.0 / q)


def norm_inverse(d, q):
    """``1 / d^(q-1)``, the row's factor of the norm's derivative; 0 for a zero norm."""
    if d == 0.0:
        return 0.0
    if q == 2.0:
        return 1.0 / d
    if q == 1.0:
        return 1.0
    return 1.0 / d ** (q - 1.0)


def norm_slope(v, c, q):
    """``c sign(v) |v|^(q-1)``: with ``c = g / ||v||^(q-1)`` (``norm_inverse``), ``g`` times
    d ||v||_q / d v_k; 0 where v_k is 0."""
    if q == 2.0:
        return v * c
    if v == 0.0:
        return 0.0
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
def triplet_rows(a, b, c, p, loss_out, ga, gb, gc, go, scale):
    """Rows ``(R, D)`` of anchor ``a``, positive ``b``, negative ``c``; ``p`` is
    ``(margin, q, eps, swap)``. Absent outputs are empty arrays, not ``None``: one compiled
    signature a dtype (the checks are once a row). Returns the float64 sum of the rows'
    losses."""
    rows, dim = a.shape
    want_loss = loss_out.size > 0
    want_grad = ga.size > 0
    upstream = go.size > 0
    q = p[1]
    eps = p[2]
    swap = p[3] != 0.0
    per_chunk = max(1, CHUNK // max(dim, 1))
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    for ch in prange(chunks):
        buf = np.empty(BLOCK)
        s = 0.0
        end = min(ch * per_chunk + per_chunk, rows)
        for lo in range(ch * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                ra = a[i]
                rb = b[i]
                rc = c[i]
                sp = 0.0
                sn = 0.0
                ss = 0.0
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
                    cp *= g * inverse(dp, q)
                    cn *= g * inverse(dn, q)
                    cs *= g * inverse(ds, q)
                    oa = ga[i]
                    ob = gb[i]
                    oc = gc[i]
                    for k in range(dim):
                        xa = np.float64(ra[k])
                        xb = np.float64(rb[k])
                        xc = np.float64(rc[k])
                        up = slope(xa - xb + eps, cp, q)
                        un = slope(xa - xc + eps, cn, q)
                        us = slope(xb - xc + eps, cs, q) if swap else 0.0
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
    """The ``KernelSpec`` function on the CPU."""
    a, b, c = p.arrays
    none, rows = np.empty((0, 0), a.dtype), np.empty(0, a.dtype)
    ga, gb, gc = (g.reshape(a.shape) for g in grads) if grads else (none, none, none)
    return KERNEL(
        a.size,
        a,
        b,
        c,
        _params(p),
        rows if loss_out is None else loss_out.reshape(-1),
        ga,
        gb,
        gc,
        rows if grad_output is None else grad_output.reshape(-1),
        scale,
    )


# -- preparation -----------------------------------------------------------------------------
NAMES = ("anchor", "positive", "negative")


def prepare(arrays, options, backend, *, distance=False):
    """Three float arrays of one shape, distances along the last dimension (PyTorch's
    ``RuntimeError`` for unequal dimension counts is a ``ValueError`` here, API.md 5)."""
    if distance:
        q, eps = _distance(options["distance_function"])
    else:
        q, eps = options["p"], validate.check_real("eps", options["eps"])
    q = validate.check_real("p", q)
    if not 0 < q < math.inf:
        raise ValueError(f"p must be a finite number > 0, got {q}")
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
    (a, b, c), _, dtype, dtypes, shape = validate.elementwise(arrays, NAMES, None, backend)
    rows = math.prod(shape[:-1])
    return Prepared(
        arrays=tuple(x.reshape(rows, shape[-1]) for x in (a, b, c)),
        params={"margin": margin, "p": q, "eps": eps, "swap": float(swap)},
        reduction=options["reduction"],
        denominator=float(rows),
        value_shape=shape[:-1],
        grad_shapes=(shape, shape, shape),
        dtype=dtype,
        result_dtypes=dtypes,
        backend=backend,
    )


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
        return (np.abs(x - y + eps) ** p).sum(-1) ** (1 / p)

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
        for backend, function in (("cpu", cpu), ("cuda", cuda))
    ]
