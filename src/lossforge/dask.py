"""Losses and gradients over Dask arrays: ``pip install "lossforge[dask]"``.

``import lossforge.dask as lfd`` gives every registered loss under its name, taking
``dask.array`` inputs (NumPy arrays mix in) and returning lazy results::

    value = lfd.mse_loss(x, y)                      # a 0-d Dask array
    value, grad = lfd.mse_loss.value_and_grad(x, y) # lazy value and gradient (x's chunks)
    total, denominator = lfd.mse_loss.partial(x, y) # a lazy float64 pair (shape (2,))

How a reduction is computed: each chunk gives its ``Loss.partial`` pair, ``(total,
denominator)`` in float64, and the pairs are added up in a tree (``split_every`` of them a
node). Every node keeps its sums exactly (as non-overlapping float64 expansions, Shewchuk's
algorithm, as ``math.fsum``), so ``"mean"`` is ``total / denominator`` of the exactly rounded
sums: the same number for any tree shape, scheduler and worker count, and the exact mean for
any chunking. ``"sum"`` is bitwise the ``math.fsum`` of the chunks' in-memory
``partial()`` totals. (Averaging per-chunk means would be wrong for unequal chunks and for
weighted or ``ignore_index`` denominators.)

Gradients: the gradient of the global mean on a chunk is that chunk's ``"sum"`` gradient
times ``grad_output / denominator`` (API.md section 7). With ``"sum"`` nothing waits for the
denominator, so one task per chunk gives its partial pair and its gradient (one read of the
chunk). With ``"mean"`` the gradient pass needs the global denominator: it runs after the
partials pass and, by default (``reread=True``), reads its inputs again: their task graphs
are cloned (``dask.graph_manipulation.bind``) to start once the denominator is known, so that
no chunk is held in memory between the passes, which is what lets an input larger than the
cluster's memory through. ``reread=False`` keeps the chunks instead (for inputs that are
persisted, or costly to compute and small enough to hold). ``"none"`` maps chunk by chunk.

Chunks: inputs, targets and element-wise options (``weight``, ``pos_weight``: broadcast to
the input's shape as in memory) take the input's chunks. Rows are never split: for
``cross_entropy``/``nll_loss``/``multi_margin_loss`` the class axis (axis 1, or the whole of
a 1-D input), for ``multilabel_soft_margin_loss``, ``multilabel_margin_loss`` and
``cosine_embedding_loss`` the last axis, for
``cosine_similarity`` the ``dim`` axis. When such an axis of the input has more than one
chunk, the input is rechunked with that axis in one chunk, the other axes' chunks kept but for
axis 0, cut into chunks of as many rows as fit in the size of the input's largest chunk (at
least one row), so chunks stay about the size the caller chose; an input already whole along
it keeps its chunks. Class weights
(``weight`` of ``cross_entropy``/``nll_loss``/``multi_margin_loss``) go whole to every
chunk. A third-party loss is taken as element-wise. ``cosine_similarity`` takes ``x1`` and
``x2`` of one shape (broadcast them first); its gradient with ``grad_output`` of the value's
shape.

Errors: options, dtypes and shapes are checked when the graph is built, with the in-memory
error types and messages (the family's ``prepare`` runs on zero-row stand-ins, so nothing is
compiled or computed); what depends on the data (a class index out of range, a probability
outside [0, 1]) raises from the chunk that has it, at compute time, with the in-memory type.
No ``out=``: store a lazy gradient with ``da.store``/``to_zarr``.

Workers (``distributed``): a task runs lossforge's kernels on ``per_task`` Numba threads, 1 by
default, since a worker already runs one task per thread (this is what Dask's
``OMP_NUM_THREADS=1`` does for BLAS; Numba ignores that variable). The :class:`NumbaThreads`
worker plugin also sizes Numba's thread pool to the worker's ``nthreads`` (instead of every
core of the machine, in every worker process). Without the plugin, tasks still run on one
Numba thread each. The first kernel call of each kind in a worker process holds an
inter-process file lock in the kernel cache folder, so that worker processes starting cold
compile one at a time and the others load the cached kernel, instead of racing to write the
same cache entries (numba issues 4807 and 10128). No lock on Windows.

CuPy-backed Dask arrays run the CUDA kernels chunk by chunk (results keep the input's array
type; reduced values are NumPy). That path is written but not tested: CuPy is not a test
dependency.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import lossforge
from lossforge import dispatch, validate
from lossforge.loss import Loss, _divide, _scalar

try:
    import dask
    import dask.array as da
    from dask.graph_manipulation import bind
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError('lossforge.dask needs Dask: pip install "lossforge[dask]"') from exc
try:
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover - dask without distributed: no plugin to register
    WorkerPlugin = object  # type: ignore[assignment, misc]

__all__ = ["DaskLoss", "NumbaThreads", "get", "grad", "value_and_grad"]

#: Pairs added per node of the reduction tree.
SPLIT_EVERY = 8
_CLASS_AXIS = frozenset({"cross_entropy", "nll_loss", "multi_margin_loss"})
_LAST_AXIS = frozenset(
    {"multilabel_soft_margin_loss", "multilabel_margin_loss", "cosine_embedding_loss"}
)


def get(name: str) -> DaskLoss:
    """The loss ``name`` over Dask arrays; ``KeyError`` as ``lossforge.get``."""
    return DaskLoss(lossforge.get(name))


def grad(name: str, *arrays: Any, **options: Any) -> Any:
    """``get(name).grad(*arrays, **options)``."""
    return get(name).grad(*arrays, **options)


def value_and_grad(name: str, *arrays: Any, **options: Any) -> tuple[Any, Any]:
    """``get(name).value_and_grad(*arrays, **options)``."""
    return get(name).value_and_grad(*arrays, **options)


def __getattr__(name: str) -> DaskLoss:
    # lossforge.dask.mse_loss, ...: the registered losses, as in lossforge
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return get(name)
    except KeyError:
        raise AttributeError(f"module 'lossforge.dask' has no attribute {name!r}") from None


class DaskLoss:
    """A :class:`lossforge.Loss` over Dask arrays: the same arguments and options, lazy
    results (see :mod:`lossforge.dask`)."""

    def __init__(self, loss: Loss):
        self.loss = loss
        self.name = loss.name
        self.__doc__ = loss.__doc__

    def __repr__(self) -> str:
        return f"<DaskLoss {self.name}>"

    def __call__(self, *arrays: Any, split_every: int = SPLIT_EVERY, **options: Any) -> Any:
        """The lazy value: a 0-d Dask array for ``"mean"``/``"sum"``, else chunk by chunk."""
        job = _Job(self.loss, arrays, options)
        if job.reduced:
            return job.value(job.tree(job.blocks("partial"), split_every))
        return job.unreduced(want_grad=False, grad_output=None)[0]

    def partial(self, *arrays: Any, split_every: int = SPLIT_EVERY, **options: Any) -> Any:
        """The lazy float64 pair ``[total, denominator]`` (shape ``(2,)``), each summed
        exactly over the chunks; pairs of several arrays combine by adding them."""
        if not self.loss.reduced:
            raise TypeError(f"{self.name} is not a reduced loss and has no partial reduction")
        job = _Job(self.loss, arrays, {**options, "reduction": "sum"})
        pair = dask.delayed(_pair, pure=True)(job.tree(job.blocks("partial"), split_every))
        return da.from_delayed(pair, (2,), dtype=np.float64, meta=np.empty(0, np.float64))

    def value_and_grad(
        self,
        *arrays: Any,
        grad_output: Any = None,
        reread: bool = True,
        split_every: int = SPLIT_EVERY,
        **options: Any,
    ) -> tuple[Any, Any]:
        """``(value, grad)``, both lazy; ``grad`` has the chunks of the argument it is the
        gradient of (a tuple for several differentiable arguments). ``grad_output``: a
        number or a 0-d Dask array for ``"mean"``/``"sum"``, an array of the value's shape
        for ``"none"``. ``reread``: see :mod:`lossforge.dask` (``"mean"`` only)."""
        job = _Job(self.loss, arrays, options)
        if not job.reduced:
            return job.unreduced(want_grad=True, grad_output=grad_output)
        g = _upstream(grad_output)
        if job.reduction == "sum":  # the scale is known: one task a chunk for both
            fused = job.blocks("fused", g)
            return job.value(job.tree(fused, split_every)), job.grads(fused)
        root = job.tree(job.blocks("partial"), split_every)
        scale = dask.delayed(_mean_scale, pure=True)(root, g)
        scale = da.from_delayed(scale, (), dtype=np.float64, meta=np.empty((), np.float64))
        return job.value(root), job.grads(job.blocks("grad", scale, reread))

    def grad(self, *arrays: Any, grad_output: Any = None, **options: Any) -> Any:
        """The lazy gradient (see :meth:`value_and_grad`)."""
        return self.value_and_grad(*arrays, grad_output=grad_output, **options)[1]


# -- the graph -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What a chunk's task needs besides its blocks (small and picklable)."""

    name: str
    op: str  # "partial", "fused", "grad", "none", "none_grad"
    nargs: int
    array_options: tuple[str, ...]
    options: dict[str, Any] = field(hash=False)


