"""What every CPU kernel shares: how it is compiled, how it is chunked, when it goes parallel.

Determinism: a reduction splits its elements into chunks of ``CHUNK`` elements (boundaries
depend on the size only), writes one float64 partial per chunk, and adds the partials in
chunk order. The serial and the parallel variant of a kernel run the same body, so their
results are bitwise identical, and so are results for any thread count.

Threads: parallel variants run on the threading layer Numba picks (``tbb``, else ``omp``,
else ``workqueue``; ``NUMBA_THREADING_LAYER`` decides where the user set it). ``KernelPair``
serialises parallel calls under ``workqueue`` (concurrent calls abort it) and runs the serial
variant in a child of ``fork()`` whose parent had started GNU OpenMP (a parallel region there
gets the child killed): see the README's "Threads and forked processes".
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numba
import numpy as np
from numba import prange
from numba.core import types as nb_types
from numba.extending import intrinsic

from lossforge import validate
from lossforge.kernels import clone
from lossforge.kernels import unspecialised as formula
from lossforge.kernels import unspecialised as grads
from lossforge.kernels import unspecialised as hessian
from lossforge.kernels import unspecialised as invalid
from lossforge.kernels import unspecialised as row
from lossforge.kernels import unspecialised as target_grad
from lossforge.kernels import unspecialised as terms
from lossforge.kernels import unspecialised as transform
from lossforge.runtime import mathfn

#: Elements per reduction chunk. Part of the numerical result: changing it changes the
#: rounding of sums, so it is a constant, not a tuning knob.
CHUNK = 1 << 14

#: Elements per block inside a chunk, the unit a kernel slices its arrays by: the binary and
#: cross-entropy kernels write a block's per-element losses to a buffer that ``tree_sum``
#: adds up. Also part of the numerical result.
BLOCK = 1 << 10

#: Elements per tile of an element-wise kernel: the loss of element ``k`` of every tile of a
#: chunk is added to the chunk's running sum ``k`` (adds along a vector, not across it), and
#: ``tree_sum`` adds the 64 sums at the chunk's end. Also part of the numerical result.
TILE = 64

#: Below this many elements a call runs the serial variant: a parallel region costs
#: microseconds to start and can wait a scheduler slice when the other core is busy. The
#: crossover measured for the element-wise and cosine losses on 2 threads: parallel 10-25%
#: slower at 16384 elements, 16-36% faster at 32768 (35-45% at 65536). A kernel may set its
#: own (``parallel_kernel(parallel_min=...)``).
PARALLEL_MIN = 1 << 15

#: ``fastmath={"contract"}`` lets LLVM fuse ``a * b + c`` into one FMA: a single rounding
#: instead of two (results change within rounding only, the same way for every thread count)
#: and about a third off the polynomial exp/log of ``runtime.mathfn``. No other fastmath
#: flag: they change results beyond rounding (reassociation, no nan/inf).
JIT_OPTIONS = {
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "boundscheck": False,
    "fastmath": {"contract"},
}


def jit(fn: Callable) -> Any:
    """A serial kernel or helper: ``@njit`` with the project's options."""
    return numba.njit(**JIT_OPTIONS)(fn)


def inline(fn: Callable) -> Any:
    """A per-element helper, inlined into the kernel that calls it: an out-of-line call in a
    loop body stops LLVM from vectorizing the loop. Numba copies the helper's IR, and that of
    the helpers it inlines, at every call site: compile time grows with the copies (the
    regression kernel went from 1.0 to 4.6 s a variant with eight copies of an element
    function holding all four losses), so check it after adding a call site."""
    return numba.njit(inline="always", **JIT_OPTIONS)(fn)


@numba.njit(inline="always", **JIT_OPTIONS)
def tree_sum(buf):
    """Sum ``buf`` (float64, power-of-two length, destroyed) by halving: a fixed order that
    vectorizes, where ``s += x`` is one serial add chain without fastmath.

    Kernels compute a block's per-element losses into ``buf`` (zero-padding a short block),
    then add ``tree_sum(buf)`` to the chunk's partial. Numba caches a kernel keyed on its own
    source file: after editing this function, clear the ``__pycache__`` of the kernels."""
    h = buf.size // 2
    while h >= 1:
        for i in range(h):
            buf[i] = buf[i] + buf[i + h]
        h //= 2
    return buf[0]


