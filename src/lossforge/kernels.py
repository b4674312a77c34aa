"""Kernels from formulas: a loss's per-element math, written once, made into its CPU and CUDA
kernels.

A formula is a plain function of one element::

    def huber(x, y, a, p):          # input, target, auxiliary value, parameters
        d = x - y
        ...
        return loss, gradient       # d loss / d x

    def huber_hessian(x, y, a, p):  # optional: d^2 loss / d x^2, for grad_hess
        ...

- ``x``, ``y``: the input and target elements; ``a``: the element of the loss's optional
  auxiliary array (e.g. ``pos_weight``), or 1 where the loss has none; ``p``: a tuple of
  float parameters (``Prepared.params`` in order, e.g. ``(delta,)``).
- Arithmetic, comparisons and selects (``v if c else w``), ``abs``, ``min``/``max``, and the
  functions of ``lossforge.runtime.mathfn`` (``exp``, ``log``, ``log1p``,
  ``exp_nonpositive``, ``log_native``, ``log1p_unit_native``, ``like``) called through that
  module: on the GPU the template gives the formula CUDA versions of them. Selects, not
  ``if`` statements, so that the CPU loop vectorizes. A formula may call plain functions of
  its own module written the same way (``helpers``), e.g. terms it shares with its Hessian:
  they are compiled with it, inlined on the CPU and device functions on the GPU.

:class:`Elementwise` makes, from a formula, the CPU kernel (fixed chunks of
``runtime.cpu.CHUNK`` elements and float64 sums added in a fixed order, so results are the
same for any thread count; a serial variant below ``parallel_min`` elements; Numba's on-disk
cache), the CUDA kernel (grid-stride loop, per-block partial sums, an error flag), and the
fast small-input lane of ``value_and_grad`` with default options. The element-wise weight,
per-element losses, ``grad_output``, the reduction's scale and ``out=`` are the template's,
never the formula's. Two precisions:

- ``native=False``: the formula runs in float64 (x and y converted), and element ``k`` of
  every 64-element tile goes to running sum ``k`` (vector adds), for cheap formulas that are
  memory-bound (the regression family);
- ``native=True``: the formula runs in the input's precision (float32 SIMD for float32
  input, as PyTorch computes), a block's losses are summed by ``runtime.cpu.widened_sum`` in
  float64; for formulas with ``exp``/``log`` (the binary family). Constants then come through
  ``mathfn.like(x, c)``, so that a float32 formula stays float32.

:class:`Rowwise` does the same for losses on pairs of rows (a reduction along the last axis,
then per element: the cosine losses), and :class:`Softmax` for losses on rows of logits with
a class target (a formula of the target's log-probability and the row's log-sum-exp; class
weights, ``ignore_index``, label smoothing and probability targets are the template's: the
focal, Poly-1 and z-loss cross entropies, and ``cross_entropy``; with an optional second
formula, their Hessian diagonals). Hand-written kernels remain possible through
``KernelSpec`` for what the templates cannot express: ``nll_loss`` keeps its gather.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np

from lossforge import validate
from lossforge.hookspecs import KernelSpec
from lossforge.validate import Prepared

Formula = Callable[..., Any]


class Elementwise:
    """The kernels of an element-wise loss from its formula.

    formula: ``(x, y, a, p) -> (loss, d loss / d x)``, see the module docstring.
    target_grad: optional ``(x, y, a, p) -> d loss / d y``, for a loss whose second
        argument is differentiable too (``margin_ranking_loss``): ``grads`` then has two
        buffers.
    hessian: optional ``(x, y, a, p) -> d^2 loss / d x^2``, the Hessian diagonal for
        ``Loss.grad_hess`` (weighted and scaled as the gradient is). Where the true second
        derivative is 0 or undefined (a linear piece, a kink), return what a Newton step
        wants, and say what in the loss's docstring.
    native: compute in the input's precision (True) or in float64 (False).
    wide: dtypes (``"float32"``, ``"float64"``) whose CPU kernel uses 512-bit vectors
        (``runtime.cpu.wide_vectors``): a measured choice per formula.
    invalid: optional ``(x, y) -> bool`` formula, True for an element outside the loss's
        domain; ``error(index, x, y)`` returns the exception the call raises for the first
        such element (the CPU checks in its own vectorized pass, the GPU in the kernel).
    parallel_min: elements from which the CPU runs the parallel variant.

    ``Prepared.arrays`` is ``(input, target, weight, auxiliary)`` (``None`` for absent ones)
    and ``Prepared.params`` the formula's parameters by name, in the order of ``p``.
    """

    def __init__(
        self,
        formula: Formula,
        *,
        hessian: Formula | None = None,
        target_grad: Formula | None = None,
        native: bool = False,
        wide: tuple[str, ...] = (),
        invalid: Formula | None = None,
        error: Callable[[int, Any, Any], Exception] | None = None,
        parallel_min: int | None = None,
    ):
        if (invalid is None) != (error is None):
            raise TypeError("invalid and error go together")
        self.formula = formula
        self.hessian = hessian
        self.target_grad = target_grad
        self.native = native
        self.wide = frozenset(np.dtype(d) for d in wide)
        self.invalid = invalid
        self.error = error
        self.parallel_min = parallel_min
        self.__name__ = formula.__name__
        self.__doc__ = formula.__doc__
        self._cuda: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Elementwise {self.formula.__module__}.{self.formula.__qualname__}>"

    # -- CPU -----------------------------------------------------------------------------
    @functools.cached_property
    def kernel(self) -> Any:
        """The serial/parallel ``KernelPair`` (compiled on first call, then cached on disk):
        ``kernel(n, x, y, w, a, p, loss_out, grad_out, grad2_out, hess_out, go, scale,
        wide)`` on flat arrays, ``None`` for absent ones, returns the float64 sum of the
        (weighted) losses."""
        from lossforge.runtime import cpu

        body = cpu.native_elementwise if self.native else cpu.float64_elementwise
        return cpu.KernelPair(
            body,
            **({} if self.parallel_min is None else {"parallel_min": self.parallel_min}),
            name=_kernel_name(self.formula, body.__name__, self.hessian, self.target_grad),
            namespace={
                "formula": cpu.inline(self.formula),
                "hessian": cpu.no_hessian if self.hessian is None else cpu.inline(self.hessian),
                "target_grad": (
                    cpu.no_hessian if self.target_grad is None else cpu.inline(self.target_grad)
                ),
            },
        )

    @functools.cached_property
    def _checks(self) -> tuple[Any, Any]:
        """(count, first) of the elements ``invalid`` flags: a vectorized count on every
        call, the search for the first on bad input only."""
        from lossforge.runtime import cpu

        assert self.invalid is not None
        namespace = {"invalid": cpu.inline(self.invalid)}
        count = cpu.KernelPair(
            cpu.count_invalid,
            name=_kernel_name(self.invalid, "count_invalid"),
            namespace=namespace,
        )
        name = _kernel_name(self.invalid, "first_invalid")
        return count, cpu.jit(clone(cpu.first_invalid, name, namespace))

    @staticmethod
    def _params(p: Any) -> tuple[float, ...]:
        """The formula's ``p``: ``Prepared.params`` in order, as floats."""
        return tuple(float(v) for v in p.params.values())

    def _wide(self, dtype: np.dtype) -> bool | None:
        """``True`` (512-bit vectors) for the dtypes in ``wide``, else ``None`` (pruned)."""
        return True if dtype in self.wide else None

    def _check(self, x: np.ndarray, y: np.ndarray) -> None:
        """Raise the formula's error for its first invalid element, if there is one."""
        if self.invalid is None:
            return
        count, first = self._checks
        if count(x.size, x, y):
            i = first(x, y)
            raise self.error(i, x[i], y[i])  # type: ignore[misc]

    def cpu(self, p: Any, loss_out: Any, grads: Any, grad_output: Any, scale: float) -> float:
        """The ``KernelSpec`` function on the CPU."""
        return self.cpu_hessian(p, loss_out, grads, None, grad_output, scale)

    def cpu_hessian(
        self, p: Any, loss_out: Any, grads: Any, hessians: Any, grad_output: Any, scale: float
    ) -> float:
        """The ``KernelSpec.hessian`` function on the CPU (``cpu`` with a Hessian buffer)."""
        x, y, w, a = p.arrays
        x, y = x.ravel(), y.ravel()
        self._check(x, y)
        return self.kernel(
            x.size,
            x,
            y,
            w.ravel() if w is not None and w.size else None,
            None if a is None else a.ravel(),
            self._params(p),
            None if loss_out is None else loss_out.ravel(),
            grads[0].ravel() if grads else None,
            grads[1].ravel() if grads and len(grads) > 1 else None,
            hessians[0].ravel() if hessians else None,
            grad_output.ravel() if grads and grad_output is not None else None,
            scale,
            self._wide(x.dtype),
        )

    def fast(self, arrays: tuple[Any, ...], out: Any, params: tuple[float, ...] = ()) -> Any:
        """``value_and_grad(input, target, out=out)`` with the default options (``"mean"``,
        ``params``): the general path's kernel and arguments without its per-call layers, for
        NumPy arrays that are already what the kernel takes; ``None`` for anything else, bad
        input included (the general path then says what is wrong)."""
        from lossforge.runtime.cpu import ready_elementwise

        ready = ready_elementwise(arrays, out)
        if ready is None:
            return None
        x, y, out, grad = ready
        n = x.size
        if self.invalid is not None and self._checks[0](n, x, y):
            return None
        wide = self._wide(x.dtype)
        if self.target_grad is not None:
            return None  # two gradients: the general path
        total = self.kernel(n, x, y, None, None, params, None, grad, None, None, None, 1 / n, wide)
        return out.dtype.type(total / n), out

    # -- row means (multilabel_soft_margin_loss: each row's value is the mean of its
    # elements' losses). Prepared.arrays are (rows, classes) arrays; value_shape (rows,) or ().
    def cpu_rows(self, p: Any, loss_out: Any, grads: Any, grad_output: Any, scale: float) -> float:
        """The ``KernelSpec`` function on the CPU of the row-mean form: the element kernel
        over all elements with the scale divided by the class count (the total needs no
        rows), per-row values summed from per-element losses afterwards."""
        return self.cpu_rows_hessian(p, loss_out, grads, None, grad_output, scale)

    def cpu_rows_hessian(
        self, p: Any, loss_out: Any, grads: Any, hessians: Any, grad_output: Any, scale: float
    ) -> float:
        """``cpu_rows`` with a Hessian buffer."""
        x, y, w, a = p.arrays
        rows, classes = x.shape
        if not classes:  # no classes: every row's mean is nan (PyTorch's 0 / 0)
            if loss_out is not None:
                loss_out[...] = np.nan
            return float("nan") if rows else 0.0
        elements: Any = None if loss_out is None else np.empty(x.size, x.dtype)
        go = None
        if (grads or hessians) and grad_output is not None:
            go = np.repeat(grad_output.ravel(), classes)
        self._check(x.ravel(), y.ravel())
        total = self.kernel(
            x.size,
            x.ravel(),
            y.ravel(),
            w.ravel() if w is not None and w.size else None,
            None if a is None else a.ravel(),
            self._params(p),
            elements,
            grads[0].ravel() if grads else None,
            None,
            hessians[0].ravel() if hessians else None,
            go,
            scale / classes,
            self._wide(x.dtype),
        )
        if loss_out is not None:
            row_sums = elements.reshape(rows, classes).sum(axis=1, dtype=np.float64)
            loss_out.reshape(-1)[...] = row_sums / classes
        return total / classes

    def fast_rows(self, arrays: tuple[Any, ...], out: Any, params: tuple[float, ...] = ()) -> Any:
        """``fast`` for the row-mean form, of an ``(N, C)`` or ``(C)`` input: the element
        losses summed over all elements, divided by C and, for ``"mean"``, by N."""
        from lossforge.runtime.cpu import ready_elementwise

        ready = ready_elementwise(arrays, out)
        if ready is None or arrays[0].ndim not in (1, 2) or not arrays[0].shape[-1]:
            return None
        x, y, out, grad = ready
        if self.invalid is not None and self._checks[0](x.size, x, y):
            return None
        classes = arrays[0].shape[-1]
        rows = x.size // classes
        scale = 1 / rows / classes
        wide = self._wide(x.dtype)
        total = self.kernel(
            x.size, x, y, None, None, params, None, grad, None, None, None, scale, wide
        )
        return out.dtype.type(total / classes / rows), out

    # -- CUDA ----------------------------------------------------------------------------
    def _cuda_kernel(self, template: str) -> Any:
        from lossforge.runtime import cuda as rt

        found = self._cuda.get(template)
        if found is None:
            make = getattr(rt, f"{template}_kernel")
            found = self._cuda[template] = make(
                self.formula,
                self.invalid,
                self.hessian,
                _kernel_name(self.formula, f"cuda_{template}", self.hessian, self.target_grad),
                **({} if self.target_grad is None else {"target_grad": self.target_grad}),
            )
        return found

    def _cuda_params(self, p: Any) -> tuple[float, ...]:
        return self._params(p) or (0.0,)  # no empty tuple argument

    def cuda(self, p: Any, loss_out: Any, grads: Any, grad_output: Any, scale: float) -> float:
        """The ``KernelSpec`` function on CUDA (the CUDA stack is imported on first call)."""
        return self.cuda_hessian(p, loss_out, grads, None, grad_output, scale)

    def cuda_hessian(
        self, p: Any, loss_out: Any, grads: Any, hessians: Any, grad_output: Any, scale: float
    ) -> float:
        """The ``KernelSpec.hessian`` function on CUDA."""
        from lossforge.runtime import cuda as rt

        kernel = self._cuda_kernel("elementwise")
        x, y, w, a = p.arrays
        n = x.size
        if n == 0:
            return 0.0
        dtype = p.dtype
        blocks = rt.blocks_for(n)
        scratch = rt.partials(blocks)
        kernel[blocks, rt.THREADS, rt.stream()](
            rt.flat(x, dtype),
            rt.flat(y, dtype),
            rt.flat(w, dtype),
            rt.flat(a, dtype),
            self._cuda_params(p),
            rt.flat(loss_out, dtype),
            rt.flat(grads[0], dtype) if grads else rt.nothing(dtype),
            rt.flat(grads[1], dtype) if grads and len(grads) > 1 else rt.nothing(dtype),
            rt.flat(hessians[0], dtype) if hessians else rt.nothing(dtype),
            rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
            float(scale),
            scratch,
        )
        if self.invalid is None and p.reduction not in ("mean", "sum"):
            return 0.0
        total, bad = rt.finish(scratch)
        if bad >= 0:
            raise self.error(bad, rt.element(x, bad), rt.element(y, bad))  # type: ignore[misc]
        return total

    def cuda_rows(self, p: Any, loss_out: Any, grads: Any, grad_output: Any, scale: float) -> float:
        """The row-mean form on CUDA: each row summed by a group of threads (a whole block for
        long rows) with a fixed tree; the gradient is element-wise and coalesced."""
        return self.cuda_rows_hessian(p, loss_out, grads, None, grad_output, scale)

    def cuda_rows_hessian(
        self, p: Any, loss_out: Any, grads: Any, hessians: Any, grad_output: Any, scale: float
    ) -> float:
        """``cuda_rows`` with a Hessian buffer."""
        from lossforge.runtime import cuda as rt

        if self.invalid is not None:
            raise NotImplementedError("a domain check in the row-mean form on CUDA")
        kernel = self._cuda_kernel("row_mean")
        x, y, w, a = p.arrays
        rows, classes = x.shape
        if rows == 0:
            return 0.0
        if not classes:
            if loss_out is not None:  # every row's mean is nan (PyTorch's 0 / 0)
                loss_out.copy_to_device(
                    np.full(loss_out.shape, np.nan, p.dtype), stream=rt.stream()
                )
            return float("nan")
        dtype = p.dtype
        lanes, blocks = rt.rows_config(rows, classes)
        scratch = rt.partials(blocks)
        kernel[blocks, rt.THREADS, rt.stream()](
            rt.flat(x, dtype),
            rt.flat(y, dtype),
            rt.flat(w, dtype),
            rt.flat(a, dtype),
            self._cuda_params(p),
            rows,
            classes,
            rt.flat(loss_out, dtype),
            rt.flat(grads[0], dtype) if grads else rt.nothing(dtype),
            rt.flat(hessians[0], dtype) if hessians else rt.nothing(dtype),
            rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
            float(scale),
            lanes,
            scratch,
        )
        if p.reduction in ("mean", "sum"):
            return rt.finish(scratch)[0]
        return 0.0

    # -- registration --------------------------------------------------------------------
    def specs(
        self,
        loss: str,
        defaults: tuple[float, ...] = (),
        *,
        rows: bool = False,
        reduction: str = "mean",
    ) -> Iterator[KernelSpec]:
        """The CPU and CUDA ``KernelSpec`` of ``loss``, for a plugin's ``lossforge_kernels``.
        The CPU one comes with the fast lane of ``value_and_grad`` with every option at its
        default: ``defaults`` are the formula's parameters then, ``reduction`` the loss's
        default reduction (the lane serves ``"mean"`` only). ``rows``: the row-mean form
        (each row's value the mean of its elements' losses)."""
        cpu, fast, cuda, cpu_hessian, cuda_hessian = (
            (
                self.cpu_rows,
                self.fast_rows,
                self.cuda_rows,
                self.cpu_rows_hessian,
                self.cuda_rows_hessian,
            )
            if rows
            else (self.cpu, self.fast, self.cuda, self.cpu_hessian, self.cuda_hessian)
        )
        lane = functools.partial(fast, params=defaults) if reduction == "mean" else None
        has = self.hessian is not None
        yield KernelSpec(loss, "cpu", cpu, fast=lane, hessian=cpu_hessian if has else None)
        yield KernelSpec(loss, "cuda", cuda, hessian=cuda_hessian if has else None)


