"""The conformance kit: ``check_loss(name)`` checks a registered loss the way lossforge checks
its own, in the spirit of scikit-learn's ``check_estimator``. For plugin authors::

    from lossforge.testing import check_loss, parametrize_losses

    def test_my_loss():
        check_loss("my_loss")

    @parametrize_losses()          # every registered loss
    def test_every_loss(loss_name):
        check_loss(loss_name)

A loss is checked on the inputs its ``LossSpec.example`` makes (or, without one, on two
same-shaped float arrays named by its ``arguments``), with the example's options and then
with each of its option sets (``LossSpec.option_sets``, or ``check_loss(option_sets=...)``):

- ``reference``: the value (``reduction="none"``) agrees with ``LossSpec.reference`` in
  float64, and in float32 to float32 rounding;
- ``reductions``: ``"sum"`` is the sum of ``"none"``, ``partial`` gives ``("sum",
  denominator)`` (the mean's total for a ``LossSpec.weighted_mean``), ``"mean"`` is their
  ratio;
- ``gradient``: every gradient agrees with central finite differences (float64), less the
  loss's ``LossSpec.gradient_term`` where it declares one;
- ``grad_output``: gradients scale linearly with ``grad_output``;
- ``hessian``: where the loss has a Hessian (``Loss.grad_hess``), its gradient and value are
  ``value_and_grad``'s, the Hessian diagonal agrees with central finite differences of the
  gradient (is at least them, for a loss that declares ``LossSpec.hessian_bound``), and
  scales with ``grad_output`` and the reduction as the gradient does;
- ``unchanged``: no input is modified;
- ``threads``: value and gradient are bitwise identical at 1 and 2 threads, in float64 with
  ``"sum"`` on ``THREADS_SIZE`` elements (several reduction chunks, a partial last one, above
  every built-in kernel's parallel threshold), and, with the example's own options, in
  float32 (the ``KernelSpec.fast`` path where one applies);
- ``bad_input``: an unknown reduction is a ``ValueError``, an integer input a ``TypeError``;
- ``float16``: float16 inputs give float16 results;
- ``cuda``: where the loss has a CUDA kernel, CUDA results equal the CPU's, on a GPU or under
  Numba's simulator (``NUMBA_ENABLE_CUDASIM=1`` before numba is imported). A CUDA kernel
  that cannot be checked (neither is usable) fails the kit unless ``require_cuda=False``.

The first five checks, ``threads`` and ``cuda`` run once per option set too. An option set
is a mapping of options, or a callable ``(rng, arrays, dtype) -> mapping`` for options that
depend on the example's arrays (a weight of the input's shape); its entries update the
example's options, and an entry named after one of the loss's ``arguments`` replaces that
array (cross_entropy's probability targets). ``{"weight": None}`` checks a default that the
example overrides.

Each check raises ``AssertionError`` naming the loss, the check and the option set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

import lossforge
from lossforge.runtime.cpu import CHUNK, threads

CHECKS = (
    "reference",
    "reductions",
    "gradient",
    "grad_output",
    "hessian",
    "unchanged",
    "threads",
    "bad_input",
    "float16",
    "cuda",
)

#: The checks that run once more per option set.
OPTION_CHECKS = (
    "reference",
    "reductions",
    "gradient",
    "grad_output",
    "hessian",
    "unchanged",
    "threads",
    "cuda",
)

#: Elements of the ``threads`` check: ten reduction chunks, the last one partial (an odd
#: size), above the largest parallel threshold of the built-in kernels (nll_loss's 131072).
THREADS_SIZE = 9 * CHUNK + 1001


def parametrize_losses(names: Iterable[str] | None = None) -> Any:
    """``pytest.mark.parametrize("loss_name", ...)`` over the registered losses."""
    import pytest

    return pytest.mark.parametrize("loss_name", list(names or lossforge.list_losses()))


def check_loss(
    name: Any,
    *,
    checks: Iterable[str] = CHECKS,
    seed: int = 0,
    option_sets: Iterable[Any] | None = None,
    require_cuda: bool = True,
) -> list[str]:
    """Run the conformance checks on loss ``name`` (a registered name, or a ``Loss`` such as
    ``Registry.get`` returns); returns the checks that ran, ``"check [option set]"`` for the
    runs with an option set.

    ``option_sets``: the option sets to check (see the module docstring) instead of the
    loss's ``LossSpec.option_sets``; ``()`` checks the example's options alone.
    ``require_cuda``: with the default ``True``, a loss with a CUDA kernel fails the ``cuda``
    check when neither a GPU nor Numba's simulator is usable; ``False`` skips it then.
    """
    loss = lossforge.get(name) if isinstance(name, str) else name
    sets = tuple(loss.spec.option_sets if option_sets is None else option_sets)
    ran = []
    for check in checks:
        runs = [(check, None)]
        if check in OPTION_CHECKS:
            runs += [(f"{check} [{_describe(s)}]", s) for s in sets]
        for label, option_set in runs:
            try:
                if check == "cuda" and "cuda" in loss.backends:
                    problem = _cuda_problem()
                    if problem and not require_cuda:
                        break
                    assert not problem, (
                        f"the loss has a CUDA kernel that could not be checked: {problem} "
                        "(check_loss(..., require_cuda=False) skips it)"
                    )
                if _CHECKS[check](loss, np.random.default_rng(seed), option_set) is not False:
                    ran.append(label)
            except AssertionError as exc:
                raise AssertionError(f"check_loss({loss.name!r}): {label}: {exc}") from exc
            except Exception as exc:  # a kernel or option set that raises fails the check too
                raise AssertionError(f"check_loss({loss.name!r}): {label}: raised {exc!r}") from exc
    return ran


def _describe(option_set: Any) -> str:
    if callable(option_set):
        return getattr(option_set, "__name__", repr(option_set))
    return ", ".join(
        f"{k}=array{np.shape(v)}" if isinstance(v, np.ndarray) else f"{k}={v!r}"
        for k, v in option_set.items()
    )


# -- inputs --------------------------------------------------------------------------------
def _example(
    loss: Any, rng: np.random.Generator, size: int, dtype: Any, option_set: Any = None
) -> tuple[tuple, dict]:
    if loss.spec.example is not None:
        arrays, options = loss.spec.example(rng, size, np.dtype(dtype))
        arrays, options = tuple(arrays), dict(options)
    else:
        shape = (size // 8, 8) if size >= 8 else (size,)
        arrays, options = (
            tuple(rng.standard_normal(shape).astype(dtype) for _ in loss.arguments),
            {},
        )
    if option_set is not None:
        extra: Mapping[str, Any] = (
            option_set(rng, arrays, np.dtype(dtype)) if callable(option_set) else option_set
        )
        options.update(extra)
        # an entry named after an argument replaces that array
        arrays = tuple(options.pop(a, x) for a, x in zip(loss.arguments, arrays))
    return arrays, options


def _copy(arrays: tuple) -> tuple:
    return tuple(np.array(a, copy=True) for a in arrays)


def _grads(loss: Any, arrays: tuple, **kwargs: Any) -> tuple:
    g = loss.grad(*arrays, **kwargs)
    return g if isinstance(g, tuple) else (g,)


def _positions(loss: Any) -> list[int]:
    return [loss.arguments.index(d) for d in loss.differentiable]


def _close(actual: Any, expected: Any, rtol: float, what: str, atol: float = 0.0) -> None:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.max(np.abs(expected), initial=0.0)
    ok = np.isclose(actual, expected, rtol=rtol, atol=atol + rtol * 1e-3 * scale, equal_nan=True)
    assert ok.all(), (
        f"{what}: {np.count_nonzero(~ok)} of {ok.size} differ; max |difference| "
        f"{np.nanmax(np.abs(actual - expected)):.3g} (rtol {rtol})"
    )


def _unreduced(loss: Any, arrays: tuple, options: dict) -> Any:
    if loss.reduced:
        options = dict(options, reduction="none")
    return loss(*arrays, **options)


# -- the checks ----------------------------------------------------------------------------
def _check_reference(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    if loss.spec.reference is None:
        return False
    for dtype, rtol in ((np.float64, 1e-10), (np.float32, 2e-5)):
        arrays, options = _example(loss, rng, 64, dtype, option_set)
        wide = tuple(a.astype(np.float64) if a.dtype == np.float32 else a for a in arrays)
        wide_options = {
            k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype == np.float32 else v)
            for k, v in options.items()
        }
        expected = loss.spec.reference(*wide, **wide_options)
        _close(_unreduced(loss, arrays, options), expected, rtol, f"{np.dtype(dtype)} value")
    return True


def _check_reductions(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    if not loss.reduced:
        return False
    arrays, options = _example(loss, rng, 64, np.float64, option_set)
    none = loss(*arrays, **dict(options, reduction="none"))
    total = loss(*arrays, **dict(options, reduction="sum"))
    _close(total, np.sum(none), 1e-12, "sum vs sum of none", atol=1e-12)
    pair = loss.partial(*arrays, **options)
    if not loss.spec.weighted_mean:  # else "sum" is not the mean's total
        _close(pair[0], total, 1e-14, "partial total vs sum")
    mean = loss(*arrays, **dict(options, reduction="mean"))
    _close(mean, pair[0] / pair[1], 1e-14, "mean vs total / denominator")
    return True


def _scalarised(loss: Any, options: dict, weights: Any) -> Callable[..., float]:
    def f(*arrays: Any) -> float:
        return float(np.sum(weights * _unreduced(loss, arrays, options)))

    return f


def _check_gradient(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    # 48: several rows of classes (nll_loss's example ignores its first row)
    arrays, options = _example(loss, rng, 48, np.float64, option_set)
    value = _unreduced(loss, arrays, options)
    go = rng.standard_normal(np.shape(value))
    kwargs = dict(options, reduction="none") if loss.reduced else dict(options)
    grads = _grads(loss, arrays, grad_output=go, **kwargs)
    if loss.spec.gradient_term is not None:  # a gradient by convention: check the rest
        grads = (grads[0] - loss.spec.gradient_term(arrays, kwargs, go), *grads[1:])
    f = _scalarised(loss, options, go)
    eps = 1e-6
    for position, grad in zip(_positions(loss), grads):
        numeric = np.zeros(np.shape(arrays[position]))
        base = np.array(arrays[position], dtype=np.float64)
        for index in np.ndindex(numeric.shape):
            args = list(arrays)
            up, down = base.copy(), base.copy()
            up[index] += eps
            down[index] -= eps
            args[position] = up
            high = f(*args)
            args[position] = down
            numeric[index] = (high - f(*args)) / (2 * eps)
        _close(grad, numeric, 1e-5, f"gradient of {loss.arguments[position]}", atol=1e-7)
    return True


def _has_hessian(loss: Any, backend: str = "cpu") -> bool:
    try:
        loss._registry.hessian_kernel(loss.name, backend)
    except NotImplementedError:
        return False
    return True


def _check_hessian(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    if not _has_hessian(loss):
        return False
    arrays, options = _example(loss, rng, 48, np.float64, option_set)
    position = loss.arguments.index(loss.differentiable[0])
    kwargs = dict(options, reduction="none") if loss.reduced else dict(options)
    value, grad = loss.value_and_grad(*arrays, **kwargs)
    go = rng.standard_normal(np.shape(value))
    value2, grad2, hess = loss.value_grad_hess(*arrays, grad_output=go, **kwargs)
    _close(value2, value, 1e-13, "value_grad_hess value vs value_and_grad")
    grad = loss.grad(*arrays, grad_output=go, **kwargs)
    grad = grad[0] if isinstance(grad, tuple) else grad
    _close(grad2, grad, 1e-13, "grad_hess gradient vs grad")
    # d(gradient)/d(element), element by element: a row loss's gradient depends on its row
    eps = 1e-5
    base = np.array(arrays[position], dtype=np.float64)
    numeric = np.zeros(base.shape)
    for index in np.ndindex(base.shape):
        args = list(arrays)
        up, down = base.copy(), base.copy()
        up[index] += eps
        down[index] -= eps
        args[position] = up
        high = _grads(loss, tuple(args), grad_output=go, **kwargs)[0][index]
        args[position] = down
        low = _grads(loss, tuple(args), grad_output=go, **kwargs)[0][index]
        numeric[index] = (high - low) / (2 * eps)
    if loss.spec.hessian_bound:  # an upper bound of the curvature: go * h >= go * d2
        sign = np.sign(go)
        if sign.ndim and sign.shape != numeric.shape:  # a row loss: classes along dimension 1
            sign = np.expand_dims(sign, 1)
        excess = sign * (np.asarray(hess) - numeric)
        scale = np.max(np.abs(numeric), initial=1.0)
        assert np.all(excess >= -1e-5 * scale), "Hessian below the second derivative"
    else:
        _close(hess, numeric, 1e-4, "Hessian diagonal vs finite differences", atol=1e-6)
    if loss.reduced:
        _, h_sum = loss.grad_hess(*arrays, **dict(options, reduction="sum"))
        _, h_mean = loss.grad_hess(*arrays, **dict(options, reduction="mean"))
        denominator = loss.partial(*arrays, **options)[1]
        _close(h_mean, np.asarray(h_sum) / denominator, 1e-13, "mean Hessian vs sum / denominator")
        _, h_go = loss.grad_hess(*arrays, grad_output=-2.5, **dict(options, reduction="sum"))
        _close(h_go, -2.5 * np.asarray(h_sum), 1e-13, "grad_output=-2.5 vs -2.5 * Hessian")
    return True


def _check_grad_output(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    arrays, options = _example(loss, rng, 32, np.float64, option_set)
    if loss.reduced:
        options = dict(options, reduction="sum")
        base = _grads(loss, arrays, **options)
        scaled = _grads(loss, arrays, grad_output=-2.5, **options)
    else:
        shape = np.shape(loss(*arrays, **options))
        base = _grads(loss, arrays, **options)
        scaled = _grads(loss, arrays, grad_output=np.full(shape, -2.5), **options)
    for b, s in zip(base, scaled):
        _close(s, -2.5 * np.asarray(b), 1e-13, "grad_output=-2.5 vs -2.5 * gradient")
    return True


def _check_unchanged(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    arrays, options = _example(loss, rng, 64, np.float32, option_set)
    before = _copy(arrays)
    option_arrays = {
        k: np.array(v, copy=True) for k, v in options.items() if isinstance(v, np.ndarray)
    }
    loss.value_and_grad(*arrays, **options)
    for a, b in zip(arrays, before):
        assert np.array_equal(np.asarray(a), b, equal_nan=True), "an input array was modified"
    for key, value in option_arrays.items():
        assert np.array_equal(options[key], value, equal_nan=True), f"option {key} was modified"
    return True


def _check_threads(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    # float64 "sum": no rounding to the result dtype or division by the denominator to hide
    # a difference; the float32 run with the example's own options takes the fast path
    runs = [(np.float64, {"reduction": "sum"} if loss.reduced else {})]
    if option_set is None:
        runs.append((np.float32, {}))
    for dtype, extra in runs:
        arrays, options = _example(loss, rng, THREADS_SIZE, dtype, option_set)
        options.update(extra)
        results = []
        for n in (1, 2):
            with threads(n):
                value, grad = loss.value_and_grad(*arrays, **options)
            grads = grad if isinstance(grad, tuple) else (grad,)
            results.append([np.asarray(value).tobytes()] + [g.tobytes() for g in grads])
        names = ("value", *(f"gradient of {d}" for d in loss.differentiable))
        differ = [w for w, a, b in zip(names, *results) if a != b]
        assert not differ, (
            f"{np.dtype(dtype)} {options.get('reduction', '')}: {', '.join(differ)} not "
            "bitwise equal at 1 and 2 threads"
        )
    return True


def _check_bad_input(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    arrays, options = _example(loss, rng, 16, np.float64)
    if loss.reduced:
        try:
            loss(*arrays, **dict(options, reduction="average"))
        except ValueError as exc:
            assert "reduction" in str(exc), f"ValueError does not name reduction: {exc}"
        else:
            raise AssertionError("reduction='average' was accepted")
    bad = (arrays[0] * 0).astype(np.int64), *arrays[1:]
    try:
        loss(*bad, **options)
    except TypeError as exc:
        assert "int64" in str(exc), f"TypeError does not name the dtype: {exc}"
    else:
        raise AssertionError("an int64 input was accepted")
    return True


def _check_float16(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    arrays, options = _example(loss, rng, 32, np.float16)
    value, grad = loss.value_and_grad(*arrays, **options)
    assert np.asarray(value).dtype == np.float16, f"value dtype {np.asarray(value).dtype}"
    for g in grad if isinstance(grad, tuple) else (grad,):
        assert g.dtype == np.float16, f"gradient dtype {g.dtype}"
    return True


def _cuda_problem() -> str | None:
    """Why the CUDA kernels cannot be checked here, or None."""
    try:
        from numba import cuda
    except Exception as exc:
        return f"numba.cuda cannot be imported ({exc!r})"
    if not cuda.is_available():  # true under the simulator
        return (
            "no usable GPU and Numba's CUDA simulator is off (NUMBA_ENABLE_CUDASIM=1 in the "
            "environment before numba is imported turns it on)"
        )
    return None


def _check_cuda(loss: Any, rng: np.random.Generator, option_set: Any) -> bool:
    if "cuda" not in loss.backends:  # an unusable CUDA target is check_loss's business
        return False
    from numba import cuda

    # float64 alone with an option set: the simulator runs a Python thread per CUDA thread,
    # and the float32 run with the example's options covers the float32 code
    runs = [(np.float64, 1e-12), (np.float32, 1e-5)]
    for dtype, rtol in runs[:1] if option_set is not None else runs:
        arrays, options = _example(loss, rng, 24, dtype, option_set)
        value, grad = loss.value_and_grad(*arrays, **options)
        device = tuple(cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in arrays)
        d_value, d_grad = loss.value_and_grad(*device, **options)
        host = d_value.copy_to_host() if hasattr(d_value, "copy_to_host") else d_value
        _close(host, value, rtol, f"{np.dtype(dtype)} CUDA value vs CPU", atol=1e-12)
        pairs = zip(
            grad if isinstance(grad, tuple) else (grad,),
            d_grad if isinstance(d_grad, tuple) else (d_grad,),
        )
        for g, d in pairs:
            _close(d.copy_to_host(), g, rtol, f"{np.dtype(dtype)} CUDA gradient vs CPU", atol=1e-12)
        if _has_hessian(loss, "cuda"):
            _, hess = loss.grad_hess(*arrays, **options)
            _, d_hess = loss.grad_hess(*device, **options)
            _close(d_hess.copy_to_host(), hess, rtol, f"{np.dtype(dtype)} CUDA Hessian vs CPU")
    return True


_CHECKS = {
    "reference": _check_reference,
    "reductions": _check_reductions,
    "gradient": _check_gradient,
    "grad_output": _check_grad_output,
    "hessian": _check_hessian,
    "unchanged": _check_unchanged,
    "threads": _check_threads,
    "bad_input": _check_bad_input,
    "float16": _check_float16,
    "cuda": _check_cuda,
}
