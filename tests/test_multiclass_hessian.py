"""cross_entropy's ``grad_hess``: the Hessian diagonal against PyTorch's full Hessian and
finite differences of ``grad``, the value and gradient against ``value_and_grad``, thread
determinism, and the CUDA kernel (Numba's simulator without a GPU) against the CPU's."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import cuda
from support import (
    SOFTMAX_CASES,
    assert_unchanged,
    class_indices,
    class_probabilities,
    needs_torch,
    snapshot,
    softmax_case,
)

# the simulator's fixes and speed-up, applied to this module too (see tests/test_cuda.py)
from test_cuda import _faithful_simulator, _fast_simulator, dev, host  # noqa: F401

import lossforge as lf
from lossforge.runtime.cpu import threads

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None

CE = lf.cross_entropy


def upstream(rng, x, t, reduction):
    """A grad_output for ``reduction``: a scalar, or an array of the value's shape (the
    input's without the class dimension)."""
    if reduction != "none":
        return 0.7
    return rng.normal(size=(x.shape[0], *x.shape[2:]) if x.ndim > 1 else ())


def torch_hessian_diagonal(x, t, grad_output, reduction, options):
    """The diagonal of PyTorch's Hessian of ``sum(grad_output * cross_entropy)``."""
    opts = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    target = torch.from_numpy(np.asarray(t))
    go = torch.as_tensor(grad_output, dtype=torch.float64)

    def f(z):
        return (F.cross_entropy(z, target, reduction=reduction, **opts) * go).sum()

    z = torch.from_numpy(x)
    h = torch.autograd.functional.hessian(f, z).reshape(x.size, x.size)
    return torch.diagonal(h).reshape(x.shape).numpy()


@needs_torch
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", SOFTMAX_CASES)
def test_hessian_diagonal_is_torchs(name, reduction):
    x, t, options, rng = softmax_case(name)
    go = upstream(rng, x, t, reduction)
    before = snapshot(x, t, *options.values())
    grad, hess = CE.grad_hess(x, t, grad_output=go, reduction=reduction, **options)
    assert_unchanged(before, (x, t, *options.values()))
    np.testing.assert_allclose(
        hess, torch_hessian_diagonal(x, t, go, reduction, options), rtol=1e-12, atol=1e-15
    )
    z = torch.from_numpy(x).requires_grad_(True)
    opts = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    value = F.cross_entropy(z, torch.from_numpy(np.asarray(t)), reduction=reduction, **opts)
    (expected,) = torch.autograd.grad(value, [z], torch.as_tensor(go, dtype=torch.float64))
    np.testing.assert_allclose(grad, expected.numpy(), rtol=1e-12, atol=1e-15)


# (the same kernels as the next test's float64 "mean" cases: nothing more to compile)
@pytest.mark.parametrize("name", ["smoothing", "k_dims", "probabilities_options"])
def test_hessian_diagonal_is_the_derivative_of_grad(name):
    x, t, options, _ = softmax_case(name, seed=1)
    _, hess = CE.grad_hess(x, t, **options)
    expected = np.empty(x.size)
    eps = 1e-5
    for i in range(x.size):  # d grad_i / d x_i by central differences, element by element
        up, down = x.copy(), x.copy()
        up.reshape(-1)[i] += eps
        down.reshape(-1)[i] -= eps
        g_up = CE.grad(up, t, **options).reshape(-1)[i]
        g_down = CE.grad(down, t, **options).reshape(-1)[i]
        expected[i] = (g_up - g_down) / (2 * eps)
    np.testing.assert_allclose(hess.reshape(-1), expected, rtol=1e-6, atol=1e-9)


# each of value_and_grad's kernels (few classes, many, probabilities) with and without the
# per-row values and grad_output ("none"); float32 once (every variant compiles apart)
VALUE_CASES = [
    *[
        (name, reduction, np.float64)
        for name in ("index", "smoothing", "many_classes", "k_dims", "probabilities_options")
        for reduction in ("mean", "none")
    ],
    ("smoothing", "none", np.float32),
]