class Rowwise:
    """The kernels of a loss on pairs of rows ``(R, D)`` (the last axis reduced), from a row
    formula in three functions, all in float64:

    terms: ``(x, y) -> (u, v, w)``, per element; each summed along the row.
    row: ``(sums, t, p) -> (value, c0, c1, c2)``: the row's value (its loss) from the
        three sums, the row's target ``t`` (0 without one) and the parameters ``p``; and
        three coefficients for ``grads`` (a flat tuple: Numba's parallel array analysis
        fails on a nested one).
    grads: ``(x, y, c0, c1, c2) -> (d/dx, d/dy)``, per element, linear in the
        coefficients: the template multiplies them by the upstream gradient (times the
        reduction's scale) once a row, so that the element loop has no extra multiply.

    ``Prepared.arrays`` is ``(x1, x2, target)``: two C-contiguous ``(R, D)`` arrays and a
    float64 ``(R,)`` target or ``None``; ``params`` names the entries of ``Prepared.params``
    that make ``p``, in order (others are the loss's own business). Cosine similarity is the
    model: sums of ``x y``, ``x x``, ``y y``.
    """

    def __init__(
        self,
        terms: Formula,
        row: Formula,
        grads: Formula,
        *,
        params: tuple[str, ...] = (),
        parallel_min: int | None = None,
    ):
        self.formulas = (terms, row, grads)
        self.params = params
        self.parallel_min = parallel_min
        self.__name__ = row.__name__
        self._cuda: Any = None

    def __repr__(self) -> str:
        return f"<Rowwise {self.formulas[1].__module__}.{self.__name__}>"

    @functools.cached_property
    def kernel(self) -> Any:
        """``kernel(n, x1, x2, t, p, loss_out, g1, g2, go, scale)``, ``None`` for absent
        arrays; returns the float64 sum of the rows' values."""
        from lossforge.runtime import cpu

        terms, row, grads = self.formulas
        return cpu.KernelPair(
            cpu.rowwise,
            **({} if self.parallel_min is None else {"parallel_min": self.parallel_min}),
            name=_kernel_name(row, "rowwise"),
            namespace={
                "terms": cpu.inline(terms),
                "row": cpu.inline(row),
                "grads": cpu.inline(grads),
            },
        )

    def _params(self, p: Any) -> tuple[float, ...]:
        return tuple(float(p.params[k]) for k in self.params) or (0.0,)  # no empty tuple

    def cpu(self, p: Any, loss_out: Any, grads: Any, grad_output: Any, scale: float) -> float:
        """The ``KernelSpec`` function on the CPU."""
        x1, x2, t = p.arrays
        g1, g2 = (g.reshape(x1.shape) for g in grads) if grads else (None, None)
        return self.kernel(
            x1.size,
            x1,
            x2,
            t,
            self._params(p),
            None if loss_out is None else loss_out.reshape(-1),
            g1,
            g2,
            None if grad_output is None else grad_output.reshape(-1),
            scale,
        )

    def fast(
        self,
        arrays: tuple[Any, ...],
        out: Any,
        params: tuple[float, ...] = (),
        reduced: bool = True,
    ) -> Any:
        """``value_and_grad`` with every option at its default on ready ``(N, D)`` rows (and a
        ``(N)`` target when the loss has one): the general path's kernel without its per-call
        layers; ``None`` for anything else. ``reduced``: the default reduction is ``"mean"``
        (else the value is the rows' values, a loss without a reduction)."""
        from lossforge import validate

        if len(arrays) not in (2, 3):
            return None
        x1, x2 = arrays[0], arrays[1]
        dtype = validate.ready_arrays((x1, x2))
        if dtype is None or x1.ndim != 2 or x1.shape[0] == 0:
            return None
        t = None
        if len(arrays) == 3:
            t = arrays[2]
            if type(t) is not np.ndarray or t.shape != x1.shape[:1] or t.dtype.kind not in "iuf":
                return None
            t = np.ascontiguousarray(t, np.float64)  # as prepare converts it
        if out is None:
            out = (np.empty(x1.shape, dtype), np.empty(x1.shape, dtype))
        elif type(out) is not tuple or len(out) != 2:
            return None
        else:
            inputs = tuple(a for a in arrays if type(a) is np.ndarray)
            if not (
                validate.ready_out(out[0], x1.shape, dtype, (*inputs, out[1]))
                and validate.ready_out(out[1], x1.shape, dtype, inputs)
            ):
                return None
        rows = x1.shape[0]
        params = params or (0.0,)
        if not reduced:
            value = np.empty(rows, dtype)
            self.kernel(x1.size, x1, x2, t, params, value, out[0], out[1], None, 1.0)
            return value, out
        total = self.kernel(x1.size, x1, x2, t, params, None, out[0], out[1], None, 1 / rows)
        return dtype.type(total / rows), out

    def cuda(self, p: Any, loss_out: Any, grads: Any, grad_output: Any, scale: float) -> float:
        """The ``KernelSpec`` function on CUDA."""
        from lossforge.runtime import cuda as rt

        if self._cuda is None:
            self._cuda = rt.rowwise_kernel(
                self.formulas, _kernel_name(self.formulas[1], "cuda_rowwise")
            )
        x1, x2, t = p.arrays
        rows, dim = x1.shape
        if rows == 0:
            return 0.0
        dtype = p.dtype
        lanes, blocks = rt.rows_config(rows, dim)
        scratch = rt.partials(blocks)
        self._cuda[blocks, rt.THREADS, rt.stream()](
            rt.flat(x1, dtype),
            rt.flat(x2, dtype),
            rt.flat(t, np.dtype(np.float64)),
            self._params(p),
            rows,
            dim,
            rt.flat(loss_out, dtype),
            rt.flat(grads[0], dtype) if grads else rt.nothing(dtype),
            rt.flat(grads[1], dtype) if grads else rt.nothing(dtype),
            rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
            float(scale),
            lanes,
            scratch,
        )
        if p.reduction in ("mean", "sum"):
            return rt.finish(scratch)[0]
        return 0.0

    def specs(
        self, loss: str, defaults: tuple[float, ...] = (), *, reduction: str | None = "mean"
    ) -> Iterator[KernelSpec]:
        """The CPU (with its fast lane for 2-D inputs whose rows are the reduced axis under
        the default options: ``defaults`` the parameters then, ``reduction`` the default
        reduction, ``None`` for a loss without one) and CUDA ``KernelSpec`` of ``loss``."""
        lane = None
        if reduction in ("mean", None):
            lane = functools.partial(self.fast, params=defaults, reduced=reduction == "mean")
        yield KernelSpec(loss, "cpu", self.cpu, fast=lane)
        yield KernelSpec(loss, "cuda", self.cuda)


