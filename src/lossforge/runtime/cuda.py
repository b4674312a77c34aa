"""What every CUDA kernel shares: device arrays, launch configuration, deterministic
reductions, device-side error flags, streams, and results in the caller's array type.

Imported on the first CUDA call (``lossforge.dispatch.cuda_runtime``), never by ``import
lossforge``. Without a GPU, everything here runs under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, read when Numba is imported), which is how the test suite checks
the kernels; the kernels keep to what the real CUDA target compiles.

Arrays. ``as_device_array`` takes any object exposing ``__cuda_array_interface__`` (Numba
device arrays, CuPy arrays, PyTorch CUDA tensors, which are ``.detach()``-ed first) as a
zero-copy Numba device array, and copies host arrays to the device (``backend="cuda"``
forced on NumPy input). Kernels receive C-contiguous, native arrays of the compute dtype:
``as_contiguous`` copies on the device, with one gather kernel for any strides (transposed,
sliced, broadcast views) and any dtype conversion, and only when needed.

What comes back (``to_caller``). Arrays (per-element losses, gradients) are returned as the
caller's array type when the caller's arrays are CuPy arrays or PyTorch tensors, wrapped
zero-copy through their ``__cuda_array_interface__`` consumers (``cupy.asarray``,
``torch.as_tensor(..., device=...)``), and as Numba device arrays otherwise (Numba input, or
host input with ``backend="cuda"``). ``out=`` arrays are returned as the objects given. A
reduced value (``"mean"``/``"sum"``) is a host NumPy scalar, as on the CPU: the kernel calling
convention (``lossforge.hookspecs.KernelSpec``) returns the float total, so a reduced call
synchronizes once to read it back.

Determinism. A reduction never uses floating-point atomics: each block writes one float64
partial sum (a fixed tree over its threads' float64 accumulators, each thread summing a
fixed grid-stride sequence of elements) into a device array, and the host adds the
partials in block order. The grid depends only on the problem's shape (``THREADS`` and
``MAX_BLOCKS`` are constants, not tuned to the device), so results are bitwise identical
from run to run and on any GPU. (The simulator uses smaller constants, so its last bits
differ from a GPU's.)

Error flags. Data-dependent checks (class indices in range, ``binary_cross_entropy`` input
in [0, 1]) are made in the kernels: each block writes the smallest flat index of a bad
element it saw (or +inf) beside its partial sum, and the host reads both with one copy and
raises, naming the bad value (the first in memory order, as on the CPU). Kernels never read
or write out of bounds on bad input.

Streams. Kernels are launched on the stream of the call's arrays: PyTorch's current stream
(on the tensor's device) for torch tensors, CuPy's current stream for CuPy arrays, the bound
stream of a Numba device array, else the default stream. ``lossforge.dispatch.backend_of``
sets it per call (``begin_call``), per thread.
"""

from __future__ import annotations

import math
import sys
import threading
import types
from typing import Any

import numba
import numpy as np
from numba import cuda, float64

from lossforge.kernels import unspecialised as curvature
from lossforge.kernels import unspecialised as formula
from lossforge.kernels import unspecialised as grads
from lossforge.kernels import unspecialised as hessian
from lossforge.kernels import unspecialised as invalid
from lossforge.kernels import unspecialised as row
from lossforge.kernels import unspecialised as row_hessian
from lossforge.kernels import unspecialised as row_logit
from lossforge.kernels import unspecialised as store
from lossforge.kernels import unspecialised as target_grad
from lossforge.kernels import unspecialised as terms
from lossforge.kernels import unspecialised as transform
from lossforge.runtime import cache

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

try:  # numba-cuda keeps its own cache locators; Numba's built-in CUDA target shares the CPU's
    import numba.cuda.core.caching as _cuda_caching
except ImportError:
    pass
else:
    cache.install(_cuda_caching)

#: Threads per block (a power of two). Part of the numerical result (the shape of the
#: reduction trees): a constant, not a tuning knob. The simulator runs every thread as a
#: Python thread, so it gets a small block (and a small grid), which also makes tiny test
#: inputs exercise the grid-stride loops and the multi-element lanes.
THREADS = 16 if SIMULATOR else 256

#: Most blocks of a launch: grid-stride loops cover the rest. 1024 blocks of 256 threads
#: fill an H100 (132 SMs x 2048 threads) while keeping the partial sums few.
MAX_BLOCKS = 3 if SIMULATOR else 1024

#: Most dimensions of a non-contiguous array the gather kernel copies (after merging
#: dimensions that are contiguous with each other).
MAX_DIMS = 8

#: No element flagged (the error-flag row of a partials array).
NO_FLAG = math.inf


def kernel(fn: Any) -> Any:
    """A ``@cuda.jit`` kernel with the project's options (cached on disk)."""
    return cuda.jit(cache=True)(fn)


def device(fn: Any) -> Any:
    """A ``@cuda.jit(device=True)`` function. Numba caches a kernel keyed on its own source
    file: after editing a device function here, clear the ``__pycache__`` of the kernels."""
    return cuda.jit(device=True)(fn)


# -- launch configuration ---------------------------------------------------------------