@pytest.mark.parametrize(("name", "reduction", "dtype"), VALUE_CASES)
def test_value_and_grad_are_value_and_grads(name, reduction, dtype):
    x, t, options, rng = softmax_case(name, seed=2, dtype=dtype)
    go = upstream(rng, x, t, reduction)
    if reduction == "none":
        go = go.astype(dtype)
    value, grad, hess = CE.value_grad_hess(x, t, grad_output=go, reduction=reduction, **options)
    expected_value, expected_grad = CE.value_and_grad(
        x, t, grad_output=go, reduction=reduction, **options
    )
    assert np.asarray(value).dtype == grad.dtype == hess.dtype == dtype
    assert grad.shape == hess.shape == x.shape
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(value, expected_value, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad, expected_grad, rtol=tol, atol=tol)


def test_out_and_float16():
    x, t, options, _ = softmax_case("weight")
    g, h = np.empty_like(x), np.empty_like(x)
    grad, hess = CE.grad_hess(x, t, out=(g, h), **options)
    assert grad is g and hess is h
    expected = CE.grad_hess(x, t, **options)
    np.testing.assert_array_equal(g, expected[0])
    np.testing.assert_array_equal(h, expected[1])
    half = CE.grad_hess(x.astype(np.float16), t, weight=options["weight"].astype(np.float16))
    assert half[0].dtype == half[1].dtype == np.float16
    np.testing.assert_allclose(half[1], expected[1], atol=2e-3)


def test_all_ignored_and_empty():
    x = np.random.default_rng(3).normal(size=(3, 4))
    t = np.full(3, -100)
    value, grad, hess = CE.value_grad_hess(x, t)
    assert np.isnan(value)
    assert not grad.any() and not hess.any()
    grad, hess = CE.grad_hess(np.zeros((0, 4)), np.zeros(0, np.int64), reduction="sum")
    assert grad.shape == hess.shape == (0, 4)


def test_nll_loss_has_no_hessian():
    with pytest.raises(NotImplementedError, match="nll_loss"):
        lf.nll_loss.grad_hess(np.zeros((2, 3)), np.zeros(2, np.int64))


@pytest.mark.parametrize("probabilities", [False, True])
def test_bitwise_identical_for_any_thread_count(probabilities):
    # 2 * 10^5 logits: over the parallel threshold, several chunks of rows
    rng = np.random.default_rng(4)
    x, t = class_probabilities(rng, (40000, 5)) if probabilities else class_indices(rng, (40000, 5))
    options = {"weight": rng.random(5) + 0.5, "label_smoothing": 0.1}
    results = []
    for n in (1, numba.config.NUMBA_NUM_THREADS):
        with threads(n):
            results.append(CE.value_grad_hess(x, t, **options))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# -- CUDA (the simulator without a GPU) ---------------------------------------------------
needs_cuda = pytest.mark.skipif(
    not (numba.config.ENABLE_CUDASIM or cuda.is_available()),
    reason="no CUDA GPU, and Numba was imported before NUMBA_ENABLE_CUDASIM=1 was set",
)


@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "name", ["weight", "ignore_index", "smoothing", "one_row", "k_dims", "probabilities_options"]
)
def test_cuda_is_the_cpu(name, reduction):
    x, t, options, rng = softmax_case(name, seed=5)
    go = upstream(rng, x, t, reduction)
    on_device = {k: dev(v) for k, v in options.items()}
    dgo = dev(go) if reduction == "none" else go
    value, grad, hess = CE.value_grad_hess(
        dev(x), dev(t), grad_output=dgo, reduction=reduction, **on_device
    )
    expected = CE.value_grad_hess(x, t, grad_output=go, reduction=reduction, **options)
    for got, want in zip((value, grad, hess), expected):
        np.testing.assert_allclose(host(got), want, rtol=1e-12, atol=1e-15)


@needs_cuda
def test_cuda_float32_and_out():
    x, t, options, _ = softmax_case("smoothing", seed=6, dtype=np.float32)
    g, h = cuda.device_array(x.shape, np.float32), cuda.device_array(x.shape, np.float32)
    on_device = {k: dev(v) for k, v in options.items()}
    results = CE.grad_hess(dev(x), dev(t), out=(g, h), **on_device)
    expected = CE.grad_hess(x, t, **options)
    for got, out, want in zip(results, (g, h), expected):
        np.testing.assert_array_equal(host(got), out.copy_to_host())
        np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-6, atol=1e-7)