class Softmax:
    """The kernels of a softmax-type loss on rows of logits ``z`` ``(R, C)`` with a class
    target, from a row formula (float64)::

        def row(logp, lse, p):      # log p_c = z_c - lse, lse = log sum_j exp(z_j), params
            ...
            return loss, a, b       # d loss / d z_j = a p_j + b [j == c], p = softmax(z)

    the loss of a row whose target is class ``c``. The template owns the rest: the row's
    maximum and log-sum-exp, class indices with ``ignore_index`` or class-probability
    targets, class weights, label smoothing, ``grad_output`` and the reduction's scale. A
    row's loss is ``sum_c q_c w_c loss(log p_c, lse)`` over its target distribution ``q``
    (one-hot for an index, else the probabilities; smoothed to ``(1 - e) q + e / C``), its
    gradient ``A p_j + q_j w_j b_j`` with ``A = sum_c q_c w_c a_c``. An index target without
    smoothing calls the formula once a row; the other cases once a class. For
    ``cross_entropy``'s formula (``loss = -logp``, ``a = 1``, ``b = -1``) this is PyTorch's
    ``cross_entropy`` in every option.

    transform: optional per-logit ``(z, p) -> (z', dz'/dz)`` in the logits' precision (logit
        soft-capping), applied first where the loss's ``prepare`` sets
        ``params["transform"]``; the gradient gets the chain rule per element.
    row_hessian: optional ``(logp, lse, p) -> (f_uu, f_uv, f_vv)``, the second derivatives
        of the row formula's loss ``f(u, v)`` in ``u = logp`` and ``v = lse`` (cross entropy:
        zeros): with it the template derives ``Loss.grad_hess``, the Hessian diagonal
        ``sum_c Q_c (a_c p_j (1 - p_j) + f_uu (d_jc - p_j)^2 + 2 f_uv (d_jc - p_j) p_j +
        f_vv p_j^2)`` (``runtime.cpu.softmax_hessian``); without it ``grad_hess`` raises
        ``NotImplementedError``.
    transform_hessian: optional ``(z, z', dz'/dz, p) -> d^2z'/dz^2``, the transform's
        curvature, for the chain rule of the Hessian (``h = h' s^2 + g' s'``); a loss with a
        transform and none refuses ``grad_hess`` where the transform applies.
    params: the names of ``Prepared.params`` that make ``p``, in order.
    parallel_min: elements from which the CPU runs the parallel variant.
    constant_coefficients: the formula's ``a`` and ``b`` are constants (cross entropy's
        ``1`` and ``-1``), so that it is affine in ``logp`` with slope ``b``: the smoothing
        mass's loss ``sum_j q_j loss(logp_j)`` then comes from ``sum_j w_j z_j`` and one
        formula call a row, not a call a class (cross entropy's smoothed rows of 100 classes
        ran 33% slower with the calls per class).

    ``Prepared.arrays`` is ``(rows of logits (R, C), class indices (R) int64 or
    probabilities (R, C), class weights (C) or length 0)``, all C-contiguous, and
    ``Prepared.params`` holds ``moved`` (the shape of the rows before they were flattened,
    for a K-dimensional input whose class axis was moved last; else ``None``),
    ``probabilities``, ``ignore_index``, ``label_smoothing`` and ``transform``: what the
    multiclass plugin's ``prepare`` makes of ``cross_entropy``'s arguments.

    The CPU kernels (``runtime.cpu``): ``softmax_few`` for class indices with at most
    ``FEW_CLASSES`` classes (rows transposed in blocks, every loop along rows),
    ``softmax_index`` for longer rows, ``softmax_probs`` for probability targets; each case
    (weights, smoothing, long rows, the transform) compiles without the others' code. A
    small call with the default options takes the fast lane when ``specs`` is given the
    default parameters.
    """

    def __init__(
        self,
        row: Formula,
        *,
        transform: Formula | None = None,
        row_hessian: Formula | None = None,
        transform_hessian: Formula | None = None,
        params: tuple[str, ...] = (),
        parallel_min: int | None = None,
        constant_coefficients: bool = False,
    ):
        self.row = row
        self.transform = transform
        self.row_hessian = row_hessian
        self.transform_hessian = transform_hessian
        self.params = params
        self.parallel_min = parallel_min
        self.constant_coefficients = constant_coefficients
        self.__name__ = row.__name__
        self.__doc__ = row.__doc__
        self._cuda: Any = None
        self._cuda_hessian: Any = None

    def __repr__(self) -> str:
        return f"<Softmax {self.row.__module__}.{self.row.__qualname__}>"

    @functools.cached_property
    def kernels(self) -> Any:
        """``(few, index, probs, checked)``: ``runtime.cpu.softmax_few``, ``softmax_index``
        and ``softmax_probs`` made from the formula (``KernelPair``), and the fast lane's
        ``softmax_checked``."""
        from lossforge.runtime import cpu

        identity = cpu.no_transform if self.transform is None else cpu.inline(self.transform)
        namespace = {
            "row": cpu.inline(self.row),
            "transform": identity,
            "constant_coefficients": self.constant_coefficients,
        }
        suffix = "_constant" if self.constant_coefficients else ""
        options = {} if self.parallel_min is None else {"parallel_min": self.parallel_min}
        few, index, probs = (
            cpu.KernelPair(
                body,
                **options,
                name=_kernel_name(self.row, body.__name__ + suffix, self.transform),
                namespace=namespace,
            )
            for body in (cpu.softmax_few, cpu.softmax_index, cpu.softmax_probs)
        )
        checked = cpu.jit(
            clone(
                cpu.softmax_checked,
                _kernel_name(self.row, "softmax_checked" + suffix, self.transform),
                {
                    # a KernelPair that replaces its function's name in cpu.py (mypy sees the def)
                    "check_targets_serial": cast(Any, cpu.check_class_targets).serial,
                    "few_serial": few.serial,
                    "index_serial": index.serial,
                },
            )
        )
        return few, index, probs, checked

    @functools.cached_property
    def hessian_kernel(self) -> Any:
        """``runtime.cpu.softmax_hessian`` made from the formula and its ``row_hessian``
        (``KernelPair``)."""
        from lossforge.runtime import cpu

        assert self.row_hessian is not None
        curvature = self.transform_hessian
        return cpu.KernelPair(
            cpu.softmax_hessian,
            **({} if self.parallel_min is None else {"parallel_min": self.parallel_min}),
            name=_kernel_name(
                self.row, "softmax_hessian", self.row_hessian, self.transform, curvature
            ),
            namespace={
                "row": cpu.inline(self.row),
                "row_hessian": cpu.inline(self.row_hessian),
                "transform": (
                    cpu.no_transform if self.transform is None else cpu.inline(self.transform)
                ),
                "transform_hessian": (
                    cpu.no_transform_hessian if curvature is None else cpu.inline(curvature)
                ),
            },
        )

    def _params(self, p: Any) -> tuple[float, ...]:
        return tuple(float(p.params[k]) for k in self.params) or (0.0,)  # no empty tuple

    def _transformed(self, p: Any) -> bool:
        """Whether the call applies the transform; for ``grad_hess``, a
        ``NotImplementedError`` where it does and the transform's curvature is not given."""
        transformed = bool(p.params.get("transform") and self.transform)
        if transformed and self.transform_hessian is None:
            raise NotImplementedError(
                f"{self.__name__}: no Hessian through its transform "
                f"({getattr(self.transform, '__name__', 'transform')})"
            )
        return transformed

    def cpu_hessian(
        self, p: Any, loss_out: Any, grads: Any, hessians: Any, grad_output: Any, scale: float
    ) -> float:
        """The ``KernelSpec.hessian`` function on the CPU (``runtime.cpu.softmax_hessian``)."""
        transformed = self._transformed(p)
        z, t, w = p.arrays
        probabilities = p.params["probabilities"]
        moved = p.params["moved"]
        grad, hess = grads[0], hessians[0]
        if moved is None:  # a 1-D input is one row
            rows_grad, rows_hess = grad.reshape(z.shape), hess.reshape(z.shape)
        else:
            rows_grad, rows_hess = np.empty_like(z), np.empty_like(z)
        nothing = validate.no_weight(z.dtype, "cpu")
        total = self.hessian_kernel(
            z.size,
            z,
            np.empty(0, np.int64) if probabilities else t,
            t if probabilities else np.empty((0, z.shape[1]), z.dtype),
            w,
            self._params(p),
            probabilities,
            p.params["ignore_index"],
            float(p.params["label_smoothing"]),
            transformed,
            nothing if loss_out is None else loss_out.reshape(-1),
            rows_grad,
            rows_hess,
            nothing if grad_output is None else grad_output.reshape(-1),
            scale,
        )
        if moved is not None:  # (N, d1, ..., dk, C) back to (N, C, d1, ..., dk)
            np.copyto(grad, np.moveaxis(rows_grad.reshape(moved), -1, 1))
            np.copyto(hess, np.moveaxis(rows_hess.reshape(moved), -1, 1))
        return total

    def cpu(self, p: Any, loss_out: Any, grads: Any, grad_output: Any, scale: float) -> float:
        """The ``KernelSpec`` function on the CPU."""
        from lossforge.runtime import cpu

        few, index, probs, _ = self.kernels
        z, t, w = p.arrays
        moved = p.params["moved"]
        grad = grads[0] if grads else None
        rows_grad: Any = None
        if grad is not None:  # the rows' gradient, moved back after a K-dimensional input
            rows_grad = np.empty_like(z) if moved is not None else grad.reshape(z.shape)
        smoothing = float(p.params["label_smoothing"])
        classes = z.shape[1]
        arrays = (
            w if w.size else None,
            self._params(p),
        )
        nothing = validate.no_weight(z.dtype, "cpu")  # empty: an absent output or grad_output
        outputs = (
            nothing if loss_out is None else loss_out.reshape(-1),
            np.empty((0, 0), z.dtype) if rows_grad is None else rows_grad,
            nothing if grad_output is None else grad_output.reshape(-1),
            scale,
        )
        # a type to Numba (True or None): compiled out when there is no transform
        transformed = True if p.params.get("transform") and self.transform else None
        if p.params["probabilities"]:
            long = cpu.long_rows_for(classes)
            total = probs(z.size, z, t, *arrays, smoothing, long, transformed, *outputs)
        elif classes <= cpu.FEW_CLASSES:
            ignore = p.params["ignore_index"]
            total = few(z.size, z, t, *arrays, ignore, smoothing, transformed, *outputs)
        else:
            ignore = p.params["ignore_index"]
            smooth = smoothing or None
            long = cpu.long_rows_for(classes)
            total = index(z.size, z, t, *arrays, ignore, smooth, long, transformed, *outputs)
        if moved is not None and grad is not None:  # (N, d1, ..., dk, C) -> (N, C, d1, ...)
            np.copyto(grad, np.moveaxis(rows_grad.reshape(moved), -1, 1))
        return total

    def fast(self, arrays: tuple[Any, ...], out: Any, params: tuple[float, ...]) -> Any:
        """``value_and_grad(input, target, out=out)`` with the default options (``"mean"``,
        no weight, ``ignore_index`` -100, no smoothing; ``params`` the defaults' ``p``) on
        small ready NumPy rows: what the general path computes, with the same serial kernel
        and arguments, minus its per-call layers. ``None`` for anything else (bad targets
        and an all-ignored batch included) and for inputs that run in parallel, where the
        layers cost nothing in comparison: the general path handles those."""
        if len(arrays) != 2:
            return None
        x, t = arrays
        dtype = validate.ready_rows(x, t)
        _, index, _, checked = self.kernels
        if dtype is None or x.size >= index.parallel_min:
            return None
        if out is None:
            out = np.empty(x.shape, dtype)
        elif not validate.ready_out(out, x.shape, dtype, arrays):
            return None
        total, denominator = checked(x, t, out, params)
        if not denominator:
            return None
        return dtype.type(total / denominator), out

    def cuda(self, p: Any, loss_out: Any, grads: Any, grad_output: Any, scale: float) -> float:
        """The ``KernelSpec`` function on CUDA: a group of threads a row
        (``runtime.cuda.softmax_rows_kernel``)."""
        from lossforge.runtime import cuda as rt

        if self._cuda is None:
            self._cuda = rt.softmax_rows_kernel(
                self.row, self.transform, _kernel_name(self.row, "cuda_softmax", self.transform)
            )
        z, t, w = p.arrays
        rows, classes = z.shape
        if rows == 0:
            return 0.0
        dtype = p.dtype
        moved = p.params["moved"]
        grad = grads[0] if grads else None
        rows_grad: Any = None
        if grad is not None:
            rows_grad = grad if moved is None else rt.empty(z.shape, dtype)
        probabilities = p.params["probabilities"]
        lanes, blocks = rt.rows_config(rows, classes)
        scratch = rt.partials(blocks)
        self._cuda[blocks, rt.THREADS, rt.stream()](
            rt.flat(z, dtype),
            rt.nothing(np.dtype(np.int64)) if probabilities else t.ravel(),
            rt.flat(t, dtype) if probabilities else rt.nothing(dtype),
            rt.flat(w, dtype),
            self._params(p),
            rows,
            classes,
            p.params["ignore_index"],
            float(p.params["label_smoothing"]),
            bool(p.params.get("transform") and self.transform),
            rt.flat(loss_out, dtype),
            rt.flat(rows_grad, dtype),
            rt.flat(grad_output, dtype) if grads else rt.nothing(dtype),
            float(scale),
            lanes,
            scratch,
        )
        if grad is not None and moved is not None:
            rt.copy_into(grad, rt.moveaxis(rows_grad.reshape(moved), -1, 1))
        if p.reduction in ("mean", "sum"):
            return rt.finish(scratch)[0]
        return 0.0

    def cuda_hessian(
        self, p: Any, loss_out: Any, grads: Any, hessians: Any, grad_output: Any, scale: float
    ) -> float:
        """The ``KernelSpec.hessian`` function on CUDA: a group of threads a row
        (``runtime.cuda.softmax_hessian_kernel``)."""
        from lossforge.runtime import cuda as rt

        if self._cuda_hessian is None:
            self._cuda_hessian = rt.softmax_hessian_kernel(
                (self.row, self.row_hessian, self.transform, self.transform_hessian),
                _kernel_name(
                    self.row,
                    "cuda_softmax_hessian",
                    self.row_hessian,
                    self.transform,
                    self.transform_hessian,
                ),
            )
        z, t, w = p.arrays
        rows, classes = z.shape
        transformed = self._transformed(p)
        if rows == 0:
            return 0.0
        dtype = p.dtype
        moved = p.params["moved"]
        grad, hess = grads[0], hessians[0]
        if moved is None:
            rows_grad, rows_hess = grad, hess
        else:
            rows_grad, rows_hess = rt.empty(z.shape, dtype), rt.empty(z.shape, dtype)
        probabilities = p.params["probabilities"]
        lanes, blocks = rt.rows_config(rows, classes)
        scratch = rt.partials(blocks)
        self._cuda_hessian[blocks, rt.THREADS, rt.stream()](
            rt.flat(z, dtype),
            rt.nothing(np.dtype(np.int64)) if probabilities else t.ravel(),
            rt.flat(t, dtype) if probabilities else rt.nothing(dtype),
            rt.flat(w, dtype),
            self._params(p),
            rows,
            classes,
            probabilities,
            p.params["ignore_index"],
            float(p.params["label_smoothing"]),
            transformed,
            rt.flat(loss_out, dtype),
            rt.flat(rows_grad, dtype),
            rt.flat(rows_hess, dtype),
            rt.flat(grad_output, dtype),
            float(scale),
            lanes,
            scratch,
        )
        if moved is not None:  # (N, d1, ..., dk, C) back to (N, C, d1, ..., dk)
            rt.copy_into(grad, rt.moveaxis(rows_grad.reshape(moved), -1, 1))
            rt.copy_into(hess, rt.moveaxis(rows_hess.reshape(moved), -1, 1))
        if p.reduction in ("mean", "sum"):
            return rt.finish(scratch)[0]
        return 0.0

    def specs(self, loss: str, defaults: dict[str, float] | None = None) -> Iterator[KernelSpec]:
        """The CPU and CUDA ``KernelSpec`` of ``loss``, for a plugin's ``lossforge_kernels``:
        ``defaults``, the formula's parameters (by name) under the loss's default options,
        gives the CPU kernel a fast lane; with a ``row_hessian``, the ``grad_hess``
        kernels."""
        fast = None
        if defaults is not None:
            params = tuple(float(defaults[k]) for k in self.params) or (0.0,)
            fast = functools.partial(self.fast, params=params)
        derived = self.row_hessian is not None
        cpu_hessian = self.cpu_hessian if derived else None
        cuda_hessian = self.cuda_hessian if derived else None
        yield KernelSpec(loss, "cpu", self.cpu, fast=fast, hessian=cpu_hessian)
        yield KernelSpec(loss, "cuda", self.cuda, hessian=cuda_hessian)