def blocks_for(n: int) -> int:
    """Blocks of an element-wise grid-stride launch over ``n`` elements (a function of ``n``
    alone, so the reduction order is too)."""
    return max(1, min(MAX_BLOCKS, -(-n // THREADS)))


def rows_config(rows: int, columns: int) -> tuple[int, int]:
    """``(lanes, blocks)`` of a launch over rows: each row is handled by a group of ``lanes``
    threads (a power of two <= ``THREADS``, about the row's length: one thread per row for
    short rows, the whole block for long ones), ``THREADS // lanes`` rows per block per
    round, grid-stride over rounds."""
    lanes = 1
    while lanes < columns and lanes < THREADS:
        lanes *= 2
    per_block = THREADS // lanes
    return lanes, max(1, min(MAX_BLOCKS, -(-rows // per_block)))


# -- streams ------------------------------------------------------------------------------

_local = threading.local()
_external: dict[int, Any] = {}


def stream() -> Any:
    """The stream of the current call (0: Numba's default stream)."""
    return getattr(_local, "stream", 0)


def begin_call(arrays: Any) -> None:
    """Chooses the launch stream for a call from its arrays (see the module docstring)."""
    _local.stream = _stream_of(arrays)


def _stream_of(arrays: Any) -> Any:
    for a in arrays:
        if a is None:
            continue
        if _is_torch_cuda(a):
            torch = sys.modules["torch"]
            return _external_stream(torch.cuda.current_stream(a.device).cuda_stream)
        if type(a).__module__.startswith("cupy"):
            return _external_stream(sys.modules["cupy"].cuda.get_current_stream().ptr)
        bound = getattr(a, "stream", 0) if getattr(a, "__cuda_ndarray__", False) else 0
        if bound:
            return bound
    return 0


def _external_stream(handle: int) -> Any:
    if not handle or SIMULATOR:
        return 0
    found = _external.get(handle)
    if found is None:
        found = _external[handle] = cuda.external_stream(handle)
    return found


# -- arrays -------------------------------------------------------------------------------


def is_device_array(x: Any) -> bool:
    try:
        return bool(getattr(x, "__cuda_ndarray__", False)) or hasattr(x, "__cuda_array_interface__")
    except RuntimeError:  # a PyTorch CUDA tensor that requires grad
        return True


def _is_torch_cuda(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and bool(getattr(x, "is_cuda", False))


def _is_numba(x: Any) -> bool:
    return bool(getattr(x, "__cuda_ndarray__", False))


def as_device_array(x: Any) -> Any:
    """``x`` as a Numba device array: zero-copy for objects exposing
    ``__cuda_array_interface__`` (PyTorch tensors are detached first), a copy to the device
    for host arrays. A host array of a dtype the device cannot hold (object, strings) is
    returned as is, for validation to reject by its dtype."""
    if _is_numba(x):
        return x
    if _is_torch_cuda(x):  # its interface refuses tensors that require grad
        return _from_interface(x.detach())
    if hasattr(x, "__cuda_array_interface__"):
        return _from_interface(x)
    host = np.asarray(x)
    if host.dtype.kind not in "biufc":
        return host
    if not host.dtype.isnative:
        host = host.astype(host.dtype.newbyteorder("="))
    if not host.flags.c_contiguous:
        host = host.copy()
    return cuda.to_device(host, stream=stream())


class _HostInterface:
    """A ``__cuda_array_interface__`` seen as NumPy's ``__array_interface__``: under the
    simulator, "device" pointers are host pointers."""

    def __init__(self, owner: Any, desc: dict):
        self.owner = owner  # kept alive by the NumPy array's base
        self.__array_interface__ = {
            "shape": tuple(desc["shape"]),
            "typestr": desc["typestr"],
            "data": (desc["data"][0], False),
            "strides": desc.get("strides"),
            "version": 3,
        }


def _from_interface(x: Any) -> Any:
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(np.asarray(_HostInterface(x, x.__cuda_array_interface__)))
    # CuPy exports its current stream, the one kernels are launched on: no need to wait.
    sync = not type(x).__module__.startswith("cupy")
    return cuda.as_cuda_array(x, sync=sync)


def _view(array: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    """A view of ``array``'s memory with the given shape and byte strides."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(np.lib.stride_tricks.as_strided(array._ary, shape, strides))
    desc = {
        "shape": tuple(shape),
        "strides": tuple(strides),
        "typestr": array.dtype.str,
        "data": (array.__cuda_array_interface__["data"][0], False),
        "version": 3,
    }
    return cuda.from_cuda_array_interface(desc, owner=array, sync=False)


def is_c_contiguous(array: Any) -> bool:
    return bool(array.is_c_contiguous())


def empty(shape: tuple[int, ...], dtype: np.dtype) -> Any:
    return cuda.device_array(tuple(shape), np.dtype(dtype))


_NOTHING: dict[np.dtype, Any] = {}


def nothing(dtype: np.dtype) -> Any:
    """A length-0 device array standing for "not wanted" (kernels test ``a.size > 0``, which
    keeps compiled signatures few)."""
    dtype = np.dtype(dtype)
    found = _NOTHING.get(dtype)
    if found is None:
        found = _NOTHING[dtype] = cuda.device_array((0,), dtype)
    return found


def flat(array: Any, dtype: np.dtype) -> Any:
    """``array`` as a 1-D device array, or ``nothing(dtype)`` for ``None``."""
    if array is None:
        return nothing(dtype)
    return array.ravel() if array.ndim != 1 else array


def as_contiguous(array: Any, dtype: np.dtype) -> Any:
    """``array`` as a C-contiguous device array of ``dtype``: itself when it is one, else a
    copy made on the device (any strides, any dtype conversion)."""
    dtype = np.dtype(dtype)
    array = as_device_array(array)
    if array.dtype == dtype and is_c_contiguous(array):
        return array
    return copy_into(empty(array.shape, dtype), array)


def astype(array: Any, dtype: np.dtype) -> Any:
    """A C-contiguous copy of ``array`` converted to ``dtype``."""
    array = as_device_array(array)
    if array.dtype == np.dtype(dtype) and is_c_contiguous(array):
        return copy_into(empty(array.shape, dtype), array)
    return as_contiguous(array, dtype)


def moveaxis(array: Any, source: int, destination: int) -> Any:
    """``np.moveaxis`` for device arrays: a strided view."""
    ndim = array.ndim
    source %= ndim
    destination %= ndim
    order = [d for d in range(ndim) if d != source]
    order.insert(destination, source)
    shape, strides = tuple(array.shape), tuple(array.strides)
    return _view(array, tuple(shape[d] for d in order), tuple(strides[d] for d in order))


def broadcast_to(array: Any, shape: tuple[int, ...]) -> Any:
    """``np.broadcast_to`` for device arrays: a view with zero strides; ``ValueError`` when
    the shapes do not broadcast."""
    shape = tuple(int(s) for s in shape)
    have, steps = tuple(array.shape), tuple(array.strides)
    pad = len(shape) - len(have)
    if pad < 0:
        raise ValueError(f"cannot broadcast shape {have} to {shape}")
    strides = []
    for d, size in enumerate(shape):
        if d < pad:
            strides.append(0)
        elif have[d - pad] == size:
            strides.append(steps[d - pad])
        elif have[d - pad] == 1:
            strides.append(0)
        else:
            raise ValueError(f"cannot broadcast shape {have} to {shape}")
    if have == shape:
        return array
    return _view(array, shape, tuple(strides))


def _merged(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Shape and strides with size-1 dimensions dropped and dimensions that are contiguous
    with each other merged: the fewest dimensions that index the same elements."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    out_shape: list[int] = []
    out_strides: list[int] = []
    for n, s in dims:
        if out_shape and out_strides[-1] == s * n:
            out_shape[-1] *= n
            out_strides[-1] = s
        else:
            out_shape.append(n)
            out_strides.append(s)
    return out_shape, out_strides


def copy_into(dst: Any, src: Any) -> Any:
    """Copies ``src`` (any strides, any dtype, the shape of ``dst``) into the C-contiguous
    device array ``dst``, converting the dtype; returns ``dst``."""
    n = dst.size
    if n == 0:
        return dst
    shape, strides = _merged(tuple(src.shape), tuple(src.strides))
    if len(shape) > MAX_DIMS:
        raise ValueError(
            f"arrays with more than {MAX_DIMS} non-contiguous dimensions are not supported "
            "on CUDA; make the array contiguous first"
        )
    pad = MAX_DIMS - len(shape)
    src8 = _view(src, (1,) * pad + tuple(shape), (0,) * pad + tuple(strides))
    _gather[blocks_for(n), THREADS, stream()](src8, dst.ravel())
    return dst


@kernel
def _gather(src, dst):
    """dst[i] = src[unravel(i)] for an 8-D strided ``src`` (one compiled signature per dtype
    pair, whatever the layout)."""
    s1 = src.shape[1]
    s2 = src.shape[2]
    s3 = src.shape[3]
    s4 = src.shape[4]
    s5 = src.shape[5]
    s6 = src.shape[6]
    s7 = src.shape[7]
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        r = i
        i7 = r % s7
        r //= s7
        i6 = r % s6
        r //= s6
        i5 = r % s5
        r //= s5
        i4 = r % s4
        r //= s4
        i3 = r % s3
        r //= s3
        i2 = r % s2
        r //= s2
        i1 = r % s1
        r //= s1
        dst[i] = src[r, i1, i2, i3, i4, i5, i6, i7]


def to_host(array: Any) -> np.ndarray:
    """A device array (or any ``__cuda_array_interface__`` object) copied to the host."""
    array = as_device_array(array)
    s = stream()
    host = array.copy_to_host(stream=s)
    if s:
        s.synchronize()
    return host


def element(array: Any, index: int) -> Any:
    """One element of a device array, read back to the host (error messages)."""
    flat_array = array.ravel() if array.ndim != 1 else array
    return to_host(flat_array[index : index + 1])[0]


# -- deterministic reductions -------------------------------------------------------------


def partials(blocks: int) -> Any:
    """The per-block results of a reducing launch: row 0 the float64 partial sums, row 1 the
    smallest flagged element index (``NO_FLAG`` when none). The array ``finish`` last read
    back on this thread, when it has this size: an allocation costs ~25 us a call (H200), and
    no kernel can still be writing an array that ``finish`` has read (it synchronizes)."""
    scratch = _finished().pop(blocks, None)
    return scratch if scratch is not None else cuda.device_array((2, blocks), np.float64)


def finish(scratch: Any) -> tuple[float, int]:
    """``(total, first flagged index or -1)`` of a reducing launch: the partials copied back
    (one copy, one synchronization) and added in block order."""
    host = to_host(scratch)
    _finished()[scratch.shape[1]] = scratch
    total = float(np.cumsum(host[0])[-1])  # a running sum: block order, on any machine
    bad = host[1].min()
    return total, (int(bad) if bad != NO_FLAG else -1)


def _finished() -> dict[int, Any]:
    """This thread's partials arrays that ``finish`` has read back, by block count. Per thread,
    so that another thread's launch cannot take one between ``partials`` and ``finish``."""
    found = getattr(_local, "finished", None)
    if found is None:
        found = _local.finished = {}
    return found


@device
def log(v):
    """``math.log`` with IEEE results at 0 (-inf) and below (nan) on every target: the
    simulator's ``math.log`` raises there, as Python's does."""
    if v > 0.0:
        return math.log(v)
    if v == 0.0:
        return -math.inf
    return math.nan


@device
def finish_element(i, loss, g, w, loss_out, grad_out, go, scale):
    """The end of an element-wise kernel's work on element ``i``, given its loss and
    derivative: the weight, the per-element loss, the gradient (times ``grad_output`` and
    ``scale``); returns the weighted loss. Length-0 arrays stand for absent ones (as
    ``runtime.cpu.finish_element`` on the CPU)."""
    if w.size > 0:
        loss *= float64(w[i])
        g *= float64(w[i])
    if loss_out.size > 0:
        loss_out[i] = loss
    if grad_out.size > 0:
        if go.size > 0:
            g *= float64(go[i])
        grad_out[i] = g * scale
    return loss


@device
def finish_derivative(i, d, w, out, go, scale):
    """Element ``i``'s second output (Hessian diagonal, or gradient with respect to the
    target) weighted and scaled as ``finish_element`` does the gradient."""
    d *= scale
    if w.size > 0:
        d *= float64(w[i])
    if go.size > 0:
        d *= float64(go[i])
    out[i] = d


@device
def group_sum(sh, tid, lane, lanes, value):
    """The sum of ``value`` over the ``lanes`` threads of this thread's group (threads
    ``tid - lane`` to ``tid - lane + lanes - 1``), by a fixed tree, returned to every lane.
    Every thread of the block must call it: it synchronizes the block."""
    sh[tid] = value
    cuda.syncthreads()
    h = lanes // 2
    while h > 0:
        if lane < h:
            sh[tid] = sh[tid] + sh[tid + h]
        cuda.syncthreads()
        h //= 2
    result = sh[tid - lane]
    cuda.syncthreads()
    return result


@device
def group_sum2(sa, sb, tid, lane, lanes, a, b):
    """Two ``group_sum`` trees at once (one set of barriers)."""
    sa[tid] = a
    sb[tid] = b
    cuda.syncthreads()
    h = lanes // 2
    while h > 0:
        if lane < h:
            sa[tid] = sa[tid] + sa[tid + h]
            sb[tid] = sb[tid] + sb[tid + h]
        cuda.syncthreads()
        h //= 2
    ra = sa[tid - lane]
    rb = sb[tid - lane]
    cuda.syncthreads()
    return ra, rb


@device
def group_sum3(sa, sb, sc, tid, lane, lanes, a, b, c):
    """Three ``group_sum`` trees at once (one set of barriers)."""
    sa[tid] = a
    sb[tid] = b
    sc[tid] = c
    cuda.syncthreads()
    h = lanes // 2
    while h > 0:
        if lane < h:
            sa[tid] = sa[tid] + sa[tid + h]
            sb[tid] = sb[tid] + sb[tid + h]
            sc[tid] = sc[tid] + sc[tid + h]
        cuda.syncthreads()
        h //= 2
    ra = sa[tid - lane]
    rb = sb[tid - lane]
    rc = sc[tid - lane]
    cuda.syncthreads()
    return ra, rb, rc


@device
def group_max(sh, tid, lane, lanes, value):
    """The maximum of ``value`` over the group (``a if a >= b else b``)."""
    sh[tid] = value
    cuda.syncthreads()
    h = lanes // 2
    while h > 0:
        if lane < h:
            a = sh[tid]
            b = sh[tid + h]
            sh[tid] = a if a >= b else b
        cuda.syncthreads()
        h //= 2
    result = sh[tid - lane]
    cuda.syncthreads()
    return result


@device
def write_partials(sa, sb, scratch, acc, bad):
    """Block-level end of a reducing kernel: the block's float64 sum of ``acc`` and minimum
    of ``bad`` (flagged index or ``NO_FLAG``) go to ``scratch[:, blockIdx.x]``."""
    tid = cuda.threadIdx.x
    sa[tid] = acc
    sb[tid] = bad
    cuda.syncthreads()
    h = THREADS // 2
    while h > 0:
        if tid < h:
            sa[tid] = sa[tid] + sa[tid + h]
            b = sb[tid + h]
            if b < sb[tid]:
                sb[tid] = b
        cuda.syncthreads()
        h //= 2
    if tid == 0:
        scratch[0, cuda.blockIdx.x] = sa[0]
        scratch[1, cuda.blockIdx.x] = sb[0]


@kernel
def _sum(a, scratch):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    acc = 0.0
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        acc += float64(a[i])
    write_partials(sa, sb, scratch, acc, NO_FLAG)


def total(array: Any) -> float:
    """The float64 sum of a device array, deterministic (per-block partials added in block
    order): summed weights for ``"mean"``."""
    a = flat(as_contiguous(array, array.dtype), array.dtype)
    n = a.size
    if n == 0:
        return 0.0
    blocks = blocks_for(n)
    scratch = partials(blocks)
    _sum[blocks, THREADS, stream()](a, scratch)
    return finish(scratch)[0]


# -- results ------------------------------------------------------------------------------


def as_out(out: Any) -> Any:
    """A caller's ``out=`` array as a Numba device array the kernels can write into; the
    caller's object is returned by ``to_caller`` in its place."""
    view = out.bind(out.stream) if _is_numba(out) else as_device_array(out)  # a new object
    view._lossforge_out = out
    return view


def _converter(arrays: Any) -> Any:
    for a in arrays:
        if _is_torch_cuda(a):
            torch = sys.modules["torch"]
            where = a.device
            return lambda d: torch.as_tensor(d, device=where)
        if type(a).__module__.startswith("cupy"):
            cupy = sys.modules["cupy"]
            return cupy.asarray
    return None


def to_caller(value: Any, grads: Any, arrays: Any) -> tuple[Any, tuple[Any, ...]]:
    """Results in the caller's array type (see the module docstring): ``value`` (a host
    scalar, a device array or ``None``) and each gradient."""
    convert = _converter(arrays)
    if convert is not None and value is not None and _is_numba(value):
        value = convert(value)
    out = []
    for g in grads:
        given = g.__dict__.get("_lossforge_out") if hasattr(g, "__dict__") else None
        if given is not None:
            out.append(given)
        elif convert is not None:
            out.append(convert(g))
        else:
            out.append(g)
    return value, tuple(out)


# -- kernels from formulas (lossforge.kernels) ----------------------------------------------
# A formula calls lossforge.runtime.mathfn's functions; on the GPU it gets these instead
# (float64, as the formulas run here), through a module of the same attribute names.


@device
def _log1p(v):
    if v > -1.0:
        return math.log1p(v)
    return -math.inf if v == -1.0 else math.nan


@device
def _exp(v):
    return math.exp(v)


@device
def _like(x, value):
    return float64(value)


MATHFN = types.ModuleType("lossforge.runtime.cuda.mathfn")
MATHFN.__dict__.update(
    exp=_exp,
    exp_nonpositive=_exp,
    log=log,
    log_native=log,
    log1p=_log1p,
    log1p_unit=_log1p,
    log1p_unit_native=_log1p,
    like=_like,
)


def device_formula(formula: Any, name: str) -> Any:
    """A formula as a device function: its globals that name ``runtime.mathfn`` or one of
    its functions are given the CUDA versions (``MATHFN``), its helpers
    (``kernels.helpers``) are device functions too."""
    from lossforge.kernels import clone, helpers
    from lossforge.runtime import mathfn

    namespace = {key: device_formula(h, f"{name}_{key}") for key, h in helpers(formula).items()}
    for key, value in formula.__globals__.items():
        if value is mathfn:
            namespace[key] = MATHFN
        elif getattr(value, "__module__", None) == mathfn.__name__ and hasattr(
            MATHFN, getattr(value, "__name__", "")
        ):
            namespace[key] = getattr(MATHFN, value.__name__)
    return device(clone(formula, name, namespace))


@device
def _valid(x, y):
    return False


@device
def _no_hessian(x, y, a, p):
    return math.nan


def _elementwise_store(i, xi, yi, a, w, p, loss_out, grad_out, grad2_out, hess_out, go, scale, bad):
    """Element ``i`` through the formula, in float64: its loss and gradient (and Hessian
    diagonal, for ``grad_hess``) written out; returns its (weighted) loss and ``bad``, set to
    ``i`` if the element is the thread's first invalid one (a thread's indices increase: its
    first flagged is its smallest)."""
    xi = float64(xi)
    yi = float64(yi)
    ai = float64(a[i]) if a.size > 0 else 1.0
    if invalid(xi, yi):
        if bad == NO_FLAG:
            bad = float64(i)
        loss = g = math.nan  # the call raises
    else:
        loss, g = formula(xi, yi, ai, p)
    if hess_out.size > 0:
        finish_derivative(i, hessian(xi, yi, ai, p), w, hess_out, go, scale)
    if grad2_out.size > 0:
        finish_derivative(i, target_grad(xi, yi, ai, p), w, grad2_out, go, scale)
    return finish_element(i, loss, g, w, loss_out, grad_out, go, scale), bad


def _elementwise(x, y, w, a, p, loss_out, grad_out, grad2_out, hess_out, go, scale, scratch):
    """A grid-stride loop, four elements a thread a round, all loaded before the first store:
    a store may alias the next element's input, so the compiler cannot hoist those loads
    itself, and one load pair in flight a thread leaves the memory bus half idle (H200:
    2.2 TB/s of 4.8). The sum is taken in the same grid-stride order as one element a round,
    into deterministic per-block partials."""
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    acc = 0.0
    bad = NO_FLAG
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    n = x.size
    while i + 3 * step < n:
        x0, x1, x2, x3 = x[i], x[i + step], x[i + 2 * step], x[i + 3 * step]
        y0, y1, y2, y3 = y[i], y[i + step], y[i + 2 * step], y[i + 3 * step]
        loss, bad = store(
            i, x0, y0, a, w, p, loss_out, grad_out, grad2_out, hess_out, go, scale, bad
        )
        acc += loss
        i += step
        loss, bad = store(
            i, x1, y1, a, w, p, loss_out, grad_out, grad2_out, hess_out, go, scale, bad
        )
        acc += loss
        i += step
        loss, bad = store(
            i, x2, y2, a, w, p, loss_out, grad_out, grad2_out, hess_out, go, scale, bad
        )
        acc += loss
        i += step
        loss, bad = store(
            i, x3, y3, a, w, p, loss_out, grad_out, grad2_out, hess_out, go, scale, bad
        )
        acc += loss
        i += step
    while i < n:
        loss, bad = store(
            i, x[i], y[i], a, w, p, loss_out, grad_out, grad2_out, hess_out, go, scale, bad
        )
        acc += loss
        i += step
    write_partials(sa, sb, scratch, acc, bad)


def elementwise_kernel(
    formula: Any, invalid: Any, hessian: Any, name: str, target_grad: Any = None
) -> Any:
    """The CUDA kernel of an element-wise formula (and its optional domain check, Hessian
    diagonal and gradient with respect to the target)."""
    from lossforge.kernels import clone

    namespace = {
        "formula": device_formula(formula, f"{name}_formula"),
        "invalid": _valid if invalid is None else device_formula(invalid, f"{name}_invalid"),
        "hessian": _no_hessian if hessian is None else device_formula(hessian, f"{name}_hess"),
        "target_grad": (
            _no_hessian if target_grad is None else device_formula(target_grad, f"{name}_dy")
        ),
    }
    store_ = device(clone(_elementwise_store, f"{name}_store", namespace))
    return kernel(clone(_elementwise, name, {"store": store_}))


def _row_mean(
    z, y, w, a, p, rows, classes, loss_out, grad_out, hess_out, go, scale, lanes, scratch
):
    """Rows of ``classes`` elements through the formula, each row's losses summed by a group
    of ``lanes`` threads with a fixed tree and divided by ``classes`` (the row's value); the
    gradient is element-wise and coalesced."""
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    lane = tid % lanes
    per_block = THREADS // lanes
    weighted = w.size > 0
    auxiliary = a.size > 0
    want_loss = loss_out.size > 0
    want_grad = grad_out.size > 0
    want_hess = hess_out.size > 0
    upstream = go.size > 0
    inverse = 1.0 / classes
    acc = 0.0
    for base in range(cuda.blockIdx.x * per_block, rows, cuda.gridDim.x * per_block):
        i = base + tid // lanes
        active = i < rows
        s = 0.0
        if active:
            g = scale * inverse if not upstream else scale * inverse * float64(go[i])
            for j in range(lane, classes, lanes):
                k = i * classes + j
                ak = float64(a[k]) if auxiliary else 1.0
                zk = float64(z[k])
                yk = float64(y[k])
                loss, d = formula(zk, yk, ak, p)
                wk = float64(w[k]) if weighted else 1.0
                s += loss * wk
                if want_grad:
                    grad_out[k] = d * wk * g
                if want_hess:
                    hess_out[k] = hessian(zk, yk, ak, p) * wk * g
        row = group_sum(sa, tid, lane, lanes, s)
        if active and lane == 0:
            row *= inverse
            if want_loss:
                loss_out[i] = row
            acc += row
    write_partials(sa, sb, scratch, acc, NO_FLAG)


def row_mean_kernel(formula: Any, invalid: Any, hessian: Any, name: str) -> Any:
    """The CUDA kernel of an element-wise formula whose value is each row's mean."""
    from lossforge.kernels import clone

    namespace = {
        "formula": device_formula(formula, f"{name}_formula"),
        "hessian": _no_hessian if hessian is None else device_formula(hessian, f"{name}_hess"),
    }
    return kernel(clone(_row_mean, name, namespace))


def _rowwise(x1, x2, t, p, rows, dim, loss_out, g1_out, g2_out, go, scale, lanes, scratch):
    """Pairs of rows through a row formula: each row pair is handled by a group of ``lanes``
    threads, one coalesced pass for the sums of its terms (fixed trees in shared memory),
    a second over the same rows for both gradients; the rows' values go to deterministic
    per-block partials."""
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    sc = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    lane = tid % lanes
    per_block = THREADS // lanes
    targets = t.size > 0
    want_loss = loss_out.size > 0
    want_grad = g1_out.size > 0
    upstream = go.size > 0
    acc = 0.0
    for base in range(cuda.blockIdx.x * per_block, rows, cuda.gridDim.x * per_block):
        i = base + tid // lanes
        active = i < rows
        start = i * dim
        su = 0.0
        sv = 0.0
        sw = 0.0
        if active:
            for k in range(lane, dim, lanes):
                u, v, w = terms(float64(x1[start + k]), float64(x2[start + k]))
                su += u
                sv += v
                sw += w
        su, sv, sw = group_sum3(sa, sb, sc, tid, lane, lanes, su, sv, sw)
        if active:
            value, c0, c1, c2 = row((su, sv, sw), float64(t[i]) if targets else 0.0, p)
            if lane == 0:
                if want_loss:
                    loss_out[i] = value
                acc += value
            if want_grad:
                g = scale * float64(go[i]) if upstream else scale
                c0 *= g
                c1 *= g
                c2 *= g
                for k in range(lane, dim, lanes):
                    x = float64(x1[start + k])
                    y = float64(x2[start + k])
                    da, db = grads(x, y, c0, c1, c2)
                    g1_out[start + k] = da
                    g2_out[start + k] = db
    write_partials(sa, sb, scratch, acc, NO_FLAG)


def rowwise_kernel(formulas: Any, name: str) -> Any:
    """The CUDA kernel of a row formula (``terms``, ``row``, ``grads``)."""
    from lossforge.kernels import clone

    namespace = {
        key: device_formula(fn, f"{name}_{key}")
        for key, fn in zip(("terms", "row", "grads"), formulas, strict=True)
    }
    return kernel(clone(_rowwise, name, namespace))


@device
def _no_transform(z, p):
    return z, 1.0


def _softmax_logit(z, start, j, p, transformed):
    """Logit ``j`` of the row at ``start`` in float64, transformed when ``transformed``:
    (z', dz'/dz)."""
    v = float64(z[start + j])
    if transformed:
        return transform(v, p)
    return v, 1.0


def _softmax_rows(
    z,
    t,
    y,
    w,
    p,
    rows,
    classes,
    ignore_index,
    smoothing,
    transformed,
    loss_out,
    grad_out,
    go,
    scale,
    lanes,
    scratch,
):
    """Rows of logits through a softmax row formula (``lossforge.kernels.Softmax``), as
    ``runtime.cpu.softmax_index`` and ``softmax_probs`` in float64: each row handled by a
    group of ``lanes`` threads, coalesced along the row, for its maximum, its sums
    (exponentials; with a target distribution also the formula's loss and ``a``
    coefficients) by fixed trees in shared memory, and its gradient, written once; rows'
    losses go to deterministic per-block partials. ``t`` (int64 class indices) or ``y``
    (probabilities) is length 0."""
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    sc = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    lane = tid % lanes
    per_block = THREADS // lanes
    indices = t.size > 0 or y.size == 0
    weighted = w.size > 0
    want_loss = loss_out.size > 0
    want_grad = grad_out.size > 0
    upstream = go.size > 0
    direct = indices and smoothing == 0.0  # one target class: one formula call
    keep = 1.0 - smoothing
    off = smoothing / classes if classes else 0.0
    acc = 0.0
    for base in range(cuda.blockIdx.x * per_block, rows, cuda.gridDim.x * per_block):
        i = base + tid // lanes
        active = i < rows
        k = t[i] if active and indices else -1
        live = active and not (indices and k == ignore_index)
        start = i * classes
        m = -math.inf
        if live:
            for j in range(lane, classes, lanes):
                v, d = row_logit(z, start, j, p, transformed)
                m = m if m >= v else v
        m = group_max(sa, tid, lane, lanes, m)
        total = 0.0
        lsum = 0.0
        if live:
            for j in range(lane, classes, lanes):
                v, d = row_logit(z, start, j, p, transformed)
                total += math.exp(v - m)
        total = group_sum(sa, tid, lane, lanes, total)
        lse = m + log(total)
        big_a = 0.0
        if live and not direct:
            for j in range(lane, classes, lanes):
                v, d = row_logit(z, start, j, p, transformed)
                q = (
                    off + (keep if j == k else 0.0)
                    if indices
                    else keep * float64(y[start + j]) + off
                )
                if weighted:
                    q *= float64(w[j])
                value, a, b = row(v - lse, lse, p)
                lsum += q * value
                big_a += q * a
        lsum, big_a = group_sum2(sb, sc, tid, lane, lanes, lsum, big_a)
        loss = 0.0
        if live:
            g = scale * float64(go[i]) if upstream else scale
            wt = 1.0
            b_t = 0.0
            if direct:
                wt = float64(w[k]) if weighted else 1.0
                v, d = row_logit(z, start, k, p, transformed)
                value, a, b_t = row(v - lse, lse, p)
                loss = wt * value
                big_a = wt * a
            else:
                loss = lsum
            if want_grad:
                for j in range(lane, classes, lanes):
                    v, d = row_logit(z, start, j, p, transformed)
                    r = big_a * math.exp(v - m) / total
                    if direct:
                        if j == k:
                            r += wt * b_t
                    else:
                        q = (
                            off + (keep if j == k else 0.0)
                            if indices
                            else keep * float64(y[start + j]) + off
                        )
                        if weighted:
                            q *= float64(w[j])
                        value, a, b = row(v - lse, lse, p)
                        r += q * b
                    grad_out[start + j] = r * g * d
        elif active and want_grad:
            for j in range(lane, classes, lanes):
                grad_out[start + j] = 0.0
        if active and lane == 0:
            if want_loss:
                loss_out[i] = loss
            acc += loss
    write_partials(sa, sb, scratch, acc, NO_FLAG)


def softmax_rows_kernel(row: Any, transform: Any, name: str) -> Any:
    """The CUDA kernel of a softmax row formula and its optional per-logit transform."""
    from lossforge.kernels import clone

    shape = _no_transform if transform is None else device_formula(transform, f"{name}_tf")
    logit = device(clone(_softmax_logit, f"{name}_logit", {"transform": shape}))
    namespace = {"row": device_formula(row, f"{name}_row"), "row_logit": logit}
    return kernel(clone(_softmax_rows, name, namespace))


@device
def _no_curvature(z, zt, slope, p):
    return 0.0


def _softmax_hessian_rows(
    z,
    t,
    y,
    w,
    p,
    rows,
    classes,
    probabilities,
    ignore_index,
    smoothing,
    transformed,
    loss_out,
    grad_out,
    hess_out,
    go,
    scale,
    lanes,
    scratch,
):
    """``grad_hess`` of a softmax row formula with its ``row_hessian``, as
    ``runtime.cpu.softmax_hessian`` (which gives the formulas) in float64, laid out as
    ``_softmax_rows``: a group of ``lanes`` threads a row, its maximum, exponentials and the
    sums of the loss, ``A`` and ``S`` by fixed trees, then its gradient and Hessian diagonal,
    written once. The formulas are called again in the last pass instead of kept: a row may
    be longer than any per-thread buffer."""
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    sc = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    lane = tid % lanes
    per_block = THREADS // lanes
    weighted = w.size > 0
    want_loss = loss_out.size > 0
    upstream = go.size > 0
    keep = 1.0 - smoothing
    off = smoothing / classes if classes else 0.0
    every = probabilities or off != 0.0  # every class is in the target distribution
    acc = 0.0
    for base in range(cuda.blockIdx.x * per_block, rows, cuda.gridDim.x * per_block):
        i = base + tid // lanes
        active = i < rows
        k = t[i] if active and not probabilities else -1
        live = active and (probabilities or k != ignore_index)
        start = i * classes
        m = -math.inf
        if live:
            for j in range(lane, classes, lanes):
                v, d = row_logit(z, start, j, p, transformed)
                m = m if m >= v else v
        m = group_max(sa, tid, lane, lanes, m)
        total = 0.0
        if live:
            for j in range(lane, classes, lanes):
                v, d = row_logit(z, start, j, p, transformed)
                total += math.exp(v - m)
        total = group_sum(sa, tid, lane, lanes, total)
        lse = m + log(total)
        loss = 0.0
        big_a = 0.0
        big_s = 0.0
        if live:
            for j in range(lane, classes, lanes):
                if every or j == k:
                    v, d = row_logit(z, start, j, p, transformed)
                    q = keep * float64(y[start + j]) + off if probabilities else off
                    if j == k:
                        q += keep
                    if weighted:
                        q *= float64(w[j])
                    value, a, b = row(v - lse, lse, p)
                    uu, uv, vv = row_hessian(v - lse, lse, p)
                    loss += q * value
                    big_a += q * a
                    big_s += q * (uu - 2.0 * uv + vv)
        loss, big_a, big_s = group_sum3(sa, sb, sc, tid, lane, lanes, loss, big_a, big_s)
        if live:
            g = scale * float64(go[i]) if upstream else scale
            for j in range(lane, classes, lanes):
                v, d = row_logit(z, start, j, p, transformed)
                pj = math.exp(v - m) / total
                gj = big_a * pj
                hj = big_a * pj * (1.0 - pj) + big_s * pj * pj
                if every or j == k:
                    q = keep * float64(y[start + j]) + off if probabilities else off
                    if j == k:
                        q += keep
                    if weighted:
                        q *= float64(w[j])
                    value, a, b = row(v - lse, lse, p)
                    uu, uv, vv = row_hessian(v - lse, lse, p)
                    gj += q * b
                    hj += q * (uu * (1.0 - 2.0 * pj) + 2.0 * uv * pj)
                if transformed:
                    hj = hj * d * d + gj * curvature(float64(z[start + j]), v, d, p)
                    gj *= d
                grad_out[start + j] = gj * g
                hess_out[start + j] = hj * g
        elif active:
            for j in range(lane, classes, lanes):
                grad_out[start + j] = 0.0
                hess_out[start + j] = 0.0
        if active and lane == 0:
            if want_loss:
                loss_out[i] = loss
            acc += loss
    write_partials(sa, sb, scratch, acc, NO_FLAG)


def softmax_hessian_kernel(formulas: Any, name: str) -> Any:
    """The ``grad_hess`` CUDA kernel of a softmax row formula: ``formulas`` is ``(row,
    row_hessian, transform, transform_hessian)``, the last two optional."""
    from lossforge.kernels import clone

    row_, row_hessian_, transform_, curvature_ = formulas
    shape = _no_transform if transform_ is None else device_formula(transform_, f"{name}_tf")
    namespace = {
        "row": device_formula(row_, f"{name}_row"),
        "row_hessian": device_formula(row_hessian_, f"{name}_rowh"),
        "row_logit": device(clone(_softmax_logit, f"{name}_logit", {"transform": shape})),
        "curvature": (
            _no_curvature if curvature_ is None else device_formula(curvature_, f"{name}_tfh")
        ),
    }
    return kernel(clone(_softmax_hessian_rows, name, namespace))