@numba.njit(inline="always", **JIT_OPTIONS)
def widened_sum(values, m, scratch):
    """``tree_sum`` of ``values[:m]`` widened to float64 and zero-padded to ``scratch.size``
    (a power of two >= 2, at least ``m``), with the tree's first level taken while widening:
    the same sum, without writing the padded copy. For a block or row of float32 terms
    (binary losses, cross-entropy rows over 256 classes): 5-15% off those kernels."""
    h = scratch.size // 2
    paired = max(m - h, 0)
    single = min(m, h)
    for j in range(paired):
        scratch[j] = np.float64(values[j]) + np.float64(values[j + h])
    for j in range(paired, single):
        scratch[j] = values[j]
    scratch[single:h] = 0.0
    return tree_sum(scratch[:h])


@jit
def padded(n):
    """The power of two >= ``n``: the length of a buffer that ``tree_sum`` reduces."""
    p = 1
    while p < n:
        p *= 2
    return p


@intrinsic
def wide_vectors(typingctx):
    """Called in a kernel's loop body (inside ``prange``, so that it lands in the function
    Numba makes of the parallel loop): LLVM may vectorize that function with 512-bit
    registers where the CPU has them. LLVM's tuning for Intel's AVX-512 cores prefers 256
    bits (older ones lower their clock on 512-bit work); for the exp/log kernels 512 bits
    measured 15-20% faster on an Intel Xeon (binary_cross_entropy 10^6 float32: 0.91 -> 0.73
    ms). A function attribute, so it changes no other code in the process (Numba's own
    ``NUMBA_CPU_FEATURES`` would change all of it) and results not at all. Where llvmlite
    refuses the attribute, nothing is added."""

    def codegen(context, builder, signature, args):
        with contextlib.suppress(Exception):
            # llvmlite's FunctionAttributes.add knows no string attributes; the set takes it
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return nb_types.void(), codegen


@numba.njit(inline="always", **JIT_OPTIONS)
def ordered_sum(partials):
    """The chunk partials of a reduction added in chunk order: the last step of every
    kernel's sum, what makes it the same for any thread count."""
    total = 0.0
    for c in range(partials.size):
        total += partials[c]
    return total


@numba.njit(inline="always", **JIT_OPTIONS)
def finish_element(k, loss, g, ws, ls, gs, gos, scale):
    """The end of an element-wise kernel's loop body for element ``k`` of a block, given its
    loss and derivative: the weight, the per-element loss, the gradient (times
    ``grad_output`` and ``scale``); returns the (weighted) loss for the kernel's sum. Absent
    arrays are ``None`` (compiled out), so the loop still vectorizes."""
    if ws is not None:
        loss *= ws[k]
        g *= ws[k]
    if ls is not None:
        ls[k] = loss
    if gs is not None:
        if gos is not None:
            g *= gos[k]
        gs[k] = g * scale
    return loss


@numba.njit(inline="always", **JIT_OPTIONS)
def no_hessian(x, y, a, p):
    """The ``hessian`` of a formula that has none: never called (``grad_hess`` is not
    offered), typed all the same."""
    return x * np.nan


@numba.njit(inline="always", **JIT_OPTIONS)
def no_transform(z, p):
    """The ``transform`` of a softmax formula that has none: never called, typed all the
    same."""
    return z, z


@numba.njit(inline="always", **JIT_OPTIONS)
def finish_derivative(k, h, ws, hs, gos, scale):
    """Element ``k``'s second output ``h`` (Hessian diagonal, or gradient with respect to the
    target) weighted and scaled as ``finish_element`` does the gradient; nothing when there
    is none to write (``hs`` is ``None``)."""
    if hs is not None:
        if ws is not None:
            h *= ws[k]
        if gos is not None:
            h *= gos[k]
        hs[k] = h * scale


