"""The CUDA kernel of the triplet losses: ``triplet.py``'s math as device functions, one
thread a row (grid-stride over rows), the rows' losses summed into deterministic per-block
partials (``lossforge.runtime.cuda``). An input of one row broadcast against the others is
read at stride 0, as on the CPU."""

from __future__ import annotations

import math

from lossforge.plugins.similarity import triplet
from numba import cuda, float64

from lossforge.kernels import _kernel_name, clone
from lossforge.kernels import unspecialised as inverse
from lossforge.kernels import unspecialised as power
from lossforge.kernels import unspecialised as root
from lossforge.kernels import unspecialised as row_weights
from lossforge.kernels import unspecialised as slope
from lossforge.kernels import unspecialised as unsummed
from lossforge.runtime import cuda as rt
from lossforge.runtime.cuda import NO_FLAG, THREADS


def _triplet(a, b, c, p, rows, dim, loss_out, ga, gb, gc, go, scale, scratch):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    q = p[1]
    eps = p[2]
    swap = p[3] != 0.0
    special = q == 0.0 or q == math.inf or q == -math.inf
    want_loss = loss_out.size > 0
    want_grad = ga.size > 0
    upstream = go.size > 0
    ra = dim if a.size > dim else 0  # a row's stride: 0 for an input of one row
    rb = dim if b.size > dim else 0
    rc = dim if c.size > dim else 0
    acc = 0.0
    for i in range(cuda.grid(1), rows, cuda.gridsize(1)):
        start = i * dim
        ia = i * ra
        ib = i * rb
        ic = i * rc
        sp = 0.0
        sn = 0.0
        ss = 0.0
        np_ = nn = ns = 0.0
        if special:
            sp, np_ = unsummed(a, ia, b, ib, dim, eps, q)
            sn, nn = unsummed(a, ia, c, ic, dim, eps, q)
            if swap:
                ss, ns = unsummed(b, ib, c, ic, dim, eps, q)
        else:
            for k in range(dim):
                xa = float64(a[ia + k])
                xb = float64(b[ib + k])
                xc = float64(c[ic + k])
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
        acc += value
        if want_grad:
            g = scale * float64(go[i]) if upstream else scale
            cp *= g * inverse(dp, np_, q)
            cn *= g * inverse(dn, nn, q)
            cs *= g * inverse(ds, ns, q) if swap else 0.0
            for k in range(dim):
                xa = float64(a[ia + k])
                xb = float64(b[ib + k])
                xc = float64(c[ic + k])
                up = slope(xa - xb + eps, cp, dp, q)
                un = slope(xa - xc + eps, cn, dn, q)
                us = slope(xb - xc + eps, cs, ds, q) if swap else 0.0
                ga[start + k] = up + un
                gb[start + k] = us - up
                gc[start + k] = -un - us
    rt.write_partials(sa, sb, scratch, acc, NO_FLAG)


NAME = _kernel_name(triplet.triplet_row, "cuda_triplet")
KERNEL = rt.kernel(
    clone(
        _triplet,
        NAME,
        {key: rt.device_formula(fn, f"{NAME}_{key}") for key, fn in triplet.FORMULAS.items()},
    )
)


def _run(p, loss_out, grads, grad_output, scale):
    a, b, c = p.arrays
    rows, dim = p.params["rows"], a.shape[1]
    if rows == 0:
        return 0.0
    dtype = p.dtype
    blocks = max(1, min(rt.MAX_BLOCKS, -(-rows // THREADS)))
    scratch = rt.partials(blocks)
    nothing = rt.nothing(dtype)
    KERNEL[blocks, THREADS, rt.stream()](
        rt.flat(a, dtype),
        rt.flat(b, dtype),
        rt.flat(c, dtype),
        triplet._params(p),
        rows,
        dim,
        rt.flat(loss_out, dtype),
        *((rt.flat(g, dtype) for g in grads) if grads else (nothing, nothing, nothing)),
        rt.flat(grad_output, dtype) if grads else nothing,
        float(scale),
        scratch,
    )
    if p.reduction in ("mean", "sum"):
        return rt.finish(scratch)[0]
    return 0.0


#: The ``KernelSpec`` function on CUDA (gradients of a broadcast input summed on the host).
run = triplet.broadcast_grads(_run)
