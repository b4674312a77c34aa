"""``Loss``: one registered loss, callable like its ``torch.nn.functional`` namesake.

Per call: options merged with the defaults -> the family's ``prepare`` (validation and
normalisation, see ``lossforge.validate``) -> the backend chosen by ``lossforge.dispatch`` ->
the kernel, resolved once per backend and cached here. Reductions are applied here and
nowhere else: kernels return the sum of the per-element losses and ``"mean"`` divides it by
the ``denominator`` that ``prepare`` computed.
"""

from __future__ import annotations

import inspect
import math
from types import MappingProxyType
from typing import Any

import numpy as np

from lossforge import dispatch, validate
from lossforge.errors import PluginError
from lossforge.hookspecs import LossSpec

# Errors a kernel may raise on purpose (e.g. a class index found out of range); any other
# exception from a kernel is a plugin's fault and is reported naming the plugin.
_CONTRACT_ERRORS = (ValueError, TypeError, IndexError, NotImplementedError)
_UNRESOLVED = object()


class Loss:
    """A loss and its gradient. Obtain it with ``lossforge.get(name)``."""

    def __init__(self, spec: LossSpec, plugin: str, registry: Any):
        self.spec = spec
        self.name = spec.name
        self.family = spec.family
        self.plugin = plugin
        self.arguments = tuple(spec.arguments)
        self.differentiable = tuple(spec.differentiable)
        self.options = MappingProxyType(dict(spec.options))
        self.reduced = "reduction" in spec.options
        self._reductions = (*validate.REDUCTIONS, *spec.reductions)
        self.__doc__ = spec.doc
        self.__name__ = spec.name
        self.__signature__ = inspect.Signature(
            [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in self.arguments]
            + [
                inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
                for k, v in spec.options.items()
            ]
            + [inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None)]
        )
        self._defaults = dict(spec.options)
        self._registry = registry
        self._kernels: dict[str, tuple[Any, str]] = {}
        self._hessians: dict[str, tuple[Any, str]] = {}
        self._fast: Any = _UNRESOLVED  # KernelSpec.fast of the CPU kernel, resolved once

    def __repr__(self) -> str:
        return f"<Loss {self.name} ({self.family}, plugin {self.plugin!r})>"

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends with a kernel, in ``("cpu", "cuda")`` order."""
        have = self._registry.backends(self.name)
        return tuple(b for b in dispatch.BACKENDS if b in have)

    @property
    def suppliers(self) -> dict[str, str]:
        """backend -> the plugin whose kernel runs on it (a plugin may override a backend)."""
        return self._registry.backends(self.name)

    # -- the public calls ----------------------------------------------------------------
    def __call__(self, *arrays: Any, **options: Any) -> Any:
        """The loss value; see the loss's docstring for arguments and options."""
        return self._run(arrays, options, True, False, None, None)[0]

    def grad(self, *arrays: Any, grad_output: Any = None, out: Any = None, **options: Any) -> Any:
        """The vector-Jacobian product with respect to the differentiable arguments: an
        array, or a tuple of arrays when there are several (``self.differentiable``)."""
        return self._run(arrays, options, False, True, grad_output, out)[1]

    def value_and_grad(
        self, *arrays: Any, grad_output: Any = None, out: Any = None, **options: Any
    ) -> tuple[Any, Any]:
        """``(value, grad)`` from one fused pass; ``out=`` receives the gradient."""
        if not options and grad_output is None:  # the kernel's own fast path, if it has one
            fast = self._fast
            if fast is _UNRESOLVED:
                fast = self._fast = self._registry.fast_path(self.name)
            if fast is not None:
                result = fast(arrays, out)
                if result is not None:
                    return result
        return self._run(arrays, options, True, True, grad_output, out)

    def grad_hess(
        self, *arrays: Any, grad_output: Any = None, out: Any = None, **options: Any
    ) -> tuple[Any, Any]:
        """``(gradient, Hessian diagonal)`` with respect to the first differentiable argument
        (``self.differentiable[0]``), from one fused pass: per element, the first and second
        derivative of the (weighted) loss, scaled by the reduction and ``grad_output`` as
        ``grad`` is. ``out=(grad, hess)`` receives them. What gradient boosting takes from a
        custom objective; ``NotImplementedError`` for a loss without a Hessian."""
        _, grad, hess = self._run(arrays, options, False, True, grad_output, out, True)
        return grad, hess

    def value_grad_hess(
        self, *arrays: Any, grad_output: Any = None, out: Any = None, **options: Any
    ) -> tuple[Any, Any, Any]:
        """``(value, gradient, Hessian diagonal)`` from one fused pass: see ``grad_hess``."""
        return self._run(arrays, options, True, True, grad_output, out, True)

    def partial(self, *arrays: Any, **options: Any) -> tuple[float, float]:
        """``(total, denominator)`` as float64: the summed (weighted) losses and what
        ``"mean"`` divides them by, or, given one of the loss's own reductions
        (``reduction="batchmean"`` for kl_div), what that one divides by. Chunks of a large
        input combine by adding pairs. For a loss whose ``"mean"`` weighs each loss
        (``LossSpec.weighted_mean``, ctc_loss), always the mean's pair."""
        if not self.reduced:
            raise TypeError(f"{self.name} is not a reduced loss and has no partial reduction")
        if options.get("reduction") not in self.spec.reductions:
            options["reduction"] = "mean" if self.spec.weighted_mean else "sum"
        p, kernel = self._prepare(arrays, options)
        total = self._kernel_call(kernel, p, None, None, None, 1.0)
        return float(total), float(p.denominator)

    # -- the per-call path ---------------------------------------------------------------
    # Kept lean: a small-input call must cost a few microseconds above its kernel.
    def _prepare(
        self, arrays: tuple[Any, ...], options: dict[str, Any], hessian: bool = False
    ) -> tuple[Any, Any]:
        if len(arrays) != len(self.arguments):
            raise TypeError(
                f"{self.name}() takes {len(self.arguments)} array arguments "
                f"({', '.join(self.arguments)}), got {len(arrays)}"
            )
        forced = None
        opts = self._defaults
        if options:
            forced = options.pop("backend", None)
            unknown = options.keys() - self._defaults.keys()
            if unknown:
                raise TypeError(
                    f"{self.name}() got an unexpected keyword argument {sorted(unknown)[0]!r}"
                )
            opts = {**self._defaults, **options}
        if self.reduced and opts["reduction"] not in self._reductions:
            validate.check_reduction(opts["reduction"], self.spec.reductions)
        backend = dispatch.backend_of(arrays, forced)
        if hessian:
            kernel = self._hessians.get(backend)
            if kernel is None:
                kernel = self._registry.hessian_kernel(self.name, backend)
                self._hessians[backend] = kernel
        else:
            kernel = self._kernels.get(backend)
            if kernel is None:
                kernel = self._kernels[backend] = self._registry.kernel(self.name, backend)
        return self.spec.prepare(arrays, opts, backend), kernel

    def _run(
        self,
        arrays: tuple[Any, ...],
        options: dict[str, Any],
        want_value: bool,
        want_grad: bool,
        grad_output: Any,
        out: Any,
        hessian: bool = False,
    ) -> Any:
        """``(value, grad)``, or ``(value, grad, hess)`` with ``hessian``; the kernel gets the
        Hessian buffer as its own argument, after the gradients."""
        p, kernel = self._prepare(arrays, options, hessian)
        reduced = p.reduction == "mean" or p.reduction == "sum"
        go = None
        scale = 1.0
        grads: Any = None  # the kernel's gradient buffers, then what the caller gets
        finals: Any = None
        if want_grad:
            if reduced:
                g = 1.0 if grad_output is None else _scalar("grad_output", grad_output)
                scale = _divide(g, p.denominator) if p.reduction == "mean" else g
            elif grad_output is not None:
                go = self._grad_output_array(grad_output, p)
            if not hessian and _ready_out(out, p):  # the common case, kept cheap
                grads = finals = (out,)
            else:
                grads, finals = self._grad_buffers(p, out, hessian)
            if out is not None and p.backend == "cpu":
                validate.check_out_overlap(
                    finals,
                    self._out_labels(hessian),
                    (*zip(self.arguments, arrays), *options.items(), ("grad_output", grad_output)),
                )
        loss_out = None
        if want_value and not reduced:
            loss_out = dispatch.empty(p.value_shape, p.dtype, p.backend)
        if hessian:
            total = self._kernel_call(kernel, p, loss_out, grads[:1], grads[1:], go, scale)
        else:
            total = self._kernel_call(kernel, p, loss_out, grads, go, scale)
        if reduced:
            if p.reduction == "mean":
                total = _divide(total, p.denominator)
            value = p.result_dtypes[0].type(total)
        else:
            value = _cast(loss_out, p.result_dtypes[0], p.backend) if want_value else None
        if want_grad:
            if finals is not grads:
                for buffer, final in zip(grads, finals):
                    if final is not buffer:
                        dispatch.copy_into(final, buffer, p.backend)  # float16 from float32
            if p.backend == "cuda":
                value, finals = dispatch.cuda_runtime().to_caller(value, finals, arrays)
            if hessian:
                return value, finals[0], finals[1]
            return value, (finals[0] if len(finals) == 1 else finals)
        if p.backend == "cuda":
            value, _ = dispatch.cuda_runtime().to_caller(value, (), arrays)
        return value, None

    def _kernel_call(self, kernel: tuple[Any, str], p: Any, *args: Any) -> float:
        function, plugin = kernel
        try:
            total = function(p, *args)
            if type(total) is float:
                return total
        except _CONTRACT_ERRORS:
            raise
        except Exception as exc:
            raise PluginError(
                f"the {p.backend} kernel of {self.name!r} from plugin {plugin!r} failed: {exc!r}"
            ) from exc
        if not isinstance(total, (float, int, np.floating, np.integer)):
            raise PluginError(
                f"the {p.backend} kernel of {self.name!r} from plugin {plugin!r} returned "
                f"{type(total).__name__}, not the float sum of the losses"
            )
        return float(total)

    def _grad_output_array(self, grad_output: Any, p: Any) -> Any:
        g = validate.as_array(grad_output, p.backend)
        validate.float_dtype("grad_output", g)
        if tuple(g.shape) != tuple(p.value_shape):
            raise ValueError(
                f"grad_output must have the value's shape {tuple(p.value_shape)}, got "
                f"{tuple(g.shape)}"
            )
        return validate.as_float("grad_output", g, p.dtype, p.backend)

    def _out_labels(self, hessian: bool) -> tuple[str, ...]:
        """What each output array holds, for messages about ``out=``."""
        if hessian:
            first = self.differentiable[0]
            return (f"the gradient of {first}", f"the Hessian diagonal of {first}")
        return tuple(f"the gradient of {name}" for name in self.differentiable)

    def _grad_buffers(
        self, p: Any, out: Any, hessian: bool = False
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(what the kernel writes into, what the caller gets), per gradient (the gradient
        and the Hessian diagonal of the first argument, with ``hessian``)."""
        shapes, dtypes = p.grad_shapes, p.result_dtypes[1:]
        if hessian:
            shapes, dtypes = shapes[:1] * 2, dtypes[:1] * 2
        if out is None:
            if len(dtypes) == 1 and dtypes[0] is p.dtype:  # the common case, kept cheap
                grad = (dispatch.empty(shapes[0], p.dtype, p.backend),)
                return grad, grad
            finals = tuple(dispatch.empty(s, d, p.backend) for s, d in zip(shapes, dtypes))
        else:
            n = len(shapes)
            finals = (out,) if n == 1 and not isinstance(out, tuple) else tuple(out)
            if len(finals) != n:
                raise ValueError(
                    f"out must be a tuple of {n} arrays: " + ", ".join(self._out_labels(hessian))
                )
            finals = tuple(
                _check_out(label, o, s, d, p.backend)
                for label, o, s, d in zip(self._out_labels(hessian), finals, shapes, dtypes)
            )
        if all(f.dtype == p.dtype for f in finals):
            return finals, finals
        buffers = tuple(
            f if f.dtype == p.dtype else dispatch.empty(f.shape, p.dtype, p.backend) for f in finals
        )
        return buffers, finals


def _ready_out(out: np.ndarray, p: Any) -> bool:
    """Whether a NumPy ``out`` is the one gradient, exactly as the kernel writes it; any other
    ``out`` goes through ``_check_out``, which says what is wrong with it."""
    if p.backend != "cpu" or len(p.grad_shapes) != 1 or p.result_dtypes[1] is not p.dtype:
        return False
    return validate.ready_out(out, p.grad_shapes[0], p.dtype)


def _divide(a: float, b: float) -> float:
    """IEEE division of Python floats (no ZeroDivisionError): an empty "mean" is nan."""
    if b:
        return a / b
    return math.copysign(math.inf, a) if a else math.nan


def _scalar(name: str, value: Any) -> float:
    if not isinstance(value, (float, int, np.ndarray, np.generic)) and dispatch.on_device(value):
        value = dispatch.cuda_runtime().to_host(value)  # a device scalar (e.g. a CUDA tensor)
    array = np.asarray(value)
    if array.shape != () and array.size != 1:
        raise ValueError(f"{name} of a reduced loss must be a scalar, got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real number, got dtype {array.dtype.name}")
    return float(array.reshape(()))


def _cast(array: Any, dtype: np.dtype, backend: str) -> Any:
    if array.dtype == dtype:
        return array
    if backend == "cpu":
        return array.astype(dtype)
    return dispatch.cuda_runtime().astype(array, dtype)


def _check_out(label: str, out: Any, shape: tuple[int, ...], dtype: np.dtype, backend: str) -> Any:
    """``out`` checked, as the kernels write into it (a Numba view of a CUDA ``out``);
    ``label`` says what it holds ("the gradient of input")."""
    where = f"out ({label})"
    if backend == "cpu" and not isinstance(out, np.ndarray):
        raise TypeError(f"{where} must be a NumPy array, got {type(out).__name__}")
    if backend == "cuda":
        if not dispatch.on_device(out):
            raise TypeError(f"{where} must be a CUDA array, got {type(out).__name__}")
        out = dispatch.cuda_runtime().as_out(out)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{where} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if np.dtype(out.dtype) != dtype:
        raise TypeError(f"{where} must have dtype {dtype.name}, got {np.dtype(out.dtype).name}")
    if backend == "cpu" and not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{where} must be a writeable C-contiguous array")
    if backend == "cuda" and not out.is_c_contiguous():
        raise ValueError(f"{where} must be a C-contiguous CUDA array")
    return out