class KernelPair:
    """One kernel body compiled twice: serial for inputs under ``parallel_min`` elements,
    parallel (``prange``) for larger ones. The variants get distinct names so Numba's
    on-disk cache keeps both. ``name`` and ``namespace`` (globals overlaid on the body's)
    make a template body into one formula's kernel (``lossforge.kernels``)."""

    def __init__(
        self,
        fn: Callable,
        parallel_min: int = PARALLEL_MIN,
        name: str | None = None,
        namespace: dict[str, Any] | None = None,
    ):
        name = name or fn.__name__
        self.serial = numba.njit(parallel=False, **JIT_OPTIONS)(
            clone(fn, f"{name}_serial", namespace)
        )
        self.parallel = numba.njit(parallel=True, **JIT_OPTIONS)(
            clone(fn, f"{name}_parallel", namespace)
        )
        self.parallel_min = parallel_min
        self.__doc__ = fn.__doc__
        self.__name__ = name

    def __call__(self, n: int, *args: Any) -> Any:
        """Run on ``n`` elements of work, choosing the variant by size."""
        if n < self.parallel_min or _serial_only:
            return self.serial(*args)
        global _parallel_guard
        with _parallel_guard:
            result = self.parallel(*args)
        if _parallel_guard is _workqueue_lock and numba.threading_layer() != "workqueue":
            _parallel_guard = contextlib.nullcontext()
        return result


# Numba's fallback threading layer ("workqueue") aborts the process when two Python threads
# enter parallel kernels at once; parallel calls are serialised until the layer is known to
# be OpenMP or TBB.
_workqueue_lock = threading.Lock()
_parallel_guard: Any = _workqueue_lock

# GNU OpenMP (Numba's "omp" layer on Linux) cannot run a parallel region in a child of fork()
# once the parent has started its thread pool: Numba kills such a child with SIGTERM
# ("fork() called from a process already using GNU OpenMP, this is unsafe") and a fork-based
# pool's map never returns. Such a child, and the children it forks in turn, run the serial
# variants: the same body and chunks, so the same bits, on one thread. The TBB and workqueue
# layers are fork-safe and keep their threads in a child.
_serial_only = False


def _gnu_openmp_started() -> bool:
    try:
        layer = numba.threading_layer()
    except ValueError:  # Numba has not started its threads: a child starts its own
        return False
    omppool = sys.modules.get("numba.np.ufunc.omppool")
    return layer == "omp" and getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def _after_fork_in_child() -> None:
    global _serial_only, _workqueue_lock, _parallel_guard
    _serial_only = _serial_only or _gnu_openmp_started()
    # a lock held by another thread of the parent at fork() would stay held in the child
    if _parallel_guard is _workqueue_lock:
        _workqueue_lock = _parallel_guard = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def parallel_kernel(fn: Callable | None = None, *, parallel_min: int = PARALLEL_MIN) -> Any:
    """Decorator, bare or with ``parallel_min``: see :class:`KernelPair`."""
    if fn is None:
        return lambda f: KernelPair(f, parallel_min)
    return KernelPair(fn, parallel_min)


