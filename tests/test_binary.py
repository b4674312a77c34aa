"""binary_cross_entropy, binary_cross_entropy_with_logits and multilabel_soft_margin_loss
against float64 NumPy references, PyTorch, and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import (
    assert_fast_path_is_general_path,
    assert_unchanged,
    finite_difference,
    layouts,
    needs_torch,
    snapshot,
    torch_samples,
    torch_value_and_grad,
)

import lossforge as lf
from lossforge.runtime.cpu import PARALLEL_MIN, threads

BINARY = ["binary_cross_entropy", "binary_cross_entropy_with_logits"]
ALL = [*BINARY, "multilabel_soft_margin_loss"]


# -- independent float64 references ----------------------------------------------------------
def ref_elements(name, x, y, weight=None, pos_weight=None):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if name == "binary_cross_entropy":
        with np.errstate(divide="ignore"):
            e = -(y * np.clip(np.log(x), -100, None) + (1 - y) * np.clip(np.log1p(-x), -100, None))
    else:
        p = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
        # -log sigmoid(x) = log(1 + exp(-x)), via logaddexp for stability
        e = p * y * np.logaddexp(0.0, -x) + (1 - y) * np.logaddexp(0.0, x)
    return e if weight is None else e * weight


def ref(name, x, y, reduction="mean", weight=None, pos_weight=None):
    if name == "multilabel_soft_margin_loss":
        e = ref_elements("logits", x, y)
        if weight is not None:
            e = e * weight
        e = e.mean(axis=-1)
    else:
        e = ref_elements(name, x, y, weight, pos_weight)
    if reduction == "none":
        return e
    return e.sum() if reduction == "sum" else e.mean()


def data(name, rng, shape, dtype=np.float64):
    if name == "binary_cross_entropy":
        x = rng.uniform(0.02, 0.98, shape)
    else:
        x = rng.standard_normal(shape) * 3
    y = rng.random(shape)
    return x.astype(dtype), y.astype(dtype)


def options_for(name, rng, shape, dtype=np.float64):
    options = {"weight": (rng.random(shape[-1]) + 0.1).astype(dtype)}
    if name == "binary_cross_entropy_with_logits":
        options["pos_weight"] = (rng.random(shape[-1]) * 3).astype(dtype)
    return options


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_against_reference(name, reduction, weighted, rng):
    x, y = data(name, rng, (5, 4))
    options = options_for(name, rng, (5, 4)) if weighted else {}
    value = lf.get(name)(x, y, reduction=reduction, **options)
    np.testing.assert_allclose(value, ref(name, x, y, reduction, **options), rtol=1e-12)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(7,), (3, 4)])
def test_finite_differences(name, shape, rng):
    x, y = data(name, rng, shape)
    options = options_for(name, rng, shape)
    grad = lf.get(name).grad(x, y, **options)
    numeric = finite_difference(lambda v: float(ref(name, v, y, **options)), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


# -- PyTorch ------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("name", ALL)
def test_torch_sample_inputs(name):
    count = 0
    for (x, y), options in torch_samples(name):
        if x.shape != y.shape:
            continue
        value, grad = lf.get(name).value_and_grad(x, y, **options)
        t_value, (t_grad,) = torch_value_and_grad(name, (x, y), **options)
        rtol = 1e-5 if x.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=1e-6)
        count += 1
    assert count >= 2


@needs_torch
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_options(name, reduction, dtype, rng):
    shape = (6, 5)
    x, y = data(name, rng, shape, dtype)
    options = dict(options_for(name, rng, shape, dtype), reduction=reduction)
    value_shape = (6,) if name == "multilabel_soft_margin_loss" else shape
    go = rng.standard_normal(value_shape).astype(dtype) if reduction == "none" else 1.3
    value, grad = lf.get(name).value_and_grad(x, y, grad_output=go, **options)
    # The oracle runs in float64 on the same (float32) numbers: lossforge computes float32
    # inputs in float64 and rounds once, so it must agree to float32 rounding, where
    # PyTorch's own float32 arithmetic loses more near sigmoid's cancellations.
    wide = {
        k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in options.items()
    }
    t_value, (t_grad,) = torch_value_and_grad(
        name, (x.astype(np.float64), y.astype(np.float64)), grad_output=go, **wide
    )
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-12)
    # float32 is computed in float32 arithmetic: a gradient that is a difference of nearly
    # equal terms (soft labels) is exact to float32 rounding of the terms, not of itself
    atol = 1e-6 * np.abs(t_grad).max() if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=atol)


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_at_exactly_zero_and_one(dtype):
    x = np.array([0.0, 1.0, 0.0, 1.0, 0.5], dtype)
    y = np.array([1.0, 0.0, 0.0, 1.0, 0.3], dtype)
    value, grad = lf.binary_cross_entropy.value_and_grad(x, y, reduction="none")
    t_value, (t_grad,) = torch_value_and_grad("binary_cross_entropy", (x, y), reduction="none")
    assert np.isfinite(value).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(value, t_value, rtol=1e-6)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-6)
    assert value[0] == 100.0  # the clamp of log(0) at -100


@needs_torch
@pytest.mark.parametrize(
    "name", ["binary_cross_entropy_with_logits", "multilabel_soft_margin_loss"]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits(name, dtype):
    x = np.array([[1e4, -1e4, 0.0, 30.0], [-1e4, 1e4, -30.0, 1e-3]], dtype)
    y = np.array([[0.0, 1.0, 0.5, 1.0], [0.0, 1.0, 0.0, 0.2]], dtype)
    value, grad = lf.get(name).value_and_grad(x, y, reduction="sum")
    assert np.isfinite(value) and np.isfinite(grad).all()
    t_value, (t_grad,) = torch_value_and_grad(name, (x, y), reduction="sum")
    np.testing.assert_allclose(value, t_value, rtol=1e-6)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-6, atol=1e-7)


@needs_torch
def test_weight_broadcasting_like_torch(rng):
    x, y = data("binary_cross_entropy_with_logits", rng, (3, 4, 5))
    for weight in [rng.random(5), rng.random((4, 1)), rng.random((3, 4, 5)), rng.random((1, 5))]:
        for name in BINARY:
            xx = x if name != "binary_cross_entropy" else 1 / (1 + np.exp(-x))
            value, grad = lf.get(name).value_and_grad(xx, y, weight=weight)
            t_value, (t_grad,) = torch_value_and_grad(name, (xx, y), weight=weight)
            np.testing.assert_allclose(value, t_value, rtol=1e-12)
            np.testing.assert_allclose(grad, t_grad, rtol=1e-12)


# -- properties ---------------------------------------------------------------------------------
@given(n=st.integers(0, 30), seed=st.integers(0, 2**31), name=st.sampled_from(BINARY))
def test_reductions_agree(n, seed, name):
    rng = np.random.default_rng(seed)
    x, y = data(name, rng, (n,))
    loss = lf.get(name)
    total = loss(x, y, reduction="sum")
    np.testing.assert_allclose(total, loss(x, y, reduction="none").sum(), rtol=1e-12, atol=1e-12)
    assert loss.partial(x, y) == (float(total), float(n))


@given(g=st.floats(-5, 5), seed=st.integers(0, 2**31), name=st.sampled_from(ALL))
def test_gradient_linear_in_grad_output(g, seed, name):
    rng = np.random.default_rng(seed)
    x, y = data(name, rng, (3, 4))
    base = lf.get(name).grad(x, y, reduction="sum")
    scaled = lf.get(name).grad(x, y, reduction="sum", grad_output=g)
    np.testing.assert_allclose(scaled, g * base, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", ALL)
def test_bitwise_identical_for_any_thread_count(name, rng):
    shape = (PARALLEL_MIN // 8 + 3, 8)
    x, y = data(name, rng, shape, np.float32)
    with threads(1):
        v1, g1 = lf.get(name).value_and_grad(x, y)
    with threads(2):
        v2, g2 = lf.get(name).value_and_grad(x, y)
    assert v1.tobytes() == v2.tobytes() and g1.tobytes() == g2.tobytes()
    np.testing.assert_allclose(v1, ref(name, x, y), rtol=1e-6)


# -- dtypes, layouts, sizes -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_float16(name, rng):
    x, y = data(name, rng, (4, 6), np.float16)
    value, grad = lf.get(name).value_and_grad(x, y)
    assert value.dtype == np.float16 and grad.dtype == np.float16
    np.testing.assert_allclose(value, ref(name, x, y), rtol=3e-3)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("layout", ["strided", "fortran", "readonly", "bigendian"])
def test_memory_layouts(name, layout, rng):
    x, y = data(name, rng, (5, 3))
    expected = lf.get(name).value_and_grad(x, y, reduction="none")
    xl, yl = layouts(x)[layout], layouts(y)[layout]
    before = snapshot(xl, yl)
    value, grad = lf.get(name).value_and_grad(xl, yl, reduction="none")
    np.testing.assert_array_equal(value, expected[0])
    np.testing.assert_array_equal(grad, expected[1])
    assert_unchanged(before, (xl, yl))


@pytest.mark.parametrize("name", ALL)
def test_empty(name):
    x = np.empty((0, 3))
    assert np.isnan(lf.get(name)(x, x))
    assert lf.get(name)(x, x, reduction="sum") == 0
    assert lf.get(name).grad(x, x).shape == (0, 3)


def test_out(rng):
    x, y = data("binary_cross_entropy_with_logits", rng, (4, 4), np.float32)
    out = np.empty_like(x)
    _, grad = lf.binary_cross_entropy_with_logits.value_and_grad(x, y, out=out)
    assert grad is out
    np.testing.assert_array_equal(out, lf.binary_cross_entropy_with_logits.grad(x, y))


# -- the fast path (KernelSpec.fast) --------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shape"),
    [(name, shape) for name in BINARY for shape in [(1000,), (3, 5, 7), (PARALLEL_MIN + 5,)]]
    + [("multilabel_soft_margin_loss", shape) for shape in [(7,), (64, 10), (PARALLEL_MIN, 3)]],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_is_the_general_path(name, shape, dtype, rng):
    x, y = data(name, rng, shape, dtype)
    fast = lf.get(name)._registry.fast_path(name)
    assert fast((x, y), None) is not None  # the call below takes it
    assert_fast_path_is_general_path(name, (x, y), {"reduction": "mean"})


def test_fast_path_leaves_bad_probabilities_to_the_general_path(rng):
    x, y = data("binary_cross_entropy", rng, 10)
    x[4] = 1.5
    out = np.zeros_like(x)
    with pytest.raises(ValueError, match=r"found 1\.5;"):
        lf.binary_cross_entropy.value_and_grad(x, y, out=out)
    assert not out.any()


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, 1.5, np.inf])
def test_bce_input_outside_unit_interval(bad, rng):
    x, y = data("binary_cross_entropy", rng, 6)
    x[3] = bad
    before = snapshot(x, y)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\], found"):
        lf.binary_cross_entropy(x, y)
    assert_unchanged(before, (x, y))


def test_bce_names_the_first_input_outside_unit_interval(rng):
    # large enough for the parallel check; the bad elements lie in different chunks
    x, y = data("binary_cross_entropy", rng, 300_000)
    x[200_001] = 2.5
    x[250_000] = -3.0
    with pytest.raises(ValueError, match=r"found 2\.5;"):
        lf.binary_cross_entropy(x, y)


def test_bce_nan_propagates():
    value = lf.binary_cross_entropy(np.array([np.nan, 0.5]), np.array([1.0, 0.0]), reduction="none")
    assert np.isnan(value[0]) and np.isfinite(value[1])


def test_pos_weight_of_wrong_length(rng):
    x, y = data("binary_cross_entropy_with_logits", rng, (4, 5))
    with pytest.raises(
        ValueError,
        match=r"pos_weight of shape \(3,\) .* \(4, 5\): its last dimension must have length 5",
    ):
        lf.binary_cross_entropy_with_logits(x, y, pos_weight=np.ones(3))
    with pytest.raises(ValueError, match=r"weight of shape \(2,\) does not broadcast"):
        lf.binary_cross_entropy(1 / (1 + np.exp(-x)), y, weight=np.ones(2))


def test_multilabel_weight_and_shapes(rng):
    x, y = data("multilabel_soft_margin_loss", rng, (4, 5))
    with pytest.raises(ValueError, match=r"weight of shape \(4,\) does not broadcast"):
        lf.multilabel_soft_margin_loss(x, y, weight=np.ones(4))
    with pytest.raises(ValueError, match=r"input must have shape \(C\) or \(N, C\)"):
        lf.multilabel_soft_margin_loss(x[None], y[None])
    assert lf.multilabel_soft_margin_loss(x[0], y[0], reduction="none").shape == ()


@pytest.mark.parametrize("name", ALL)
def test_bad_dtypes_and_shapes(name, rng):
    x, y = data(name, rng, (4, 5))
    with pytest.raises(
        TypeError, match="target must be a float16, float32 or float64 array, got dtype int64"
    ):
        lf.get(name)(x, y.astype(np.int64))
    with pytest.raises(ValueError, match=r"input of shape \(4, 5\) and target of shape \(5, 4\)"):
        lf.get(name)(x, y.T)
    with pytest.raises(ValueError, match="reduction must be one of"):
        lf.get(name)(x, y, reduction="batchmean")


@pytest.mark.parametrize("bad", [-0.1, 1.5, np.inf, -np.inf])
@pytest.mark.parametrize("options", [{}, {"reduction": "none"}])
def test_bce_target_outside_unit_interval(bad, options, rng):
    # PyTorch 2.13: "all elements of target should be between 0 and 1"
    x, y = data("binary_cross_entropy", rng, 6)
    y[3] = bad
    before = snapshot(x, y)
    out = np.zeros_like(x)
    with pytest.raises(ValueError, match=rf"target must be in \[0, 1\], found {bad!r}"):
        lf.binary_cross_entropy.value_and_grad(x, y, out=out, **options)
    with pytest.raises(ValueError, match=r"target must be in \[0, 1\]"):
        lf.binary_cross_entropy(x.astype(np.float32), y.astype(np.float32), **options)
    assert not out.any()
    assert_unchanged(before, (x, y))


def test_bce_names_the_first_target_outside_unit_interval(rng):
    x, y = data("binary_cross_entropy", rng, 300_000)
    y[200_001] = 2.5
    y[250_000] = -3.0
    with pytest.raises(ValueError, match=r"found 2\.5"):
        lf.binary_cross_entropy(x, y)