def prepare(
    arrays: tuple[Any, ...],
    options: dict[str, Any],
    backend: str,
    *,
    names: tuple[str, ...] = ("input", "target"),
    params: dict[str, float] | None = None,
    weighted_mean: bool = False,
    grads: int = 1,
) -> Prepared:
    """The ``Prepared`` an ``Elementwise`` kernel takes, for a loss of two or three
    same-shaped float arrays (called ``names`` in error messages; a third is the formula's
    auxiliary ``a``, e.g. margin_ranking_loss's target) with an optional ``"weight"`` option
    of their shape: checked and normalised by ``validate.elementwise``. ``params``: the
    formula's parameters by name, already validated; ``weighted_mean``: ``"mean"`` divides by
    the summed weights (PyTorch's ``mse_loss``/``l1_loss``), else by the element count;
    ``grads``: how many of the arrays, from the first, have a gradient (2 with a
    ``target_grad`` formula)."""
    if len(arrays) != len(names) or len(names) not in (2, 3):
        raise TypeError(f"prepare takes two or three arrays named by names, got {names!r}")
    (x, y, *rest), w, dtype, dtypes, shape = validate.elementwise(
        arrays, names, options.get("weight"), backend
    )
    weighted = weighted_mean and w.size
    return Prepared(
        arrays=(x, y, w, rest[0] if rest else None),
        params=params or {},
        reduction=options.get("reduction"),
        denominator=validate.total(w, backend) if weighted else float(math.prod(shape)),
        value_shape=shape,
        grad_shapes=(shape,) * grads,
        dtype=dtype,
        result_dtypes=dtypes[: 1 + grads],
        backend=backend,
    )


