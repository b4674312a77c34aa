"""gaussian_nll_loss against PyTorch 2.13 (its OpInfo samples, every var shape, option and
reduction, the eps clamp, the errors), the gradient of a broadcast var summed exactly and
deterministically, the Hessian diagonal, and CUDA (under the simulator) against the CPU.
Finite differences of all three gradients, per var shape, are the conformance kit's
(tests/test_conformance.py, with the loss's option sets)."""

from __future__ import annotations

import numpy as np
import pytest
from support import F, needs_torch, torch, torch_samples

import lossforge as lf
from lossforge.runtime.cpu import threads
from lossforge.testing import THREADS_SIZE

loss = lf.gaussian_nll_loss
SHAPE = (4, 5)
#: var shapes for an input of SHAPE: its own, without the last axis, a size-1 axis, a number
VARS = [(4, 5), (4,), (4, 1), (1, 5), "number"]


def _var(rng, shape, dtype=np.float64):
    if shape == "number":
        return float(rng.uniform(0.2, 2.0))
    return rng.uniform(0.2, 2.0, shape).astype(dtype)


def _torch(x, t, v, grad_output=None, **options):
    """PyTorch's value and gradients for input, target and var (var's as an array of the
    input's shape summed, for a number, which PyTorch does not differentiate)."""
    X, T = (torch.tensor(a, requires_grad=True) for a in (x, t))
    if isinstance(v, float):
        V = torch.full(x.shape, v, dtype=X.dtype, requires_grad=True)
    else:
        V = torch.tensor(v, requires_grad=True)
    value = F.gaussian_nll_loss(X, T, V, **options)
    go = torch.ones_like(value) if grad_output is None else torch.as_tensor(grad_output)
    gx, gt, gv = torch.autograd.grad(value, (X, T, V), go.to(value.dtype))
    gv = gv.sum() if isinstance(v, float) else gv
    return value.detach().numpy(), (gx.numpy(), gt.numpy(), gv.numpy())


def _assert_matches(ours, theirs, rtol):
    (value, grads), (t_value, t_grads) = ours, theirs
    np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
    for g, t_g in zip(grads, t_grads, strict=True):
        assert g.shape == t_g.shape
        np.testing.assert_allclose(g, t_g, rtol=rtol, atol=1e-6)


@needs_torch
def test_torch_sample_inputs():
    count = 0
    for (x, t, v), kwargs in torch_samples("gaussian_nll_loss", n_arrays=3):
        if x.shape != t.shape:  # PyTorch broadcasts the target; lossforge refuses (documented)
            with pytest.raises(ValueError, match="input and target must have the same shape"):
                loss(x, t, v, **kwargs)
            continue
        rtol = 2e-5 if x.dtype == np.float32 else 1e-12
        _assert_matches(loss.value_and_grad(x, t, v, **kwargs), _torch(x, t, v, **kwargs), rtol)
        count += 1
    assert count >= 60


