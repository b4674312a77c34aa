"""multi_margin_loss and multilabel_margin_loss against PyTorch (its OpInfo samples and every
option), float64 NumPy references written here, finite differences, thread determinism,
bad input, and the CUDA kernels under the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import cuda
from support import (
    assert_unchanged,
    finite_difference,
    layouts,
    needs_torch,
    snapshot,
    torch_samples,
    torch_value_and_grad,
)

import lossforge as lf
from lossforge.runtime.cpu import threads

MM, ML = "multi_margin_loss", "multilabel_margin_loss"


# -- independent float64 references: explicit loops over PyTorch's definitions ---------------
def ref_multi_margin(x, t, p=1, margin=1.0, weight=None, reduction="mean"):
    x = np.asarray(x, np.float64)
    rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    classes = rows.shape[1]
    w = np.ones(classes) if weight is None else np.asarray(weight, np.float64)
    losses = []
    for z, k in zip(rows, np.asarray(t).reshape(-1)):
        s = 0.0
        for j in range(classes):
            if j != k:
                s += max(0.0, margin - z[k] + z[j]) ** p
        losses.append(w[k] * s / classes)
    losses = np.array(losses)
    if reduction == "none":
        return losses.reshape(np.shape(t))
    return losses.sum() if reduction == "sum" else losses.sum() / len(losses)


def ref_multilabel_margin(x, t, reduction="mean"):
    x = np.asarray(x, np.float64)
    rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    classes = rows.shape[1]
    losses = []
    for z, ts in zip(rows, np.asarray(t).reshape(rows.shape)):
        ids = []
        for k in ts:
            if k == -1:
                break
            ids.append(k)
        s = 0.0
        for y in ids:
            for c in range(classes):
                if c not in ids:
                    s += max(0.0, 1.0 - z[y] + z[c])
        losses.append(s / classes)
    losses = np.array(losses)
    if reduction == "none":
        return losses.reshape(() if x.ndim < 2 else (len(rows),))
    return losses.sum() if reduction == "sum" else losses.sum() / len(losses)


def margin_case(rng, shape, dtype=np.float64):
    x = rng.standard_normal(shape).astype(dtype)
    classes = shape[-1] if shape else 1
    return x, rng.integers(0, classes, shape[:-1])


def label_case(rng, shape, dtype=np.float64):
    x = rng.standard_normal(shape).astype(dtype)
    rows = x.reshape(-1, shape[-1])
    t = np.full(rows.shape, -1, np.int64)
    for i in range(len(rows)):  # 0 to C ids, repeats possible, leftovers after the -1
        n = int(rng.integers(0, rows.shape[1] + 1))
        t[i, :n] = rng.integers(0, rows.shape[1], n)
        t[i, n + 1 :] = rng.integers(0, rows.shape[1], max(rows.shape[1] - n - 1, 0))
    return x, t.reshape(shape)


# -- values against the references -----------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 4), (5,), (3, 40)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options", [{}, {"p": 2, "margin": 0.3}, {"margin": -0.5, "weight": True}, {"p": 2.0}]
)
def test_multi_margin_against_reference(shape, reduction, options, rng):
    x, t = margin_case(rng, shape)
    if options.get("weight"):
        options = dict(options, weight=rng.random(shape[-1]) + 0.5)
    value = lf.multi_margin_loss(x, t, reduction=reduction, **options)
    expected = ref_multi_margin(x, t, reduction=reduction, **options)
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-15)
    assert np.shape(value) == np.shape(expected)


@pytest.mark.parametrize("shape", [(6, 4), (5,), (3, 40)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multilabel_margin_against_reference(shape, reduction, rng):
    x, t = label_case(rng, shape)
    value = lf.multilabel_margin_loss(x, t, reduction=reduction)
    expected = ref_multilabel_margin(x, t, reduction=reduction)
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-15)
    assert np.shape(value) == np.shape(expected)


def test_float32_accuracy(rng):
    x, t = margin_case(rng, (500, 30), np.float32)
    for p in (1, 2):
        value = lf.multi_margin_loss(x, t, p=p, reduction="sum")
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, ref_multi_margin(x, t, p=p, reduction="sum"), rtol=1e-6)
    x, t = label_case(rng, (200, 30), np.float32)
    value = lf.multilabel_margin_loss(x, t, reduction="sum")
    np.testing.assert_allclose(value, ref_multilabel_margin(x, t, reduction="sum"), rtol=1e-6)


# -- gradients and the Hessian: finite differences -------------------------------------------
@pytest.mark.parametrize("shape", [(5, 6), (7,)])
@pytest.mark.parametrize("options", [{}, {"p": 2, "margin": 0.5, "weight": True}])
def test_multi_margin_finite_differences(shape, options, rng):
    x, t = margin_case(rng, shape)
    if options.get("weight"):
        options = dict(options, weight=rng.random(shape[-1]) + 0.5)
    grad = lf.multi_margin_loss.grad(x, t, reduction="sum", **options)
    numeric = finite_difference(lambda v: ref_multi_margin(v, t, reduction="sum", **options), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_multilabel_margin_finite_differences(rng):
    x, t = label_case(rng, (6, 7))
    grad = lf.multilabel_margin_loss.grad(x, t)
    numeric = finite_difference(lambda v: ref_multilabel_margin(v, t), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_multi_margin_hessian(rng):
    """p=2: the exact diagonal (finite differences of the gradient); p=1: ``w_y / C`` per
    active hinge (the docstring's bound), where the true diagonal is 0."""
    x, t = margin_case(rng, (6, 5))
    w = rng.random(5) + 0.5
    go = rng.standard_normal(6)
    kwargs = {"p": 2, "margin": 0.8, "weight": w, "reduction": "none"}
    grad, hess = lf.multi_margin_loss.grad_hess(x, t, grad_output=go, **kwargs)
    np.testing.assert_array_equal(grad, lf.multi_margin_loss.grad(x, t, grad_output=go, **kwargs))

    def gradient_at(v, index):
        return lf.multi_margin_loss.grad(v, t, grad_output=go, **kwargs)[index]

    numeric = np.empty_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += 1e-6
        down[index] -= 1e-6
        numeric[index] = (gradient_at(up, index) - gradient_at(down, index)) / 2e-6
    np.testing.assert_allclose(hess, numeric, rtol=1e-6, atol=1e-8)
    _, h1 = lf.multi_margin_loss.grad_hess(x, t, weight=w, reduction="sum")
    for i, k in enumerate(t):
        active = [j for j in range(5) if j != k and 1.0 - x[i, k] + x[i, j] > 0]
        expected = np.zeros(5)
        expected[active] = w[k] / 5
        expected[k] = w[k] / 5 * len(active)
        np.testing.assert_allclose(h1[i], expected, rtol=1e-15)


def test_multilabel_margin_has_no_hessian(rng):
    x, t = label_case(rng, (3, 4))
    with pytest.raises(NotImplementedError):
        lf.multilabel_margin_loss.grad_hess(x, t)


# -- PyTorch -----------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("name", [MM, ML])
def test_torch_sample_inputs(name):
    count = 0
    for (x, t), options in torch_samples(name):
        value, grad = lf.get(name).value_and_grad(x, t, **options)
        t_value, (t_grad,) = torch_value_and_grad(name, (x, t), **options)
        rtol = 1e-5 if x.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=1e-6)
        assert np.asarray(value).dtype == x.dtype and np.shape(value) == np.shape(t_value)
        count += 1
    assert count >= 20 if name == MM else count >= 12