def ready_elementwise(arrays: tuple[Any, ...], out: Any) -> tuple[Any, ...] | None:
    """For the ``KernelSpec.fast`` of an element-wise loss of (input, target): when both are
    NumPy arrays as kernels take them (``validate.ready_arrays``, not empty) and ``out`` is
    ``None`` or ready too (sharing no memory with them), ``(x, y, out, grad)``: flat views of
    the arguments, ``out`` (allocated if ``None``) and a flat view of it for the kernel to
    write. Else ``None``: the general path handles the call."""
    if len(arrays) != 2:
        return None
    dtype = validate.ready_arrays(arrays)
    if dtype is None or arrays[0].size == 0:
        return None
    x, y = arrays
    if out is None:
        out = np.empty(x.shape, dtype)
    elif not validate.ready_out(out, x.shape, dtype, arrays):
        return None  # an out that overlaps an input included: the general path refuses it
    return x.ravel(), y.ravel(), out, out.ravel()


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` Numba threads (a per-thread setting in Numba), restoring the
    previous count after."""
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


# -- template bodies (lossforge.kernels): ``formula`` and ``invalid`` are a loss's, given
# to each kernel made from them through ``KernelPair(namespace=...)`` -----------------------


@numba.njit(inline="always", **JIT_OPTIONS)
def _at(values, k, absent):
    """``values[k]``, or ``absent`` when there are no values (``None``: compiled out)."""
    if values is None:
        return absent
    return values[k]


def float64_elementwise(x, y, w, a, p, loss_out, grad_out, grad2_out, hess_out, go, scale, wide):
    """An element-wise formula in float64 over flat arrays (absent ones ``None``, compiled
    out): the loss of element ``k`` of every ``TILE``-element tile of a chunk goes to running
    sum ``k`` (adds along a vector, not across it; whole tiles run a loop of constant length,
    which vectorizes without a remainder loop), ``tree_sum`` adds the 64 sums at the chunk's
    end. ``wide``: ``True`` for 512-bit vectors, ``None`` not (a None argument is pruned
    before lowering: two compilations of one body). ``grad2_out``: the gradient with respect
    to the target, from the ``target_grad`` formula; ``hess_out``: the Hessian diagonal, from
    the ``hessian`` formula, for ``grad_hess`` (each ``None`` when not wanted, compiled
    out)."""
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    partials = np.empty(chunks)
    for c in prange(chunks):
        if wide is not None:
            wide_vectors()
        sums = np.zeros(TILE)
        end = min(c * CHUNK + CHUNK, n)
        whole = end - end % TILE  # only the last chunk can end in a partial tile
        for lo in range(c * CHUNK, whole, BLOCK):
            hi = min(lo + BLOCK, whole)
            xs = x[lo:hi]
            ys = y[lo:hi]
            as_ = None if a is None else a[lo:hi]
            ws = None if w is None else w[lo:hi]
            ls = None if loss_out is None else loss_out[lo:hi]
            gs = None if grad_out is None else grad_out[lo:hi]
            hs = None if hess_out is None else hess_out[lo:hi]
            g2s = None if grad2_out is None else grad2_out[lo:hi]
            gos = None if go is None else go[lo:hi]
            for t0 in range(0, xs.size, TILE):
                for k in range(TILE):
                    j = t0 + k
                    xj = np.float64(xs[j])
                    yj = np.float64(ys[j])
                    aj = np.float64(_at(as_, j, 1.0))
                    loss, g = formula(xj, yj, aj, p)
                    if hs is not None:
                        finish_derivative(j, hessian(xj, yj, aj, p), ws, hs, gos, scale)
                    if g2s is not None:
                        finish_derivative(j, target_grad(xj, yj, aj, p), ws, g2s, gos, scale)
                    sums[k] += finish_element(j, loss, g, ws, ls, gs, gos, scale)
        for k in range(end - whole):  # under 64 elements
            j = whole + k
            xj = np.float64(x[j])
            yj = np.float64(y[j])
            aj = np.float64(_at(a, j, 1.0))
            loss, g = formula(xj, yj, aj, p)
            if hess_out is not None:
                finish_derivative(j, hessian(xj, yj, aj, p), w, hess_out, go, scale)
            if grad2_out is not None:
                finish_derivative(j, target_grad(xj, yj, aj, p), w, grad2_out, go, scale)
            sums[k] += finish_element(j, loss, g, w, loss_out, grad_out, go, scale)
        partials[c] = tree_sum(sums)
    return ordered_sum(partials)


def native_elementwise(x, y, w, a, p, loss_out, grad_out, grad2_out, hess_out, go, scale, wide):
    """An element-wise formula in the input's precision over flat arrays (float32 runs 16
    lanes a vector): a block's losses, stored in that precision (a float64 store in the loop
    would halve its vector width), are widened and summed by ``widened_sum``; the chunk adds
    its blocks in order."""
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    partials = np.empty(chunks)
    one = mathfn.like(x, 1.0)
    scale = mathfn.like(x, scale)
    for c in prange(chunks):
        if wide is not None:
            wide_vectors()
        losses = np.empty(BLOCK, x.dtype)
        buf = np.empty(BLOCK)
        s = 0.0
        end = min(c * CHUNK + CHUNK, n)
        for lo in range(c * CHUNK, end, BLOCK):
            hi = min(lo + BLOCK, end)
            xs = x[lo:hi]
            ys = y[lo:hi]
            as_ = None if a is None else a[lo:hi]
            ws = None if w is None else w[lo:hi]
            ls = None if loss_out is None else loss_out[lo:hi]
            gs = None if grad_out is None else grad_out[lo:hi]
            hs = None if hess_out is None else hess_out[lo:hi]
            g2s = None if grad2_out is None else grad2_out[lo:hi]
            gos = None if go is None else go[lo:hi]
            for k in range(hi - lo):
                ak = _at(as_, k, one)
                loss, g = formula(xs[k], ys[k], ak, p)
                if hs is not None:
                    finish_derivative(k, hessian(xs[k], ys[k], ak, p), ws, hs, gos, scale)
                if g2s is not None:
                    finish_derivative(k, target_grad(xs[k], ys[k], ak, p), ws, g2s, gos, scale)
                losses[k] = finish_element(k, loss, g, ws, ls, gs, gos, scale)
            s += widened_sum(losses, hi - lo, buf)
        partials[c] = s
    return ordered_sum(partials)


def count_invalid(x, y):
    """How many elements a formula's ``invalid`` flags (nan is for the formula to decide).
    Counted without branches, so the loop vectorizes; a search for the first one stops
    vectorization and cost more than the loss itself."""
    n = x.size
    chunks = (n + CHUNK - 1) // CHUNK
    counts = np.empty(chunks, np.int64)
    for c in prange(chunks):
        lo = c * CHUNK
        xs = x[lo : min(lo + CHUNK, n)]
        ys = y[lo : min(lo + CHUNK, n)]
        count = 0
        for i in range(xs.size):
            count += invalid(xs[i], ys[i])
        counts[c] = count
    return counts.sum()


def first_invalid(x, y):
    """The index of the first element ``invalid`` flags, or -1 (after ``count_invalid``
    found one: this search runs on bad input only)."""
    for i in range(x.size):
        if invalid(x[i], y[i]):
            return i
    return -1


def rowwise(x1, x2, t, p, loss_out, g1_out, g2_out, go, scale):
    """Pairs of rows ``(R, D)`` through a row formula: one pass over a row pair for the three
    sums of its ``terms`` (float64, each by ``tree_sum`` over a scratch row: a fixed order
    that vectorizes, where ``s += x * y`` is a serial add chain), the row's value and
    gradient coefficients from ``row``, a second pass over the same (cached) rows for both
    gradients. Chunks of whole rows (about ``CHUNK`` elements each), blocks of ``BLOCK``
    rows' values summed by ``tree_sum``, chunk partials added in order."""
    rows, dim = x1.shape
    per_chunk = max(1, CHUNK // max(dim, 1))
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    for c in prange(chunks):
        products = np.empty((3, padded(dim)))
        buf = np.empty(BLOCK)
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                a = x1[i]
                b = x2[i]
                pu = products[0]
                pv = products[1]
                pw = products[2]
                for k in range(dim):
                    u, v, w = terms(np.float64(a[k]), np.float64(b[k]))
                    pu[k] = u
                    pv[k] = v
                    pw[k] = w
                products[:, dim:] = 0.0
                sums = (tree_sum(pu), tree_sum(pv), tree_sum(pw))
                value, c0, c1, c2 = row(sums, 0.0 if t is None else t[i], p)
                if loss_out is not None:
                    loss_out[i] = value
                if g1_out is not None:
                    g = scale if go is None else scale * np.float64(go[i])
                    c0 *= g
                    c1 *= g
                    c2 *= g
                    ga = g1_out[i]
                    gb = g2_out[i]
                    for k in range(dim):
                        da, db = grads(np.float64(a[k]), np.float64(b[k]), c0, c1, c2)
                        ga[k] = da
                        gb[k] = db
                buf[i - lo] = value
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    return ordered_sum(partials)


@numba.njit(inline="always", **JIT_OPTIONS)
def softmax_row(zs, e, scratch):
    """Writes ``exp(z - max)`` into ``e[:C]`` (the logits' dtype: float32 rows run 16 lanes)
    and returns (log-sum-exp, sum of ``e``) in float64, the sum by a fixed tree (fused into
    the widening, ``widened_sum``)."""
    classes = zs.size
    m = mathfn.array_max(zs)  # exact; a nan row gives nan (exp of nan)
    for j in range(classes):
        e[j] = mathfn.exp_nonpositive(zs[j] - m)
    total = widened_sum(e, classes, scratch)
    return np.float64(m) + np.log(total), total


def softmax_rows(
    z, t, y, w, p, ignore_index, smoothing, transformed, loss_out, grad_out, go, scale
):
    """Rows of logits ``z`` ``(R, C)`` through a softmax row formula (``lossforge.kernels.
    Softmax``): class indices ``t`` (rows whose target is ``ignore_index`` count 0) or, when
    ``t`` is empty, probabilities ``y``; class weights ``w``, label ``smoothing``, the
    per-logit ``transform`` when ``transformed``. Absent arrays are empty (``grad_out``
    ``(0, 0)``): one compiled signature per dtype and variant, since each costs seconds of
    cold compile for every loss made from the template. Each row is read for its maximum,
    its exponentials (kept in a row buffer) and its gradient, written once. Chunks of whole
    rows (about ``CHUNK`` elements), blocks of ``BLOCK`` rows' losses summed by
    ``tree_sum``, chunk partials added in order: the same bits for any thread count."""
    rows, classes = z.shape
    per_chunk = max(1, CHUNK // max(classes, 1))
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    width = padded(classes)
    indices = t.size > 0 or y.size == 0
    weighted = w.size > 0
    want_loss = loss_out.size > 0
    want_grad = grad_out.shape[0] > 0
    upstream = go.size > 0
    direct = indices and smoothing == 0.0
    keep = 1.0 - smoothing
    off = smoothing / classes if classes else 0.0
    for c in prange(chunks):
        wide_vectors()
        buf = np.empty(BLOCK)
        e = np.empty(width, z.dtype)
        capped = np.empty(width, z.dtype)
        slope = np.empty(width, z.dtype)
        scratch = np.empty(max(width, 2))
        coefficients = np.empty(width)
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                k = t[i] if indices else -1
                if indices and k == ignore_index:
                    loss = 0.0
                    if want_grad:
                        grad_out[i, :] = 0.0
                else:
                    zs = z[i]
                    if transformed:
                        for j in range(classes):
                            capped[j], slope[j] = transform(zs[j], p)
                        zs = capped[:classes]
                    lse, total = softmax_row(zs, e, scratch)
                    g = scale * np.float64(go[i]) if upstream else scale
                    if direct:  # one target class: one formula call
                        wt = np.float64(w[k]) if weighted else 1.0
                        value, a, b = row(np.float64(zs[k]) - lse, lse, p)
                        loss = wt * value
                        if want_grad:
                            gs = grad_out[i]
                            big_a = mathfn.like(z, wt * a * g / total)
                            for j in range(classes):
                                gs[j] = big_a * e[j]
                            gs[k] += wt * b * g
                    else:  # the target distribution: a formula call per class
                        loss = 0.0
                        big_a = 0.0
                        for j in range(classes):
                            if indices:
                                q = off + (keep if j == k else 0.0)
                            else:
                                q = keep * np.float64(y[i, j]) + off
                            if weighted:
                                q *= np.float64(w[j])
                            value, a, b = row(np.float64(zs[j]) - lse, lse, p)
                            loss += q * value
                            big_a += q * a
                            coefficients[j] = q * b * g
                        if want_grad:
                            gs = grad_out[i]
                            big_a *= g / total
                            for j in range(classes):
                                gs[j] = big_a * np.float64(e[j]) + coefficients[j]
                    if want_grad and transformed:
                        gs = grad_out[i]
                        for j in range(classes):
                            gs[j] *= slope[j]
                if want_loss:
                    loss_out[i] = loss
                buf[i - lo] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    return ordered_sum(partials)
