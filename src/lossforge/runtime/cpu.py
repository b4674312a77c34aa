"""What every CPU kernel shares: how it is compiled, how it is chunked, when it goes parallel.

Determinism: a reduction splits its elements into chunks of ``CHUNK`` elements (boundaries
depend on the size only), writes one float64 partial per chunk, and adds the partials in
chunk order. The serial and the parallel variant of a kernel run the same body, so their
results are bitwise identical, and so are results for any thread count.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import numba
import numpy as np
from numba.core import types as nb_types
from numba.extending import intrinsic

from lossforge import validate

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


class KernelPair:
    """One kernel body compiled twice: serial for inputs under ``parallel_min`` elements,
    parallel (``prange``) for larger ones. The variants get distinct names so Numba's
    on-disk cache keeps both."""

    def __init__(self, fn: Callable, parallel_min: int = PARALLEL_MIN):
        self.serial = numba.njit(parallel=False, **JIT_OPTIONS)(_renamed(fn, "serial"))
        self.parallel = numba.njit(parallel=True, **JIT_OPTIONS)(_renamed(fn, "parallel"))
        self.parallel_min = parallel_min
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __call__(self, n: int, *args: Any) -> Any:
        """Run on ``n`` elements of work, choosing the variant by size."""
        if n < self.parallel_min:
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


def parallel_kernel(fn: Callable | None = None, *, parallel_min: int = PARALLEL_MIN) -> Any:
    """Decorator, bare or with ``parallel_min``: see :class:`KernelPair`."""
    if fn is None:
        return lambda f: KernelPair(f, parallel_min)
    return KernelPair(fn, parallel_min)


def _renamed(fn: Callable, suffix: str) -> Callable:
    clone = types.FunctionType(
        fn.__code__, fn.__globals__, f"{fn.__name__}_{suffix}", fn.__defaults__, fn.__closure__
    )
    clone.__qualname__ = f"{fn.__qualname__}_{suffix}"
    clone.__module__ = fn.__module__
    clone.__doc__ = fn.__doc__
    return clone


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