def _kernel_name(formula: Formula, template: str, *extra: Formula | None) -> str:
    """A kernel's name: its template, its formula (and Hessian), and a digest of the
    formula's module source. Numba's disk cache keys a kernel on the template's file and this
    name; the digest makes an edited formula (or a helper beside it) a new kernel instead of
    a stale hit."""
    for other in extra:  # the Hessian and target-gradient formulas, where given
        if other is not None:
            template = f"{template}_{other.__name__}"
    module = sys.modules.get(formula.__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = formula.__code__.co_code.hex()
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    return f"{template}_{formula.__module__.replace('.', '_')}_{formula.__name__}_{digest}"


def unspecialised(*args: Any) -> Any:
    """What a template body's formula names (``formula``, ``hessian``, ``target_grad``,
    ``invalid``,
    ``terms``, ``row``, ``grads``, ``store``) stand for until ``clone`` gives them a loss's
    functions."""
    raise NotImplementedError("a template body runs only as a formula's kernel")


def helpers(fn: Callable) -> dict[str, Callable]:
    """The helpers ``fn`` calls: the plain functions of its own module that it names. A
    formula may share terms with its Hessian through one, written as formulas are; the
    templates compile it with the formula (``runtime.cpu.inline``,
    ``runtime.cuda.device_formula``), and the kernel's name digests the module's source."""
    glob = fn.__globals__
    return {
        name: glob[name]
        for name in fn.__code__.co_names
        if isinstance(glob.get(name), types.FunctionType)
        and glob[name].__module__ == fn.__module__
        and glob[name].__code__ is not fn.__code__
    }


def clone(fn: Callable, name: str, namespace: dict[str, Any] | None = None) -> Callable:
    """``fn`` under another name, its globals overlaid with ``namespace``: how a template's
    body is specialised to a formula (Numba resolves globals when it compiles)."""
    glob = fn.__globals__ if namespace is None else {**fn.__globals__, **namespace}
    copy = types.FunctionType(fn.__code__, glob, name, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = name
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    return copy
