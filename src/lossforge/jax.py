"""JAX drop-ins: every registered lossforge loss as a JAX function with a ``jax.custom_vjp``,
usable under ``jax.jit`` and ``jax.grad``.

```python
import jax
import lossforge.jax as lfj

value, grads = jax.jit(jax.value_and_grad(lambda z, y: lfj.cross_entropy(z, y)))(logits, y)
lfj.apply("huber_loss", x, y, delta=0.5)  # any registered loss, by name
```

How a call runs:

- On the CPU the kernels are called through an XLA FFI call (``runtime.xla_ffi``): they read
  XLA's input buffers and write into its output buffers, no copy either way. Under
  ``jax.jit`` the call is one opaque node of the compiled program; XLA cannot fuse into it.
  On another platform the call is a ``jax.pure_callback``, and JAX copies the arrays to the
  host and back (the kernels are CPU kernels).
- A ``"mean"``/``"sum"`` loss under ``jax.grad``/``jax.value_and_grad`` computes value and
  gradient in one fused callback in the forward pass; the backward pass scales the gradient
  by the cotangent with an XLA multiply, which XLA removes for a cotangent of 1 (no second
  call). ``reduction="none"`` and losses that are not reduced (``cosine_similarity``)
  compute the gradient in the backward pass from the cotangent.
- Gradients are taken with respect to the loss's differentiable arguments
  (``lossforge.get(name).differentiable``, ``input`` for most losses). Differentiating with
  respect to another argument (a float target, a ``weight``) is a ``ValueError`` at trace
  time, not a silent zero: the VJP is defined with ``symbolic_zeros=True``, so it knows
  which inputs are differentiated.
- Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is not supported: JAX raises
  ``TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp function``. Second
  derivatives (``jax.grad`` of ``jax.grad``) are not supported either: the backward pass is
  not itself differentiable.
- ``jax.vmap``: the callback runs once per element of the mapped axis (``vmap_method=
  "sequential"``), a Python loop of kernel calls: correct, but no faster than the loop.
- The shape of an unreduced value (``reduction="none"``) is found at trace time by the loss's
  ``prepare`` on arrays of ones of the arguments' shapes (cached per shape).
- dtypes: float16, float32 and float64 as in lossforge (float64 needs ``jax_enable_x64``);
  bfloat16, which lossforge lacks, is computed in float32 and returned as bfloat16.

Install JAX with ``pip install "lossforge[jax]"``; ``import lossforge`` never imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import lossforge as lf
from lossforge.loss import Loss
from lossforge.runtime import xla_ffi

try:
    import jax
    import jax.numpy as jnp
except ImportError as exc:  # pragma: no cover - exercised without JAX
    raise ImportError('lossforge.jax needs JAX: pip install "lossforge[jax]"') from exc

__all__ = ["apply"]


def _loss(loss: str | Loss) -> Loss:
    return loss if isinstance(loss, Loss) else lf.get(loss)


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def _is_reduced(loss: Loss, options: dict[str, Any]) -> bool:
    return loss.reduced and options.get("reduction", loss.options["reduction"]) != "none"


def apply(loss: str | Loss, *arrays: Any, **options: Any) -> jax.Array:
    """``loss(*arrays, **options)`` as a JAX array, differentiable by ``jax.grad`` (reverse
    mode) with respect to the loss's differentiable arguments, under ``jax.jit`` too.
    ``loss``: a registered loss or its name. Array options (``weight``, ``pos_weight``) are
    taken as constants; the others must be Python values (static under ``jax.jit``)."""
    loss = _loss(loss)
    if len(arrays) != len(loss.arguments):
        raise TypeError(
            f"{loss.name}() takes {len(loss.arguments)} array arguments "
            f"({', '.join(loss.arguments)}), got {len(arrays)}"
        )
    unknown = options.keys() - loss.options.keys()
    if unknown:
        raise TypeError(f"{loss.name}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    dynamic = tuple(k for k, v in options.items() if _is_array(v))
    static = tuple(sorted((k, v) for k, v in options.items() if k not in dynamic))
    xs = [jnp.asarray(a) for a in arrays]
    bf16 = xs[0].dtype == jnp.bfloat16
    xs = [x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in xs]
    value = _function(loss.name, static, dynamic)(*xs, *(jnp.asarray(options[k]) for k in dynamic))
    return value.astype(jnp.bfloat16) if bf16 else value


@functools.cache
def _function(name: str, static: tuple[tuple[str, Any], ...], dynamic: tuple[str, ...]) -> Any:
    """The custom-VJP function of one loss and one set of options: arguments are the loss's
    arrays, then the array options named in ``dynamic``."""
    loss = lf.get(name)
    n = len(loss.arguments)
    where = [loss.arguments.index(d) for d in loss.differentiable]
    reduced = _is_reduced(loss, dict(static))

    def options(args: Sequence[Any]) -> dict[str, Any]:
        return {**dict(static), **dict(zip(dynamic, args[n:]))}

    def grads_out(rets: list[np.ndarray]) -> Any:
        return rets[0] if len(where) == 1 else tuple(rets)

    def fill_value(a: list[np.ndarray], rets: list[np.ndarray]) -> None:
        rets[0][...] = loss(*a[:n], **options(a))

    def fill_value_and_grad(a: list[np.ndarray], rets: list[np.ndarray]) -> None:
        rets[0][...] = loss.value_and_grad(*a[:n], out=grads_out(rets[1:]), **options(a))[0]

    def fill_grad(a: list[np.ndarray], rets: list[np.ndarray]) -> None:
        loss.grad(*a[:n], grad_output=a[-1], out=grads_out(rets), **options(a[:-1]))

    value_call = _host_call(fill_value, f"{name}_value")
    value_and_grad_call = _host_call(fill_value_and_grad, f"{name}_value_and_grad")
    grad_call = _host_call(fill_grad, f"{name}_grad")

    def value(*args: Any) -> Any:
        return value_call(_shapes(loss, static, dynamic, args)[:1], *args)[0]

    def value_and_grad(*args: Any) -> Any:
        return value_and_grad_call(_shapes(loss, static, dynamic, args), *args)

    def grad(args: tuple[Any, ...], cotangent: Any) -> Any:
        return grad_call(_shapes(loss, static, dynamic, args)[1:], *args, cotangent)

    f = jax.custom_vjp(value)

    def fwd(*primals: Any) -> tuple[Any, Any]:
        args = tuple(p.value for p in primals)
        for k, p in enumerate(primals):
            label = loss.arguments[k] if k < n else dynamic[k - n]
            if p.perturbed and (k >= n or k not in where):
                raise ValueError(
                    f"{loss.name}: differentiating with respect to {label}, but lossforge "
                    f"computes the gradient with respect to {', '.join(loss.differentiable)} "
                    f"only; wrap {label} in jax.lax.stop_gradient, or use a JAX formula"
                )
        if reduced:
            v, *g = value_and_grad(*args)
            return v, (args, tuple(g))
        return value(*args), (args, None)

    def bwd(residual: Any, cotangent: Any) -> tuple[Any, ...]:
        args, grads = residual
        if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
            return (None,) * len(args)
        if grads is not None:
            # an XLA multiply, not a host call: XLA folds away a cotangent of 1 (jax.grad's
            # of a loss) and fuses any other scale into the gradient's consumer
            grads = tuple(g * cotangent.astype(g.dtype) for g in grads)
        else:
            grads = grad(args, cotangent)
        result: list[Any] = [None] * len(args)
        for k, g in zip(where, grads):
            result[k] = g
        return tuple(result)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def _host_call(
    fill: Callable[[list[np.ndarray], list[np.ndarray]], None], stem: str
) -> Callable[..., tuple[jax.Array, ...]]:
    """``call(shapes, *args)``: the results of ``fill(args, rets)`` (NumPy views of the
    arguments, read-only, and of the results, which it writes) run on the host. On the CPU an
    XLA FFI call (``runtime.xla_ffi``): the kernels read XLA's buffers and write into them;
    on another platform ``jax.pure_callback``, which copies the arrays to the host and back."""
    target = xla_ffi.register(fill, stem)

    def call(shapes: tuple[jax.ShapeDtypeStruct, ...], *args: Any) -> tuple[jax.Array, ...]:
        def host(*a: Any) -> tuple[np.ndarray, ...]:
            rets = [np.empty(s.shape, s.dtype) for s in shapes]
            fill([np.asarray(x) for x in a], rets)
            return tuple(rets)

        def ffi(*a: Any) -> Any:
            return tuple(jax.ffi.ffi_call(target, shapes, vmap_method="sequential")(*a))

        def elsewhere(*a: Any) -> Any:
            return tuple(jax.pure_callback(host, shapes, *a, vmap_method="sequential"))

        return jax.lax.platform_dependent(*args, cpu=ffi, default=elsewhere)

    return call


def _shapes(
    loss: Loss, static: tuple[tuple[str, Any], ...], dynamic: tuple[str, ...], args: tuple
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The value's and each gradient's shape and dtype, the host call's results."""
    key = tuple((tuple(a.shape), np.dtype(a.dtype).str) for a in args)
    return _shapes_of(loss.name, static, dynamic, key)


