"""Test helpers shared by every family's tests: the PyTorch oracle, finite differences,
memory-layout variants, and input-immutability checks. References themselves (float64 NumPy)
are written in each test module, independently of the plugins' code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the oracle is optional: tests that need it skip
    torch = None
    F = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def torch_value_and_grad(
    name: str,
    arrays: Sequence[np.ndarray],
    differentiable: Sequence[int] = (0,),
    grad_output: Any = None,
    **options: Any,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """PyTorch's value and its gradients for the arguments at ``differentiable``."""
    tensors = []
    for i, a in enumerate(arrays):
        t = torch.from_numpy(np.array(a))
        if i in differentiable:
            t.requires_grad_(True)
        tensors.append(t)
    opts = {
        k: (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v)
        for k, v in options.items()
    }
    value = getattr(F, name)(*tensors, **opts)
    go = (
        torch.ones_like(value)
        if grad_output is None
        else torch.as_tensor(np.asarray(grad_output), dtype=value.dtype)
    )
    # materialize_grads: an input the value does not depend on (a p=0 norm) gets zeros
    grads = torch.autograd.grad(
        value, [tensors[i] for i in differentiable], go, materialize_grads=True
    )
    return value.detach().numpy(), [g.numpy() for g in grads]


def finite_difference(
    f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """Central differences of a scalar function of a float64 array."""
    x = np.array(x, dtype=np.float64)
    g = np.empty_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = f(x)
        flat[i] = keep - eps
        down = f(x)
        flat[i] = keep
        gflat[i] = (up - down) / (2 * eps)
    return g


def layouts(x: np.ndarray) -> dict[str, np.ndarray]:
    """The same values as ``x`` in awkward memory layouts: strided, transposed (Fortran
    order), read-only and big-endian."""
    x = np.asarray(x)
    strided = np.empty((*x.shape, 2), x.dtype)[..., 0]  # every other element of a buffer
    strided[...] = x
    fortran = np.asfortranarray(x)
    readonly = x.copy()
    readonly.flags.writeable = False
    big = x.astype(x.dtype.newbyteorder(">"))
    return {"strided": strided, "fortran": fortran, "readonly": readonly, "bigendian": big}


def assert_fast_path_is_general_path(
    name: str, arrays: Sequence[np.ndarray], named_default: dict[str, Any]
) -> None:
    """``value_and_grad`` with no option named takes the kernel's fast path (when it has one
    and takes the input); naming a default option (``named_default``) takes the general
    path: the same kernel with the same arguments, so the same bits, with and without
    ``out=``."""
    import lossforge as lf

    loss = lf.get(name)
    value, grad = loss.value_and_grad(*arrays, **named_default)
    _assert_same_bits(loss.value_and_grad(*arrays), (value, grad))
    grads = grad if isinstance(grad, tuple) else (grad,)
    outs = tuple(np.full_like(g, np.nan) for g in grads)
    out = outs if isinstance(grad, tuple) else outs[0]
    fast_value, fast_grad = loss.value_and_grad(*arrays, out=out)
    _assert_same_bits((fast_value, fast_grad), (value, grad))
    fast_grads = fast_grad if isinstance(fast_grad, tuple) else (fast_grad,)
    assert all(f is o for f, o in zip(fast_grads, outs, strict=True))


def _assert_same_bits(a: Any, b: Any) -> None:
    if isinstance(b, tuple):
        assert type(a) is tuple and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_bits(x, y)
        return
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def snapshot(*arrays: Any) -> list[np.ndarray]:
    return [np.array(a, copy=True) for a in arrays]


def assert_unchanged(before: list[np.ndarray], arrays: Sequence[Any]) -> None:
    for b, a in zip(before, arrays, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
        assert np.asarray(a).dtype == b.dtype


def rtol_for(dtype: Any) -> float:
    return {np.float16: 1e-2, np.float32: 1e-5, np.float64: 1e-12}[np.dtype(dtype).type]


def _to_numpy(value: Any, dtype: Any) -> Any:
    if torch is not None and isinstance(value, torch.Tensor):
        array = value.detach().numpy()
        return array.astype(dtype) if array.dtype.kind == "f" else array
    return value


def torch_samples(op: str, n_arrays: int = 2):
    """PyTorch's own sample inputs for ``torch.nn.functional.<op>`` (its OpInfo), float32
    and float64, as ``(arrays, options)`` with NumPy arrays: the first ``n_arrays``
    positional arguments, then keyword options."""
    from torch.testing._internal.common_methods_invocations import op_db

    (info,) = [o for o in op_db if o.name == f"nn.functional.{op}"]
    for dtype, np_dtype in [(torch.float32, np.float32), (torch.float64, np.float64)]:
        for sample in info.sample_inputs("cpu", dtype, requires_grad=True):
            values = [sample.input, *sample.args]
            options = dict(sample.kwargs)
            for key in ("target", "input2", "x2"):
                if key in options and len(values) < n_arrays:
                    values.append(options.pop(key))
            arrays = [_to_numpy(v, np_dtype) for v in values[:n_arrays]]
            options = {k: _to_numpy(v, np_dtype) for k, v in options.items()}
            yield arrays, options


# -- softmax losses' cases (tests/test_multiclass_hessian.py, tests/test_softmax_hessian.py) --
def class_indices(rng, shape, ignored=True):
    """Logits of ``shape`` (classes along dimension 1) and class indices, one ignored."""
    x = rng.normal(scale=2.0, size=shape)
    classes = shape[1] if len(shape) > 1 else shape[0]
    t = rng.integers(0, classes, (shape[0], *shape[2:]) if len(shape) > 1 else ())
    if ignored and t.size > 2:
        t.reshape(-1)[1] = -100
    return x, t


def class_probabilities(rng, shape):
    """Logits of ``shape`` and target distributions along dimension 1."""
    x = rng.normal(scale=2.0, size=shape)
    p = rng.random(shape)
    return x, p / p.sum(axis=1 if len(shape) > 1 else 0, keepdims=True)


#: (arrays, options) makers: every option, both kinds of target, every layout of the input
SOFTMAX_CASES = {
    "index": (lambda r: class_indices(r, (5, 4)), {}),
    "weight": (lambda r: class_indices(r, (5, 4)), {"weight": True}),
    "ignore_index": (lambda r: class_indices(r, (6, 3), ignored=False), {"ignore_index": 2}),
    "smoothing": (lambda r: class_indices(r, (5, 4)), {"label_smoothing": 0.3, "weight": True}),
    "one_row": (lambda r: class_indices(r, (4,)), {"label_smoothing": 0.1}),
    "k_dims": (lambda r: class_indices(r, (2, 3, 2, 2)), {"weight": True, "label_smoothing": 0.2}),
    "many_classes": (lambda r: class_indices(r, (3, 40)), {"weight": True}),  # rows > 32 lanes
    "probabilities": (lambda r: class_probabilities(r, (5, 4)), {}),
    "probabilities_options": (
        lambda r: class_probabilities(r, (4, 5)),
        {"weight": True, "label_smoothing": 0.25},
    ),
    "probabilities_k_dims": (lambda r: class_probabilities(r, (2, 3, 2)), {"weight": True}),
}


def softmax_case(name, seed=0, dtype=np.float64):
    """``SOFTMAX_CASES[name]`` drawn: ``(logits, target, options, rng)``, a ``"weight"`` of
    True made a class weight array."""
    make, options = SOFTMAX_CASES[name]
    rng = np.random.default_rng(seed)
    x, t = make(rng)
    classes = x.shape[1] if x.ndim > 1 else x.shape[0]
    options = dict(options)
    if options.get("weight"):
        options["weight"] = (rng.random(classes) + 0.5).astype(dtype)
    t = t.astype(dtype) if t.dtype.kind == "f" else t
    return x.astype(dtype), t, options, rng