@needs_torch
@pytest.mark.parametrize("var_shape", VARS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("full", [False, True])
def test_torch_every_var_shape_and_option(var_shape, reduction, full, rng):
    x, t = rng.standard_normal((2, *SHAPE))
    v = _var(rng, var_shape)
    go = rng.standard_normal(SHAPE) if reduction == "none" else 0.3
    options = {"reduction": reduction, "full": full, "eps": 1e-3}
    ours = loss.value_and_grad(x, t, v, grad_output=go, **options)
    _assert_matches(ours, _torch(x, t, v, grad_output=go, **options), 1e-12)


@needs_torch
def test_eps_clamp_passes_the_gradient_as_identity():
    """PyTorch clamps var under no_grad: var's gradient at a clamped entry is the formula's
    at eps (not 0); nan var stays nan; var = 0 is allowed."""
    x = np.array([1.0, 2.0, 3.0, 4.0, 0.5])
    t = np.zeros(5)
    v = np.array([1e-9, 0.0, 1.0, np.nan, 0.05])
    for options in ({}, {"eps": 0.1, "reduction": "none"}):
        ours = loss.value_and_grad(x, t, v, **options)
        _assert_matches(ours, _torch(x, t, v, **options), 1e-12)
    _, (_, _, gv) = loss.value_and_grad(x, t, v, eps=0.1, reduction="sum")
    np.testing.assert_allclose(gv[:2], 0.5 / 0.1 * (1 - x[:2] ** 2 / 0.1), rtol=1e-15)


@needs_torch
@pytest.mark.parametrize(
    ("var", "message"),
    [(np.full((4, 4), 0.5), "var is of incorrect size"), (-0.5, "var has negative entry")],
)
def test_errors_are_torchs(var, message, rng):
    x, t = rng.standard_normal((2, *SHAPE))
    with pytest.raises(ValueError, match=message):
        torch_var = torch.tensor(var) if isinstance(var, np.ndarray) else var
        F.gaussian_nll_loss(torch.tensor(x), torch.tensor(t), torch_var)
    with pytest.raises(ValueError, match=message):
        loss(x, t, var)


@pytest.mark.parametrize(
    "var_shape", [(1, 1), (4, 5, 1), (5,), (), (2, 5), (0, 5)], ids=lambda s: str(s)
)
def test_var_of_incorrect_size(var_shape):
    x = np.ones(SHAPE)
    with pytest.raises(ValueError, match="var is of incorrect size"):
        loss(x, x, np.ones(var_shape))


def test_bad_var(rng):
    x, t = rng.standard_normal((2, *SHAPE))
    v = np.full(SHAPE, 0.5)
    v[2, 3] = -1e-3
    with pytest.raises(ValueError, match=r"var has negative entry/entries \(found -0.001\)"):
        loss.grad(x, t, v)
    with pytest.raises(TypeError, match="var must be a float16, float32 or float64"):
        loss(x, t, np.ones(SHAPE, np.int64))
    with pytest.raises(TypeError, match="var must be a float16, float32 or float64 array"):
        loss(x, t, "1.0")
    with pytest.raises(TypeError, match="full must be True or False"):
        loss(x, t, 1.0, full=1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_dtypes_and_inputs_unchanged(dtype, rng):
    x, t = rng.standard_normal((2, *SHAPE)).astype(dtype)
    v = _var(rng, (4,), np.float64)
    before = [a.copy() for a in (x, t, v)]
    value, (gx, gt, gv) = loss.value_and_grad(x, t, v)
    # PyTorch's promotion: the value float64 (var's), each gradient its argument's dtype
    assert np.asarray(value).dtype == np.float64
    assert (gx.dtype, gt.dtype, gv.dtype) == (dtype, dtype, np.float64)
    np.testing.assert_array_equal(gt, -gx)
    for a, b in zip((x, t, v), before):
        np.testing.assert_array_equal(a, b)
    _, (_, _, g_number) = loss.value_and_grad(x, t, 0.5)
    assert g_number.shape == () and g_number.dtype == dtype


@needs_torch
@pytest.mark.parametrize("var_shape", [(4, 5), (4,), "number"])
def test_hessian_diagonal_matches_torch(var_shape, rng):
    x, t = rng.standard_normal((2, *SHAPE))
    v = _var(rng, var_shape)
    V = v if isinstance(v, float) else torch.from_numpy(v)

    def f(a):
        return F.gaussian_nll_loss(a, torch.from_numpy(t), V, full=True)

    full = torch.autograd.functional.hessian(f, torch.from_numpy(x))
    expected = full.reshape(x.size, x.size).diagonal().reshape(x.shape).numpy()
    grad, hess = loss.grad_hess(x, t, v, full=True)
    np.testing.assert_allclose(hess, expected, rtol=1e-12)
    np.testing.assert_array_equal(grad, loss.grad(x, t, v, full=True)[0])


@pytest.mark.parametrize("var_shape", ["row", "column"])
def test_broadcast_var_gradient_is_exact_and_thread_independent(var_shape, rng):
    """var's gradient summed over the broadcast axis: a float64 NumPy sum of the per-element
    formula, bitwise the same at 1 and 2 threads (THREADS_SIZE: several chunks)."""
    rows = THREADS_SIZE // 8
    x, t = rng.standard_normal((2, rows, 8))
    v = rng.uniform(0.2, 2.0, (rows,) if var_shape == "row" else (1, 8))
    runs = []
    for n in (1, 2):
        with threads(n):
            runs.append(loss.value_and_grad(x, t, v, reduction="sum"))
    (value, grads), (value2, grads2) = runs
    assert np.asarray(value).tobytes() == np.asarray(value2).tobytes()
    for a, b in zip(grads, grads2):
        assert a.tobytes() == b.tobytes()
    vv = v[:, None] if var_shape == "row" else v
    element = 0.5 / vv * (1 - (x - t) ** 2 / vv)
    expected = element.sum(axis=1) if var_shape == "row" else element.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(grads[2], expected, rtol=1e-12, atol=1e-12)


def test_partial(rng):
    x, t = rng.standard_normal((2, *SHAPE))
    total, denominator = loss.partial(x, t, 0.5, full=True)
    assert denominator == x.size
    assert total == pytest.approx(float(loss(x, t, 0.5, full=True, reduction="sum")), rel=1e-15)


@pytest.mark.parametrize("var_shape", [(4, 5), (4,), (1, 5), "number"])
def test_cuda_matches_cpu(var_shape, rng):
    from numba import cuda

    x, t = rng.standard_normal((2, *SHAPE))
    v = _var(rng, var_shape)
    device = [cuda.to_device(a) for a in (x, t)]
    d_v = v if isinstance(v, float) else cuda.to_device(v)
    for reduction in ("sum", "none"):
        value, grads = loss.value_and_grad(x, t, v, reduction=reduction, full=True)
        d_value, d_grads = loss.value_and_grad(*device, d_v, reduction=reduction, full=True)
        host = d_value.copy_to_host() if hasattr(d_value, "copy_to_host") else d_value
        np.testing.assert_allclose(host, value, rtol=1e-12)
        for g, d in zip(grads, d_grads, strict=True):
            np.testing.assert_allclose(d.copy_to_host(), g, rtol=1e-12)
    _, d_hess = loss.grad_hess(*device, d_v)
    np.testing.assert_allclose(d_hess.copy_to_host(), loss.grad_hess(x, t, v)[1], rtol=1e-12)
    bad = np.full(SHAPE, 0.5)
    bad[1, 1] = -2.0
    with pytest.raises(ValueError, match="var has negative entry"):
        loss(*device, cuda.to_device(bad))