@dataclass
class _Layout:
    """The input's axes each argument follows, the axes kept whole, the value's axes."""

    axes: list[tuple[int, ...]]
    whole: tuple[int, ...]
    value: tuple[int, ...]
    per_element: bool  # array options broadcast to the input (else: class vectors, whole)


def _layout(loss: Loss, shapes: Sequence[tuple[int, ...]], options: dict[str, Any]) -> _Layout:
    nd = len(shapes[0])
    every = tuple(range(nd))
    if loss.name in _CLASS_AXIS and nd:
        cls = 0 if nd == 1 else 1
        rest = tuple(a for a in every if a != cls)
        target = every if len(shapes[1]) == nd else rest  # probabilities, or indices
        return _Layout([every, target], (cls,), rest, per_element=False)
    if loss.name in ("multilabel_soft_margin_loss", "multilabel_margin_loss") and nd:
        return _Layout([every, every], (nd - 1,), every[:-1], per_element=True)
    if loss.name == "cosine_embedding_loss" and nd:
        return _Layout([every, every, every[:-1]], (nd - 1,), every[:-1], per_element=True)
    if loss.name == "cosine_similarity" and nd:
        if shapes[0] != shapes[1]:
            raise ValueError(
                "lossforge.dask's cosine_similarity takes x1 and x2 of one shape, got "
                f"{shapes[0]} and {shapes[1]}: broadcast them first (dask.array.broadcast_to)"
            )
        dim = validate.check_int("dim", options.get("dim", 1))
        if not -nd <= dim < nd:
            raise IndexError(f"dim {dim} is out of range for arrays of {nd} dimensions")
        rest = tuple(a for a in every if a != dim % nd)
        return _Layout([every, every], (dim % nd,), rest, per_element=True)
    return _Layout([every] * len(shapes), (), every, per_element=True)


