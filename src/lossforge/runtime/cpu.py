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
import math
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
from lossforge.kernels import clone, helpers
from lossforge.kernels import unspecialised as check_targets_serial
from lossforge.kernels import unspecialised as few_serial
from lossforge.kernels import unspecialised as formula
from lossforge.kernels import unspecialised as grads
from lossforge.kernels import unspecialised as hessian
from lossforge.kernels import unspecialised as index_serial
from lossforge.kernels import unspecialised as invalid
from lossforge.kernels import unspecialised as row
from lossforge.kernels import unspecialised as row_hessian
from lossforge.kernels import unspecialised as target_grad
from lossforge.kernels import unspecialised as terms
from lossforge.kernels import unspecialised as transform
from lossforge.kernels import unspecialised as transform_hessian
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
    function holding all four losses), so check it after adding a call site. The helpers
    ``fn`` calls (``kernels.helpers``) are inlined too."""
    inlined = {name: inline(h) for name, h in helpers(fn).items()}
    fn = clone(fn, fn.__name__, inlined) if inlined else fn
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
def no_transform_hessian(z, zt, slope, p):
    """The ``transform_hessian`` of a softmax formula without a transform: never called."""
    return z * 0.0


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


# -- softmax losses (``lossforge.kernels.Softmax``) -------------------------------------
# Three kernels, chosen by the shape of the work: class-index rows of few classes (transposed,
# vectorized across rows), longer class-index rows, probability targets. The class weights,
# ``smoothing`` (index rows), ``long_rows`` and ``transformed`` (the per-logit transform)
# are ``None`` or not: Numba compiles each case without the others' code. With those as
# run-time flags in one kernel, cross entropy ran 18 ms instead of 3 on 10^5 rows of 10
# classes (one thread) and 20% slower on rows of 100 (the transform's flag alone); the
# hand-written kernels measured the smoothing code alone at 15-20% there. The outputs
# (``loss_out``, ``grad_out`` (0, 0)) and ``go`` are empty when absent, tested once a row or
# a block: as types too they multiplied the compiled variants (126 for the four softmax
# losses' tests, CI's suite several minutes longer).

#: Rows of up to this many classes sum their exponentials through a widened copy and
#: ``tree_sum``, longer ones through ``widened_sum`` (the tree's first level fused into the
#: widening): on short rows the fused form measured 4-5% slower.
SHORT_ROW_CLASSES = 256

#: Class-index rows of at most this many classes run ``softmax_few``, vectorized across rows:
#: the crossover measured for cross entropy on 10^6 logits, float32 and float64. The row
#: kernel's time depends on C modulo the vector width (rows of 32 classes run 40-60% faster
#: than rows of 31), the transposing kernel's hardly at all.
FEW_CLASSES = 31

#: Rows transposed at a time by ``softmax_few``. Reading a class across 256 rows of 256
#: bytes (float64 C = 32, float32 C = 64) touched a quarter of L1's sets and evicted its own
#: lines: 2.3x slower than 128 rows, which are also 5-15% faster for other float32 counts.
ROW_BLOCK = 128

#: The default ``ignore_index`` of the softmax losses (PyTorch's), which the fast lane takes.
IGNORE_INDEX = -100

#: A softmax formula's ``constant_coefficients`` (``kernels.Softmax``), a compile-time
#: constant of each formula's kernels.
constant_coefficients = False


def long_rows_for(classes):
    """The ``long_rows`` argument of the row kernels: ``None`` for rows of up to
    ``SHORT_ROW_CLASSES``, ``True`` for longer ones. A type, not a value: each kind of row
    compiles into a kernel of its own, without the other's code. With both in one kernel,
    chosen per row, the serial variant ran rows of 32 to 128 classes 30-45% slower (LLVM
    optimised its row loop less well; the parallel variant's was not affected)."""
    return True if classes > SHORT_ROW_CLASSES else None


@numba.njit(inline="always", **JIT_OPTIONS)
def class_weight(w, j):
    return 1.0 if w is None else np.float64(w[j])


@jit
def total_class_weight(w, classes):
    """The summed class weights (the class count without weights), for label smoothing."""
    if w is None:
        return float(classes)
    total = 0.0
    for j in range(classes):
        total += np.float64(w[j])
    return total


@jit
def rows_per_chunk(classes):
    return max(1, CHUNK // max(classes, 1))


@numba.njit(inline="always", **JIT_OPTIONS)
def softmax_row(zs, e, scratch, long_rows):
    """Writes ``exp(z - max)`` into ``e[:C]`` (the logits' dtype: float32 rows run 16 lanes)
    and returns (log-sum-exp, sum of ``e``) in float64; only the sum is widened, into
    ``scratch``."""
    classes = zs.size
    m = mathfn.array_max(zs)  # exact; a nan row gives nan (exp of nan)
    for j in range(classes):
        e[j] = mathfn.exp_nonpositive(zs[j] - m)
    if long_rows is not None:
        total = widened_sum(e, classes, scratch)
    else:
        for j in range(classes):
            scratch[j] = e[j]
        scratch[classes:] = 0.0
        total = tree_sum(scratch)
    return np.float64(m) + np.log(total), total


def _check_class_targets(t, classes, ignore_index, w):
    """(how many class indices ``t`` are out of range, summed weight of the others: the
    "mean" denominator), counted without branches so that the pass vectorizes (a search that
    stops at the first bad target does not), per chunk, the partials added in chunk order."""
    n = t.size
    chunks = (n + CHUNK - 1) // CHUNK
    bad = np.empty(chunks, np.int64)
    partials = np.empty(chunks)
    for c in prange(chunks):
        ts = t[c * CHUNK : min(c * CHUNK + CHUNK, n)]
        count = 0
        kept = 0
        for i in range(ts.size):
            k = ts[i]
            counted = k != ignore_index
            count += counted & ((k < 0) | (k >= classes))
            kept += counted
        bad[c] = count
        if w is None:
            partials[c] = kept
        else:  # a gather: weights of the counted targets
            s = 0.0
            for i in range(ts.size):
                k = ts[i]
                if k != ignore_index and k >= 0 and k < classes:
                    s += np.float64(w[k])
            partials[c] = s
    return bad.sum(), ordered_sum(partials)


# a scan of the targets alone, cheap enough to stay serial longest: measured through the
# public API on 2 threads, nll_loss's parallel calls broke even at 131072-262144 elements
check_class_targets = KernelPair(
    _check_class_targets, parallel_min=1 << 17, name="check_class_targets"
)


def softmax_index(
    z, t, w, p, ignore_index, smoothing, long_rows, transformed, loss_out, grad_out, go, scale
):
    """Rows of logits ``z`` ``(R, C)`` with class indices ``t`` through a softmax row
    formula: the target's row formula call, and with label ``smoothing`` (else ``None``) a
    call a class for the smoothing mass ``smoothing / C`` on every class. Each row is read
    for its maximum, its exponentials (kept in a row buffer) and its gradient, written once.
    Chunks of whole rows (about ``CHUNK`` elements), blocks of ``BLOCK`` rows' losses summed
    by ``tree_sum``, chunk partials added in order: the same bits for any thread count."""
    rows, classes = z.shape
    per_chunk = rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    want_loss = loss_out.size > 0
    want_grad = grad_out.shape[0] > 0
    upstream = go.size > 0
    width = padded(classes)
    off = 0.0 if smoothing is None else smoothing / classes
    keep = 1.0 if smoothing is None else 1.0 - smoothing
    total_weight = total_class_weight(w, classes)
    for c in prange(chunks):
        wide_vectors()
        buf = np.empty(BLOCK)
        e = np.empty(width, z.dtype)
        capped = np.empty(width, z.dtype)
        slope = np.empty(width, z.dtype)
        shifts = np.empty(width, z.dtype)
        scratch = np.empty(max(width, 2))
        coefficients = np.empty(max(width, 2))
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                k = t[i]
                if k == ignore_index:
                    loss = 0.0
                    if want_grad:
                        grad_out[i, :] = 0.0
                else:
                    zs = z[i]
                    if (
                        transformed is not None
                    ):  # the formula's per-logit transform (its slope kept)
                        for j in range(classes):
                            capped[j], slope[j] = transform(zs[j], p)
                        zs = capped[:classes]
                    lse, total = softmax_row(zs, e, scratch, long_rows)
                    hit = keep * class_weight(w, k)
                    value, a, b = row(np.float64(zs[k]) - lse, lse, p)
                    loss = hit * value
                    big_a = hit * a
                    g = scale * np.float64(go[i]) if upstream else scale
                    if smoothing is not None:  # sums by trees, which vectorize
                        mass = off * total_weight
                        if constant_coefficients:  # affine in logp: summed from sum w z
                            for j in range(classes):
                                scratch[j] = class_weight(w, j) * np.float64(zs[j])
                            scratch[classes:] = 0.0
                            wz = off * tree_sum(scratch)
                            loss += mass * row(0.0, lse, p)[0] + b * (wz - mass * lse)
                            big_a += mass * a
                        else:
                            for j in range(classes):
                                q = off * class_weight(w, j)
                                vj, aj, bj = row(np.float64(zs[j]) - lse, lse, p)
                                scratch[j] = q * vj
                                coefficients[j] = q * aj
                                shifts[j] = mathfn.like(z, q * bj * g)
                            scratch[classes:] = 0.0
                            coefficients[classes:] = 0.0
                            loss += tree_sum(scratch)
                            big_a += tree_sum(coefficients)
                    if want_grad:
                        gs = grad_out[i]
                        # in the logits' dtype, like e: keeps float32 rows 16 lanes wide
                        scaled_a = mathfn.like(z, big_a * g / total)
                        if smoothing is None:
                            for j in range(classes):
                                gs[j] = scaled_a * e[j]
                        elif not constant_coefficients:
                            for j in range(classes):
                                gs[j] = scaled_a * e[j] + shifts[j]
                        else:  # the smoothing mass's b, the same for every class
                            shift = mathfn.like(z, off * b * g)
                            if w is None:
                                for j in range(classes):
                                    gs[j] = scaled_a * e[j] + shift
                            else:
                                for j in range(classes):
                                    gs[j] = scaled_a * e[j] + shift * w[j]
                        gs[k] += hit * b * g
                        if transformed is not None:
                            for j in range(classes):
                                gs[j] *= slope[j]
                if want_loss:
                    loss_out[i] = loss
                buf[i - lo] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    return ordered_sum(partials)


def softmax_few(z, t, w, p, ignore_index, smoothing, transformed, loss_out, grad_out, go, scale):
    """``softmax_index`` for few classes (C <= ``FEW_CLASSES``; ``smoothing`` a number,
    0 for none): blocks of ``ROW_BLOCK`` rows are transposed to (C, rows) so that every loop
    runs along rows, where it vectorizes; a row-by-row kernel spends its time in loop
    overhead on rows of a few elements."""
    rows, classes = z.shape
    per_chunk = rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    want_loss = loss_out.size > 0
    want_grad = grad_out.shape[0] > 0
    upstream = go.size > 0
    off = smoothing / classes if classes else 0.0
    keep = 1.0 - smoothing
    mass = off * total_class_weight(w, classes)
    for c in prange(chunks):
        wide_vectors()
        first = c * per_chunk
        end = min(first + per_chunk, rows)
        # per-class columns in the logits' dtype (float32: 16 lanes), sums widened to float64.
        # Few allocations, no longer than the chunk: on small inputs allocating and zeroing
        # cost as much as the rows.
        block = min(ROW_BLOCK, end - first)
        narrow = np.empty((2 * classes + 3, block), z.dtype)
        zt = narrow[:classes]  # logits (transformed), then the gradient, transposed
        et = narrow[classes : 2 * classes]
        m = narrow[2 * classes]
        row_a = narrow[2 * classes + 1]  # the gradient is row_a e + shifts (+ the target's)
        row_shift = narrow[2 * classes + 2]  # shifts of constant coefficients: row_shift w
        # the smoothing's per-logit gradient terms and the transform's slopes, where needed
        # (allocated alongside the others, rows 10 classes ran 7% slower)
        per_logit = off != 0.0 and not constant_coefficients
        shifts = np.empty((classes if per_logit else 0, block), z.dtype)
        slopes = np.empty((0 if transformed is None else classes, block), z.dtype)
        wide = np.zeros((4, block))
        sums = wide[0]  # of the exponentials, then their reciprocals
        lse = wide[1]
        smooth_loss = wide[2]
        smooth_a = wide[3]
        gs = np.empty(block)  # each row's grad_output * scale
        losses = np.zeros(padded(end - first))  # zero padding: the tree's sum is the same
        for r0 in range(first, end, ROW_BLOCK):
            nb = min(ROW_BLOCK, end - r0)
            zb = z.reshape(-1)[r0 * classes : (r0 + nb) * classes]
            for j in range(classes):
                col = zt[j]
                for r in range(nb):
                    col[r] = zb[r * classes + j]
            if transformed is not None:
                for j in range(classes):
                    col = zt[j]
                    scol = slopes[j]
                    for r in range(nb):
                        col[r], scol[r] = transform(col[r], p)
            m[:nb] = zt[0, :nb]
            for j in range(classes):
                col = zt[j]
                for r in range(nb):
                    m[r] = col[r] if col[r] > m[r] else m[r]
            sums[:nb] = 0.0
            for j in range(classes):
                col = zt[j]
                ecol = et[j]
                for r in range(nb):
                    ecol[r] = mathfn.exp_nonpositive(col[r] - m[r])
                for r in range(nb):
                    sums[r] += np.float64(ecol[r])
            for r in range(nb):  # vectorizes: the log and reciprocal of every row at once
                lse[r] = np.float64(m[r]) + mathfn.log(sums[r])
                sums[r] = 1.0 / sums[r]
            if upstream:
                for r in range(nb):
                    gs[r] = scale * np.float64(go[r0 + r])
            else:
                gs[:nb] = scale
            smooth_loss[:nb] = 0.0
            if off != 0.0:  # the smoothing mass on every class: a formula call a logit
                smooth_a[:nb] = 0.0
                for j in range(classes):
                    q = off * class_weight(w, j)
                    col = zt[j]
                    shift = shifts[j]
                    if constant_coefficients:  # affine in logp: sum w z, as softmax_index
                        for r in range(nb):
                            smooth_loss[r] += class_weight(w, j) * np.float64(col[r])
                    else:
                        for r in range(nb):
                            vj, aj, bj = row(np.float64(col[r]) - lse[r], lse[r], p)
                            smooth_loss[r] += q * vj
                            smooth_a[r] += q * aj
                            shift[r] = mathfn.like(z, q * bj * gs[r])
            for r in range(nb):
                i = r0 + r
                k = t[i]
                loss = 0.0
                row_a[r] = 0.0
                row_shift[r] = 0.0
                if k != ignore_index:
                    hit = keep * class_weight(w, k)
                    value, a, b = row(np.float64(zt[k, r]) - lse[r], lse[r], p)
                    loss = hit * value
                    big_a = hit * a
                    if constant_coefficients:  # no branch: mass and smooth_loss 0 unsmoothed
                        wz = off * smooth_loss[r]
                        loss += mass * row(0.0, lse[r], p)[0] + b * (wz - mass * lse[r])
                        big_a += mass * a
                        row_shift[r] = off * b * gs[r]
                    elif off != 0.0:
                        loss += smooth_loss[r]
                        big_a += smooth_a[r]
                    row_a[r] = big_a * gs[r] * sums[r]
                    gs[r] = hit * b * gs[r]  # now the target's own gradient term
                if want_loss:
                    loss_out[i] = loss
                losses[i - first] = loss
            if want_grad:
                for j in range(classes):
                    ecol = et[j]
                    gcol = zt[j]
                    if constant_coefficients:
                        wj = mathfn.like(z, 1.0) if w is None else w[j]
                        for r in range(nb):
                            gcol[r] = row_a[r] * ecol[r] + row_shift[r] * wj
                    elif off != 0.0:
                        shift = shifts[j]
                        for r in range(nb):
                            gcol[r] = row_a[r] * ecol[r] + shift[r]
                    else:
                        for r in range(nb):
                            gcol[r] = row_a[r] * ecol[r]
                for r in range(nb):
                    k = t[r0 + r]
                    if k != ignore_index:
                        zt[k, r] += gs[r]
                    elif per_logit:  # an ignored row's gradient is 0
                        for j in range(classes):
                            zt[j, r] = 0.0
                if transformed is not None:
                    for j in range(classes):
                        gcol = zt[j]
                        scol = slopes[j]
                        for r in range(nb):
                            gcol[r] *= scol[r]
                gb = grad_out.reshape(-1)[r0 * classes : (r0 + nb) * classes]
                for j in range(classes):
                    gcol = zt[j]
                    for r in range(nb):
                        gb[r * classes + j] = gcol[r]
        partials[c] = tree_sum(losses)
    return ordered_sum(partials)


def softmax_probs(z, y, w, p, smoothing, long_rows, transformed, loss_out, grad_out, go, scale):
    """Rows of logits ``z`` ``(R, C)`` with class probabilities ``y`` ``(R, C)`` through a
    softmax row formula, a call a class: ``q_j = w_j ((1 - smoothing) y_j + smoothing /
    C)``, loss ``sum_j q_j l_j``, gradient ``A p_j + q_j b_j`` with ``A = sum_j q_j a_j``.
    Chunked as ``softmax_index``."""
    rows, classes = z.shape
    per_chunk = rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    want_loss = loss_out.size > 0
    want_grad = grad_out.shape[0] > 0
    upstream = go.size > 0
    width = padded(classes)
    off = smoothing / classes if classes else 0.0
    keep = 1.0 - smoothing
    for c in prange(chunks):
        wide_vectors()
        buf = np.empty(BLOCK)
        e = np.empty(width, z.dtype)
        capped = np.empty(width, z.dtype)
        slope = np.empty(width, z.dtype)
        scratch = np.empty(max(width, 2))
        coefficients = np.empty(max(width, 2))
        shifts = np.empty(width)
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                zs = z[i]
                ys = y[i]
                if transformed is not None:
                    for j in range(classes):
                        capped[j], slope[j] = transform(zs[j], p)
                    zs = capped[:classes]
                lse, total = softmax_row(zs, e, scratch, long_rows)
                for j in range(classes):
                    q = (keep * np.float64(ys[j]) + off) * class_weight(w, j)
                    vj, aj, bj = row(np.float64(zs[j]) - lse, lse, p)
                    scratch[j] = q * vj
                    coefficients[j] = q * aj
                    shifts[j] = q * bj
                scratch[classes:] = 0.0
                coefficients[classes:] = 0.0
                loss = tree_sum(scratch)
                big_a = tree_sum(coefficients) / total
                if want_grad:
                    g = scale * np.float64(go[i]) if upstream else scale
                    gs = grad_out[i]
                    for j in range(classes):
                        gs[j] = (big_a * e[j] + shifts[j]) * g
                    if transformed is not None:
                        for j in range(classes):
                            gs[j] *= slope[j]
                if want_loss:
                    loss_out[i] = loss
                buf[i - lo] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    return ordered_sum(partials)


def softmax_hessian(
    z,
    t,
    y,
    w,
    p,
    probabilities,
    ignore_index,
    smoothing,
    transformed,
    loss_out,
    grad_out,
    hess_out,
    go,
    scale,
):
    """``grad_hess`` of a softmax row formula with its ``row_hessian`` (``kernels.Softmax``),
    in float64 per row, for class indices ``t`` or, with ``probabilities``, targets ``y`` (the
    other length 0; absent ``w``, ``loss_out`` and ``go`` are length 0 too, and the options
    run-time values: one compiled signature per dtype, for a path that boosting calls once a
    round, not in an inner loop).

    A row's loss is ``sum_c Q_c f(u_c, v)`` with ``u_c = log p_c``, ``v = lse`` and ``Q_c =
    q_c w_c`` (target distribution times class weight). Since ``du_c/dz_j = [j == c] - p_j``
    and ``dv/dz_j = p_j``, each term's second derivative is ``a p_j (1 - p_j) + f_uu (d_jc -
    p_j)^2 + 2 f_uv (d_jc - p_j) p_j + f_vv p_j^2``, ``a = f_v - f_u``; summed over ``c``:
    ``A p_j (1 - p_j) + S p_j^2 + Q_j (f_uu_j (1 - 2 p_j) + 2 f_uv_j p_j)`` with ``A = sum_c
    Q_c a_c`` and ``S = sum_c Q_c (f_uu - 2 f_uv + f_vv)_c``. With a per-logit transform
    ``z' = T(z)`` (slope ``s``, curvature ``s'``) the chain rule gives ``h = h' s^2 + g' s'``
    from the derivatives ``g'``, ``h'`` with respect to ``z'``. The formulas are called for
    the classes the value kernels call them for (the target's alone without smoothing)."""
    rows, classes = z.shape
    per_chunk = rows_per_chunk(classes)
    chunks = (rows + per_chunk - 1) // per_chunk
    partials = np.empty(chunks)
    width = max(padded(classes), 2)
    off = smoothing / classes if classes else 0.0
    keep = 1.0 - smoothing
    weighted = w.size > 0
    every = probabilities or off != 0.0  # every class is in the target distribution
    for c in prange(chunks):
        buf = np.empty(BLOCK)
        # per class: logits (transformed), slopes, curvatures, exponentials, Q b, Q f_uu,
        # Q f_uv; then three padded rows for the tree sums of the loss, A and S
        per_class = np.empty((7, width))
        zq = per_class[0]
        slope = per_class[1]
        curve = per_class[2]
        e = per_class[3]
        qb = per_class[4]
        quu = per_class[5]
        quv = per_class[6]
        sums = np.zeros((3, width))
        s = 0.0
        end = min(c * per_chunk + per_chunk, rows)
        for lo in range(c * per_chunk, end, BLOCK):
            hi = min(lo + BLOCK, end)
            for i in range(lo, hi):
                k = -1 if probabilities else t[i]
                loss = 0.0
                if not probabilities and k == ignore_index:
                    grad_out[i, :] = 0.0
                    hess_out[i, :] = 0.0
                else:
                    zs = z[i]
                    for j in range(classes):
                        v = np.float64(zs[j])
                        zq[j] = v
                        if transformed:
                            zq[j], slope[j] = transform(v, p)
                            curve[j] = transform_hessian(v, zq[j], slope[j], p)
                    m = mathfn.array_max(zq[:classes])
                    for j in range(classes):
                        e[j] = math.exp(zq[j] - m)
                        sums[0, j] = e[j]
                    sums[0, classes:] = 0.0
                    total = tree_sum(sums[0])
                    lse = m + math.log(total)
                    if every:
                        for j in range(classes):
                            if probabilities:
                                q = keep * np.float64(y[i, j]) + off
                            else:
                                q = off + (keep if j == k else 0.0)
                            if weighted:
                                q *= np.float64(w[j])
                            vj, aj, bj = row(zq[j] - lse, lse, p)
                            uu, uv, vv = row_hessian(zq[j] - lse, lse, p)
                            sums[0, j] = q * vj
                            sums[1, j] = q * aj
                            sums[2, j] = q * (uu - 2.0 * uv + vv)
                            qb[j] = q * bj
                            quu[j] = q * uu
                            quv[j] = q * uv
                        sums[:, classes:] = 0.0
                        loss = tree_sum(sums[0])
                        big_a = tree_sum(sums[1])
                        big_s = tree_sum(sums[2])
                    else:  # the target's call alone: a quarter off rows of 10 classes
                        q = keep * np.float64(w[k]) if weighted else keep
                        vj, aj, bj = row(zq[k] - lse, lse, p)
                        uu, uv, vv = row_hessian(zq[k] - lse, lse, p)
                        loss = q * vj
                        big_a = q * aj
                        big_s = q * (uu - 2.0 * uv + vv)
                        qb[:classes] = 0.0
                        quu[:classes] = 0.0
                        quv[:classes] = 0.0
                        qb[k] = q * bj
                        quu[k] = q * uu
                        quv[k] = q * uv
                    g = scale * np.float64(go[i]) if go.size > 0 else scale
                    for j in range(classes):
                        pj = e[j] / total
                        gj = big_a * pj + qb[j]
                        hj = big_a * pj * (1.0 - pj) + big_s * pj * pj
                        hj += quu[j] * (1.0 - 2.0 * pj) + 2.0 * quv[j] * pj
                        if transformed:
                            hj = hj * slope[j] * slope[j] + gj * curve[j]
                            gj *= slope[j]
                        grad_out[i, j] = gj * g
                        hess_out[i, j] = hj * g
                if loss_out.size > 0:
                    loss_out[i] = loss
                buf[i - lo] = loss
            buf[hi - lo :] = 0.0
            s += tree_sum(buf)
        partials[c] = s
    return ordered_sum(partials)


def softmax_checked(x, t, out, p):
    """The fast lane of a softmax loss (``kernels.Softmax.fast``): the serial target check
    and kernel of a small call with the default options (class indices, ``ignore_index``
    -100, no weight, no smoothing, "mean") in one compiled call (each call from Python costs
    about 0.4 us): (sum of the losses, "mean" denominator), the denominator 0 when a target
    is out of range or every one is ignored."""
    bad, denominator = check_targets_serial(t, x.shape[1], IGNORE_INDEX, None)
    if bad or denominator == 0.0:
        return 0.0, 0.0
    scale = 1.0 / denominator
    nothing = np.empty(0, x.dtype)  # no per-row losses, no grad_output
    if x.shape[1] <= FEW_CLASSES:
        total = few_serial(x, t, None, p, IGNORE_INDEX, 0.0, None, nothing, out, nothing, scale)
    elif x.shape[1] <= SHORT_ROW_CLASSES:  # long_rows_for(classes), as a type in each branch
        total = index_serial(
            x, t, None, p, IGNORE_INDEX, None, None, None, nothing, out, nothing, scale
        )
    else:
        total = index_serial(
            x, t, None, p, IGNORE_INDEX, None, True, None, nothing, out, nothing, scale
        )
    return total, denominator