@needs_torch
@pytest.mark.parametrize("shape", [(8, 5), (5,), (), (4, 300)])
@pytest.mark.parametrize(
    "options", [{"p": 1}, {"p": 2, "margin": 0.4, "weight": True}, {"margin": -0.2}]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_multi_margin_options(shape, options, reduction, dtype, rng):
    x, t = margin_case(rng, shape, dtype)
    if options.get("weight"):
        options = dict(options, weight=(rng.random(shape[-1] if shape else 1) + 0.2).astype(dtype))
    go = rng.standard_normal(np.shape(t)).astype(dtype) if reduction == "none" else None
    value, grad = lf.multi_margin_loss.value_and_grad(
        x, t, grad_output=go, reduction=reduction, **options
    )
    t_value, (t_grad,) = torch_value_and_grad(
        MM, (x, t), grad_output=go, **options, reduction=reduction
    )
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("shape", [(8, 5), (5,), (4, 300)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_multilabel_margin(shape, reduction, dtype, rng):
    x, t = label_case(rng, shape, dtype)
    go = rng.standard_normal(x.shape[:-1]).astype(dtype) if reduction == "none" else None
    value, grad = lf.multilabel_margin_loss.value_and_grad(
        x, t, grad_output=go, reduction=reduction
    )
    t_value, (t_grad,) = torch_value_and_grad(ML, (x, t), grad_output=go, reduction=reduction)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=1e-6)


@needs_torch
def test_nan_scores_like_torch(rng):
    """PyTorch's ``> 0`` test makes a nan hinge inactive: the loss stays finite."""
    x, t = margin_case(rng, (4, 6))
    x[1, 2] = np.nan
    x[2, t[2]] = np.nan
    for name, target in [(MM, t), (ML, np.where(np.arange(6) < 2, 1, -1) * np.ones((4, 1), int))]:
        value, grad = lf.get(name).value_and_grad(x, target, reduction="none")
        t_value, (t_grad,) = torch_value_and_grad(name, (x, target), reduction="none")
        np.testing.assert_allclose(value, t_value, rtol=1e-12)
        np.testing.assert_allclose(grad, t_grad, rtol=1e-12)


@given(st.integers(1, 6), st.integers(1, 7), st.integers(0, 2**16))
def test_multilabel_property_sum_is_sum_of_rows(rows, classes, seed):
    x, t = label_case(np.random.default_rng(seed), (rows, classes))
    none = lf.multilabel_margin_loss(x, t, reduction="none")
    np.testing.assert_allclose(lf.multilabel_margin_loss(x, t, reduction="sum"), none.sum())
    np.testing.assert_allclose(none, ref_multilabel_margin(x, t, reduction="none"), rtol=1e-12)


# -- determinism, layouts, immutability ------------------------------------------------------
@pytest.mark.parametrize("classes", [3, 50])
def test_bitwise_identical_for_any_thread_count(classes, rng):
    rows = (1 << 17) // classes + 7  # above the parallel threshold, several chunks
    x, t = margin_case(rng, (rows, classes))
    _, labels = label_case(rng, (rows, classes))
    for name, target, options in [
        (MM, t, {"p": 2, "weight": rng.random(classes)}),
        (ML, labels, {}),
    ]:
        results = []
        for n in (1, 2):
            with threads(n):
                value, grad = lf.get(name).value_and_grad(x, target, reduction="sum", **options)
            results.append((value.tobytes(), grad.tobytes()))
        assert results[0] == results[1]


def test_layouts_and_unchanged_inputs(rng):
    x, t = margin_case(rng, (6, 5))
    _, labels = label_case(rng, (6, 5))
    for name, target in [(MM, t), (ML, labels)]:
        value, grad = lf.get(name).value_and_grad(x, target)
        for kind, variant in layouts(x).items():
            before = snapshot(variant, target)
            v, g = lf.get(name).value_and_grad(variant, layouts(target)[kind])
            np.testing.assert_allclose(v, value, rtol=1e-15)
            np.testing.assert_allclose(g, grad, rtol=1e-15)
            assert_unchanged(before, [variant, target])


def test_any_integer_target_dtype_and_empty(rng):
    x, t = margin_case(rng, (6, 5))
    expected = lf.multi_margin_loss(x, t)
    for dtype in (np.int8, np.uint16, np.int32, np.uint64):
        assert lf.multi_margin_loss(x, t.astype(dtype)) == expected
    empty = np.empty((0, 5))
    assert np.isnan(lf.multi_margin_loss(empty, np.empty(0, np.int64)))
    assert lf.multilabel_margin_loss(empty, np.empty((0, 5), np.int64), reduction="sum") == 0
    assert lf.multi_margin_loss.grad(empty, np.empty(0, np.int64)).shape == (0, 5)


# -- bad input (API.md section 5) ------------------------------------------------------------
@pytest.mark.parametrize("bad", [5, -1, 2**40])
def test_multi_margin_target_out_of_range(bad, rng):
    x, t = margin_case(rng, (6, 5))
    t[3] = bad
    with pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
        lf.multi_margin_loss(x, t)


@pytest.mark.parametrize("bad", [5, -2])
@pytest.mark.parametrize("after_the_end", [False, True])
def test_multilabel_margin_ids_out_of_range(bad, after_the_end, rng):
    """Every entry is checked, those after the first -1 too, as PyTorch does."""
    x, t = label_case(rng, (4, 5))
    t[2] = [1, -1, 0, 0, 0] if after_the_end else [1, 0, 0, 0, 0]
    t[2, 3] = bad
    with pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
        lf.multilabel_margin_loss.value_and_grad(x, t)


def test_bad_options_and_shapes(rng):
    x, t = margin_case(rng, (6, 5))
    for p in (3, 0, 1.5, True, "1"):
        with pytest.raises(ValueError, match="p must be 1 or 2"):
            lf.multi_margin_loss(x, t, p=p)
    with pytest.raises(ValueError, match="weight"):
        lf.multi_margin_loss(x, t, weight=np.ones(4))
    with pytest.raises(TypeError, match="margin"):
        lf.multi_margin_loss(x, t, margin="1")
    with pytest.raises(ValueError, match=r"\(6,\)"):
        lf.multi_margin_loss(x, t[:5])
    with pytest.raises(ValueError, match=r"\(2, 3, 5\)"):
        lf.multi_margin_loss(np.ones((2, 3, 5)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="at least one class"):
        lf.multi_margin_loss(np.ones((2, 0)), np.zeros(2, np.int64))
    with pytest.raises(TypeError, match="int64"):
        lf.multi_margin_loss(x.astype(np.int64), t)
    with pytest.raises(TypeError, match="float64"):
        lf.multi_margin_loss(x, t.astype(np.float64))
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)|\(6, 4\).*\(6, 5\)"):
        lf.multilabel_margin_loss(x, np.zeros((6, 4), np.int64))


# -- CUDA (the simulator without a GPU) -----------------------------------------------------
needs_cuda = pytest.mark.skipif(not cuda.is_available(), reason="no GPU and no simulator")


@needs_cuda
@pytest.mark.parametrize("shape", [(5, 4), (4,), (30, 3), (3, 37)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_matches_the_cpu(shape, dtype, rng):
    x, t = margin_case(rng, shape, dtype)
    _, labels = label_case(rng, shape)
    w = (rng.random(shape[-1]) + 0.5).astype(dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    cases = [(MM, t, {"p": 2, "weight": w, "margin": 0.6}), (MM, t, {}), (ML, labels, {})]
    for name, target, options in cases:
        loss = lf.get(name)
        device = cuda.to_device(x), cuda.to_device(target)
        for reduction in ("mean", "none"):
            value, grad = loss.value_and_grad(x, target, reduction=reduction, **options)
            d_value, d_grad = loss.value_and_grad(*device, reduction=reduction, **options)
            d_value = d_value.copy_to_host() if hasattr(d_value, "copy_to_host") else d_value
            np.testing.assert_allclose(d_value, value, rtol=rtol, atol=1e-12)
            np.testing.assert_allclose(d_grad.copy_to_host(), grad, rtol=rtol, atol=1e-12)
        if name == MM:
            _, hess = loss.grad_hess(x, target, **options)
            _, d_hess = loss.grad_hess(*device, **options)
            np.testing.assert_allclose(d_hess.copy_to_host(), hess, rtol=rtol, atol=1e-12)


@needs_cuda
def test_cuda_bad_targets_get_the_cpu_exception(rng):
    x, t = margin_case(rng, (5, 4))
    t[2] = 7
    with pytest.raises(IndexError, match="target 7 is out of bounds"):
        lf.multi_margin_loss(cuda.to_device(x), cuda.to_device(t))
    _, labels = label_case(rng, (5, 4))
    labels[3, 1] = -3
    with pytest.raises(IndexError, match="target -3 is out of bounds"):
        lf.multilabel_margin_loss.grad(cuda.to_device(x), cuda.to_device(labels))


@needs_torch
def test_torch_modules(rng):
    import torch

    from lossforge import torch as lt

    x, t = margin_case(rng, (4, 5))
    module = lt.MultiMarginLoss(p=2, margin=0.5)
    value = module(torch.from_numpy(x), torch.from_numpy(t))
    np.testing.assert_allclose(value.item(), ref_multi_margin(x, t, p=2, margin=0.5), rtol=1e-12)
    _, labels = label_case(rng, (4, 5))
    value = lt.MultiLabelMarginLoss()(torch.from_numpy(x), torch.from_numpy(labels))
    np.testing.assert_allclose(value.item(), ref_multilabel_margin(x, labels), rtol=1e-12)


def test_dask_chunks_keep_rows_whole(rng):
    da = pytest.importorskip("dask.array")
    import lossforge.dask as lfd

    x, t = margin_case(rng, (40, 6))
    _, labels = label_case(rng, (40, 6))
    w = rng.random(6) + 0.5
    chunked = da.from_array(x, chunks=(7, 4))  # class axis split: rechunked whole
    for name, target, options in [(MM, t, {"p": 2, "weight": w}), (ML, labels, {})]:
        value, grad = lf.get(name).value_and_grad(x, target, **options)
        d_value, d_grad = lfd.get(name).value_and_grad(chunked, target, **options)
        np.testing.assert_allclose(d_value, value, rtol=1e-12)
        np.testing.assert_allclose(d_grad.compute(), grad, rtol=1e-12)