def _letters(axes: Sequence[int]) -> str:
    return "".join(chr(ord("a") + a) for a in axes)


class _Job:
    """One call: its arrays checked and aligned to the input's chunks; then its graph."""

    def __init__(self, loss: Loss, arrays: Sequence[Any], options: dict[str, Any]):
        if len(arrays) != len(loss.arguments):
            raise TypeError(
                f"{loss.name}() takes {len(loss.arguments)} array arguments "
                f"({', '.join(loss.arguments)}), got {len(arrays)}"
            )
        unknown = options.keys() - loss.options.keys() - {"backend"}
        if unknown:
            name = sorted(unknown)[0]
            raise TypeError(f"{loss.name}() got an unexpected keyword argument {name!r}")
        self.loss = loss
        self.reduction = options.get("reduction", loss.options.get("reduction"))
        if loss.reduced:
            validate.check_reduction(self.reduction)
        self.reduced = self.reduction in ("mean", "sum")
        given = [a if isinstance(a, da.Array) else np.asarray(a) for a in arrays]
        shapes = [tuple(a.shape) for a in given]
        self.layout = layout = _layout(loss, shapes, options)
        first = loss.arguments[0]
        for name, shape, axes in zip(loss.arguments[1:], shapes[1:], layout.axes[1:]):
            if len(shape) != len(axes) or any(s != shapes[0][a] for s, a in zip(shape, axes)):
                raise ValueError(
                    f"{first} and {name} must have matching shapes, got {first} of shape "
                    f"{shapes[0]} and {name} of shape {shape}"
                )
        x = given[0] if isinstance(given[0], da.Array) else da.from_array(given[0])
        self.x = x = _rows_whole(x, layout.whole)
        self.arrays = [x] + [_aligned(a, x, axes) for a, axes in zip(given[1:], layout.axes[1:])]
        self.array_options = tuple(k for k, v in options.items() if k != "backend" and _is_array(v))
        self.options = {k: v for k, v in options.items() if k not in self.array_options}
        self.prepared = self._check(given, {k: options[k] for k in self.array_options})
        self.extra: list[Any] = []  # the array options and their indices, for blockwise
        for k in self.array_options:
            value = options[k]
            if layout.per_element:
                self.extra += [_broadcast(value, x), _letters(range(x.ndim))]
            elif isinstance(value, da.Array):  # a class vector: the whole of it to each chunk
                self.extra += [value, "z" * value.ndim]
            else:
                self.extra += [value, None]

    def _check(self, given: list[Any], array_options: dict[str, Any]) -> Any:
        """The family's own checks (``LossSpec.prepare``), on stand-ins with no rows:
        nothing is compiled or computed. The prepared stand-in tells the result dtypes."""
        rows = set(range(self.x.ndim)) - set(self.layout.whole)

        def stand_in(a: Any, axes: Sequence[int]) -> Any:
            shape = tuple(0 if ax in rows and n != 1 else n for n, ax in zip(a.shape, axes))
            meta = a._meta if isinstance(a, da.Array) else a
            return np.zeros_like(meta, shape=shape, dtype=a.dtype)

        arrays = [stand_in(a, axes) for a, axes in zip(given, self.layout.axes)]
        opts = {**self.loss.options, **self.options}
        for k, value in array_options.items():
            if not isinstance(value, da.Array):
                value = np.asarray(value)
            if self.layout.per_element:  # as in memory: broadcast from the trailing axes
                lead = self.x.ndim - value.ndim
                value = stand_in(value, range(lead, lead + value.ndim))
            elif isinstance(value, da.Array):
                value = stand_in(value, [-1] * value.ndim)  # whole
            opts[k] = value
        backend = dispatch.backend_of(arrays, opts.pop("backend", None))
        return self.loss.spec.prepare(arrays, opts, backend)

    def _args(self, after: Any = None) -> list[Any]:
        """blockwise's ``(array, index)`` arguments; with ``after``, the arrays' graphs
        cloned to start once ``after`` is computed (read again, not held)."""
        args: list[Any] = []
        for a, axes in zip(self.arrays, self.layout.axes):
            args += [a, _letters(axes)]
        args += self.extra
        if after is not None:
            cloned = iter(bind([a for a in args[::2] if isinstance(a, da.Array)], after))
            args[::2] = [next(cloned) if isinstance(a, da.Array) else a for a in args[::2]]
        return args

    def blocks(self, op: str, upstream: Any = None, reread: bool = False) -> Any:
        """A task per chunk of the input, whose result is a tuple ``(pair, value, *grads)``
        (``None`` where not computed): an array of objects, never computed as such."""
        args = self._args(upstream if reread else None)
        if isinstance(upstream, da.Array):  # 0-d, or grad_output along the value's axes
            args += [upstream, _letters(self.layout.value if op == "none_grad" else ())]
        else:
            args += [upstream, None]
        index = _letters(range(self.x.ndim))
        plan = _Plan(self.loss.name, op, len(self.arrays), self.array_options, self.options)
        return da.blockwise(
            _block,
            index,
            plan,
            None,
            *args,
            concatenate=True,
            token=f"lossforge-{self.loss.name}-{op}",
            dtype=object,
            meta=np.empty((0,) * self.x.ndim, dtype=object),
        )

    def tree(self, blocks: Any, split_every: int) -> Any:
        """The chunks' pairs added up exactly, ``split_every`` to a node: a Delayed."""
        level = list(blocks.to_delayed(optimize_graph=False).ravel())
        merge = dask.delayed(_merge, pure=True)
        step = max(2, int(split_every))
        while True:
            level = [merge(*level[i : i + step]) for i in range(0, len(level), step)] or [merge()]
            if len(level) == 1:
                return level[0]

    def value(self, root: Any) -> Any:
        dtype = self.prepared.result_dtypes[0]
        value = dask.delayed(_value, pure=True)(root, self.reduction, dtype)
        return da.from_delayed(value, (), dtype=dtype, meta=np.empty((), dtype))

    def grads(self, blocks: Any) -> Any:
        grads = []
        for i, (name, dtype) in enumerate(
            zip(self.loss.differentiable, self.prepared.result_dtypes[1:])
        ):
            a = self.arrays[self.loss.arguments.index(name)]
            meta = np.empty_like(a._meta, shape=(0,) * a.ndim, dtype=dtype)
            grads.append(blocks.map_blocks(_pick, 2 + i, dtype=dtype, meta=meta))
        return grads[0] if len(grads) == 1 else tuple(grads)

    def unreduced(self, want_grad: bool, grad_output: Any) -> tuple[Any, Any]:
        """``"none"``, or a loss that is not reduced: chunk by chunk."""
        value_axes = self.layout.value
        go = None
        if want_grad and grad_output is not None:
            value_shape = tuple(self.x.shape[a] for a in value_axes)
            if tuple(np.shape(grad_output)) != value_shape:
                raise ValueError(
                    f"grad_output must have the value's shape {value_shape}, got "
                    f"{tuple(np.shape(grad_output))}"
                )
            go = _aligned(grad_output, self.x, value_axes)
        blocks = self.blocks("none_grad" if want_grad else "none", go)
        dtype = self.prepared.result_dtypes[0]
        # the whole axes (one chunk each) are dropped: a list of one block, in _pick
        value = da.blockwise(
            _pick,
            _letters(value_axes),
            blocks,
            _letters(range(self.x.ndim)),
            1,
            None,
            concatenate=False,
            dtype=dtype,
            meta=np.empty_like(self.x._meta, shape=(0,) * len(value_axes), dtype=dtype),
        )
        return value, (self.grads(blocks) if want_grad else None)