@functools.lru_cache(maxsize=256)
def _shapes_of(
    name: str, static: tuple, dynamic: tuple[str, ...], key: tuple
) -> tuple[jax.ShapeDtypeStruct, ...]:
    loss = lf.get(name)
    n = len(loss.arguments)
    # arrays of ones (a valid class index, probability, +-1 target) of the arguments' shapes
    ones = [np.ones(shape, np.dtype(dtype)) for shape, dtype in key]
    opts = {**dict(static), **dict(zip(dynamic, ones[n:]))}
    p = loss.spec.prepare(tuple(ones[:n]), {**loss.options, **opts}, "cpu")
    value_shape = () if _is_reduced(loss, opts) else tuple(p.value_shape)
    shapes = [jax.ShapeDtypeStruct(value_shape, p.result_dtypes[0])]
    for d, dtype in zip(loss.differentiable, p.result_dtypes[1:]):
        shapes.append(jax.ShapeDtypeStruct(key[loss.arguments.index(d)][0], dtype))
    return tuple(shapes)


@functools.cache
def _functional(name: str) -> Callable[..., jax.Array]:
    loss = lf.get(name)

    def call(*arrays: Any, **options: Any) -> jax.Array:
        return apply(loss, *arrays, **options)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"lossforge's {name} on JAX arrays, with a custom VJP (see lossforge.jax)."
    call.__doc__ += "\n\n" + (loss.__doc__ or "")
    return call


def __getattr__(name: str) -> Callable[..., jax.Array]:
    # lossforge.jax.<loss name>: every registered loss
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return _functional(name)
    except KeyError:
        raise AttributeError(f"module 'lossforge.jax' has no attribute {name!r}") from None