def _is_array(value: Any) -> bool:
    return value is not None and not isinstance(value, (bool, int, float, str, np.generic))


def _rows_whole(x: Any, whole: Sequence[int]) -> Any:
    """``x`` with the ``whole`` axes in one chunk; the other axes keep their chunks, but
    axis 0, which is cut into chunks of as many rows as fit in the byte size of ``x``'s
    largest chunk (at least one)."""
    if all(len(x.chunks[a]) == 1 for a in whole):
        return x
    chunks: list[Any] = [-1 if a in whole else x.chunks[a] for a in range(x.ndim)]
    if 0 not in whole:
        largest = math.prod(max(c, default=0) for c in x.chunks)
        slab = math.prod(
            x.shape[a] if a in whole else max(x.chunks[a], default=0) for a in range(1, x.ndim)
        )
        chunks[0] = max(1, largest // max(slab, 1))
    return x.rechunk(tuple(chunks))


def _aligned(a: Any, x: Any, axes: Sequence[int]) -> Any:
    """``a`` (a Dask or NumPy array along ``x``'s ``axes``) in ``x``'s chunks."""
    chunks = tuple(x.chunks[ax] for ax in axes)
    if isinstance(a, da.Array):
        return a if a.chunks == chunks else a.rechunk(chunks)
    return da.from_array(np.asarray(a), chunks=chunks)


def _broadcast(w: Any, x: Any) -> Any:
    """An element-wise option broadcast to ``x``'s shape and chunks as NumPy broadcasts,
    lazily: a chunk of it is a broadcast view of a chunk of ``w``."""
    w = w if isinstance(w, da.Array) else np.asarray(w)
    lead = x.ndim - w.ndim
    chunks = tuple((n,) if n == 1 else x.chunks[lead + i] for i, n in enumerate(w.shape))
    w = w.rechunk(chunks) if isinstance(w, da.Array) else da.from_array(w, chunks=chunks)
    return da.broadcast_to(w, x.shape, chunks=x.chunks)


def _upstream(grad_output: Any) -> Any:
    """The upstream gradient of a reduced value: a float, or a 0-d float64 Dask array."""
    if grad_output is None:
        return 1.0
    if isinstance(grad_output, da.Array):
        if grad_output.size != 1:
            raise ValueError(
                f"grad_output of a reduced loss must be a scalar, got shape {grad_output.shape}"
            )
        if grad_output.dtype.kind not in "fiu":
            raise TypeError(f"grad_output must be a real number, got dtype {grad_output.dtype}")
        return grad_output.reshape(()).astype(np.float64)
    return _scalar("grad_output", grad_output)


# -- exact sums ------------------------------------------------------------------------------
class _Sums:
    """Exact running sums of totals and denominators: non-overlapping float64 expansions
    (Shewchuk; what ``math.fsum`` keeps), and the IEEE sum of any non-finite terms."""

    __slots__ = ("parts", "special")

    def __init__(self) -> None:
        self.parts: tuple[list[float], list[float]] = ([], [])
        self.special = [0.0, 0.0]

    def add(self, which: int, x: float) -> None:
        if not math.isfinite(x):
            self.special[which] += x
            return
        partials = self.parts[which]
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    def result(self, which: int) -> float:
        special = self.special[which]
        return special if special else math.fsum(self.parts[which])


def _merge(*items: Any) -> _Sums:
    """A node of the tree: chunks' results (``(pair, ...)`` tuples) or nodes, added."""
    sums = _Sums()
    for item in items:
        if isinstance(item, _Sums):
            for which in (0, 1):
                for x in item.parts[which]:
                    sums.add(which, x)
                sums.special[which] += item.special[which]
        else:
            sums.add(0, item[0][0])
            sums.add(1, item[0][1])
    return sums


def _pair(root: _Sums) -> np.ndarray:
    return np.array([root.result(0), root.result(1)])


def _value(root: _Sums, reduction: str, dtype: np.dtype) -> Any:
    total = root.result(0)
    return dtype.type(_divide(total, root.result(1)) if reduction == "mean" else total)


def _mean_scale(root: _Sums, g: Any) -> np.ndarray:
    """The scale of a chunk's "sum" gradient for the global mean: as in memory."""
    return np.array(_divide(float(g), root.result(1)))


# -- in the workers --------------------------------------------------------------------------
#: The Numba threads a kernel runs on in a task (``NumbaThreads(per_task=...)``).
_per_task = 1
_warm: set[Any] = set()  # the kinds of call this process has made (the first one is locked)


class NumbaThreads(WorkerPlugin):
    """A worker plugin: ``client.register_plugin(lossforge.dask.NumbaThreads())``.

    In each worker process, lossforge's kernels in a task run on ``per_task`` Numba threads
    (default 1: the worker runs up to ``nthreads`` tasks at once, one a thread, as Dask
    expects of any library; ``OMP_NUM_THREADS=1``, which Dask sets, is not read by Numba),
    and Numba's thread pool is sized to ``nthreads * per_task`` where Numba has not started
    its threads yet (``NUMBA_NUM_THREADS``), instead of one thread per core of the machine
    in every worker process."""

    name = "lossforge-numba-threads"

    def __init__(self, per_task: int = 1):
        self.per_task = validate.check_int("per_task", per_task)
        if self.per_task < 1:
            raise ValueError(f"per_task must be at least 1, got {per_task}")

    def setup(self, worker: Any) -> None:
        global _per_task
        pool = max(1, worker.state.nthreads) * self.per_task
        os.environ["NUMBA_NUM_THREADS"] = str(pool)  # read by Numba at import
        if "numba" in sys.modules:  # imported already: effective only until threads start
            import numba
            from numba.np.ufunc import parallel

            if not parallel._is_initialized:
                numba.config.NUMBA_NUM_THREADS = parallel.NUM_THREADS = pool
        _per_task = self.per_task


@contextlib.contextmanager
def _compile_lock(kind: Any) -> Iterator[None]:
    """Hold the cache folder's lock around this process's first call of each ``kind`` (the
    call that may compile and write cache entries)."""
    if kind in _warm:
        yield
        return
    try:
        import fcntl

        import numba

        from lossforge.runtime import cache

        folder = numba.config.CACHE_DIR or cache.cache_dir()
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, "dask-compile.lock"), "a")
    except (ImportError, OSError):  # no fcntl (Windows), or no writable folder: no lock
        yield
        _warm.add(kind)
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
            _warm.add(kind)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _block(plan: _Plan, *blocks: Any) -> tuple[Any, ...]:
    """One chunk: ``(pair, value, *grads)``, ``None`` where not asked for."""
    import numba

    from lossforge.runtime import cpu

    loss = lossforge.get(plan.name)
    arrays = blocks[: plan.nargs]
    options = dict(plan.options)
    options.update(zip(plan.array_options, blocks[plan.nargs : -1]))
    upstream = blocks[-1]
    if plan.op in ("partial", "fused", "grad"):
        options["reduction"] = "sum"
    kind = (
        plan.name,
        plan.op,
        tuple((k, type(v).__name__) for k, v in options.items()),
        tuple(
            (type(b).__name__, str(b.dtype), tuple(int(n).bit_length() for n in b.shape))
            for b in blocks
            if hasattr(b, "dtype")
        ),
    )
    with _compile_lock(kind), cpu.threads(min(_per_task, numba.config.NUMBA_NUM_THREADS)):
        if plan.op == "partial":
            return (loss.partial(*arrays, **options), None)
        if plan.op == "none":
            return (None, loss(*arrays, **options))
        if plan.op == "none_grad":
            value, grads = loss.value_and_grad(*arrays, grad_output=upstream, **options)
            return (None, value, *(grads if isinstance(grads, tuple) else (grads,)))
        pair = loss.partial(*arrays, **options) if plan.op == "fused" else None
        grads = loss.grad(*arrays, grad_output=upstream, **options)
        return (pair, None, *(grads if isinstance(grads, tuple) else (grads,)))


def _pick(block: Any, i: int) -> Any:
    while isinstance(block, list):
        (block,) = block
    return block[i]
