"""The regression family against float64 NumPy references, PyTorch, and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
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

LOSSES = ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"]
WEIGHTED = ["mse_loss", "l1_loss", "huber_loss"]


# -- independent float64 references: (per-element loss, d loss / d input) ------------------
def ref_elements(name, x, y, beta=1.0, delta=1.0):
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    a = np.abs(d)
    sign = (d > 0).astype(np.float64) - (d < 0)
    if name == "mse_loss":
        return d * d, 2 * d
    if name == "l1_loss" or (name == "smooth_l1_loss" and beta == 0):
        return a, sign
    if name == "smooth_l1_loss":
        quad = a < beta
        return np.where(quad, 0.5 * d * d / beta, a - 0.5 * beta), np.where(quad, d / beta, sign)
    quad = a < delta
    return np.where(quad, 0.5 * d * d, delta * (a - 0.5 * delta)), np.where(quad, d, delta * sign)


def ref(name, x, y, reduction="mean", weight=None, grad_output=None, **params):
    """Value and gradient (float64) of the reduced loss, by the PyTorch 2.13 definitions."""
    e, de = ref_elements(name, x, y, **params)
    if weight is not None:
        e, de = e * weight, de * weight
    if reduction == "none":
        go = np.ones_like(e) if grad_output is None else grad_output
        return e, de * go
    go = 1.0 if grad_output is None else grad_output
    if reduction == "sum":
        return e.sum(), de * go
    denominator = e.size if (weight is None or name == "huber_loss") else np.sum(weight)
    return e.sum() / denominator, de * go / denominator


def params_for(name):
    return {"smooth_l1_loss": {"beta": 0.7}, "huber_loss": {"delta": 0.8}}.get(name, {})


def data(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


# -- values and gradients ------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_reference(name, reduction, dtype, rng):
    x, y = data(rng, (7, 13), dtype)
    params = params_for(name)
    value, grad = lf.get(name).value_and_grad(x, y, reduction=reduction, **params)
    expected, expected_grad = ref(name, x, y, reduction, **params)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    assert np.asarray(value).dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-7 if dtype == np.float32 else 0)
    np.testing.assert_allclose(
        grad, expected_grad, rtol=rtol, atol=1e-7 if dtype == np.float32 else 1e-15
    )
    np.testing.assert_array_equal(lf.get(name)(x, y, reduction=reduction, **params), value)
    np.testing.assert_array_equal(lf.get(name).grad(x, y, reduction=reduction, **params), grad)


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weighted_against_reference(name, reduction, rng):
    x, y = data(rng, (4, 9))
    w = rng.random((4, 9))
    value, grad = lf.get(name).value_and_grad(x, y, reduction=reduction, weight=w)
    expected, expected_grad = ref(name, x, y, reduction, weight=w)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", LOSSES)
def test_finite_differences(name, rng):
    x, y = data(rng, (3, 5))
    x = x + 0.05  # keep away from the kinks of |d| and the beta/delta boundaries
    params = params_for(name)
    w = rng.random((3, 5)) if name in WEIGHTED else None
    extra = {"weight": w} if w is not None else {}
    grad = lf.get(name).grad(x, y, **params, **extra)
    numeric = finite_difference(lambda v: float(lf.get(name)(v, y, **params, **extra)), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", LOSSES)
def test_beta_delta_edges(name, rng):
    x, y = data(rng, 50)
    params = {"smooth_l1_loss": {"beta": 0.0}, "huber_loss": {"delta": 1e-3}}.get(name, {})
    value, grad = lf.get(name).value_and_grad(x, y, reduction="sum", **params)
    expected, expected_grad = ref(name, x, y, "sum", **params)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12)


# -- PyTorch as the oracle -----------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("name", LOSSES)
def test_torch_sample_inputs(name):
    count = 0
    for (x, y), kwargs in torch_samples(name):
        if x.shape != y.shape:
            continue  # broadcasting: lossforge requires equal shapes (documented)
        value, grad = lf.get(name).value_and_grad(x, y, **kwargs)
        t_value, (t_grad,) = torch_value_and_grad(name, (x, y), **kwargs)
        rtol = 2e-6 if x.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=1e-6)
        assert np.asarray(value).dtype == x.dtype
        count += 1
    assert count >= 4


@needs_torch
@pytest.mark.parametrize(
    ("name", "weighted"), [(n, False) for n in LOSSES] + [(n, True) for n in WEIGHTED]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_options(name, reduction, weighted, rng):
    x, y = data(rng, (6, 11), np.float32)
    options = dict(params_for(name), reduction=reduction)
    if weighted:
        options["weight"] = rng.random((6, 11)).astype(np.float32)
    go = rng.standard_normal((6, 11)).astype(np.float32) if reduction == "none" else 0.3
    value, grad = lf.get(name).value_and_grad(x, y, grad_output=go, **options)
    t_value, (t_grad,) = torch_value_and_grad(name, (x, y), grad_output=go, **options)
    np.testing.assert_allclose(value, t_value, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grad, t_grad, rtol=2e-6, atol=1e-7)


@needs_torch
@pytest.mark.parametrize("name", LOSSES)
def test_nan_and_inf_propagate_like_torch(name):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, 1.0])
    y = np.zeros(5)
    value, grad = lf.get(name).value_and_grad(x, y, reduction="none")
    t_value, (t_grad,) = torch_value_and_grad(name, (x, y), reduction="none")
    np.testing.assert_array_equal(value, t_value)
    np.testing.assert_array_equal(grad, t_grad)


# -- properties ----------------------------------------------------------------------------
arrays = hnp.arrays(
    np.float64,
    st.integers(0, 40),
    elements=st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
)


@given(x=arrays, seed=st.integers(0, 2**32 - 1), name=st.sampled_from(LOSSES))
def test_reductions_agree(x, seed, name):
    y = np.random.default_rng(seed).standard_normal(x.shape)
    loss = lf.get(name)
    none = loss(x, y, reduction="none")
    total = loss(x, y, reduction="sum")
    np.testing.assert_allclose(total, none.sum(), rtol=1e-12, atol=1e-12)
    mean = loss(x, y)
    if x.size:
        np.testing.assert_allclose(mean, total / x.size, rtol=1e-12)
    else:
        assert np.isnan(mean) and total == 0
    assert loss.partial(x, y) == (float(total), float(x.size))


@given(x=arrays, g=st.floats(-10, 10), name=st.sampled_from(LOSSES))
def test_gradient_linear_in_grad_output(x, g, name):
    y = np.linspace(-1, 1, x.size)
    loss = lf.get(name)
    base = loss.grad(x, y, reduction="sum")
    np.testing.assert_allclose(
        loss.grad(x, y, reduction="sum", grad_output=g), g * base, rtol=1e-12
    )
    go = np.full(x.shape, g)
    np.testing.assert_allclose(
        loss.grad(x, y, reduction="none", grad_output=go), g * base, rtol=1e-12
    )


# -- dtypes, layouts, sizes ----------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
def test_float16_in_float16_out(name, rng):
    x, y = data(rng, 100, np.float16)
    value, grad = lf.get(name).value_and_grad(x, y)
    assert value.dtype == np.float16 and grad.dtype == np.float16
    expected, expected_grad = ref(name, x, y)
    np.testing.assert_allclose(value, expected, rtol=2e-3)
    np.testing.assert_allclose(grad, expected_grad, rtol=2e-3, atol=1e-6)
    assert lf.get(name)(x, y, reduction="none").dtype == np.float16


def test_mixed_dtypes_promote_like_torch(rng):
    x, y = data(rng, 10, np.float32)
    value, grad = lf.mse_loss.value_and_grad(x, y.astype(np.float64))
    assert value.dtype == np.float64 and grad.dtype == np.float32


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("layout", ["strided", "fortran", "readonly", "bigendian"])
def test_memory_layouts(name, layout, rng):
    x, y = data(rng, (5, 8))
    expected = lf.get(name).value_and_grad(x, y, reduction="none")
    xl, yl = layouts(x)[layout], layouts(y)[layout]
    before = snapshot(xl, yl)
    value, grad = lf.get(name).value_and_grad(xl, yl, reduction="none")
    np.testing.assert_array_equal(value, expected[0])
    np.testing.assert_array_equal(grad, expected[1])
    assert_unchanged(before, (xl, yl))


def test_lists_and_scalars():
    assert lf.mse_loss([1.0, 2.0], [0.0, 0.0]) == 2.5
    value, grad = lf.mse_loss.value_and_grad(np.float64(3.0), np.float64(1.0))
    assert value == 4.0 and grad.shape == () and grad == 4.0


@pytest.mark.parametrize("name", LOSSES)
def test_empty(name):
    x = np.empty((0, 3))
    loss = lf.get(name)
    assert np.isnan(loss(x, x))
    assert loss(x, x, reduction="sum") == 0
    assert loss(x, x, reduction="none").shape == (0, 3)
    assert loss.grad(x, x).shape == (0, 3)


@pytest.mark.parametrize("name", LOSSES)
def test_bitwise_identical_for_any_thread_count(name, rng):
    n = max(PARALLEL_MIN, 10**6)
    x, y = data(rng, n, np.float32)
    loss = lf.get(name)
    with threads(1):
        v1, g1 = loss.value_and_grad(x, y)
    with threads(2):
        v2, g2 = loss.value_and_grad(x, y)
    assert v1.tobytes() == v2.tobytes()
    assert g1.tobytes() == g2.tobytes()
    # the serial and parallel variants agree too (same chunking)
    small = loss.value_and_grad(x[: PARALLEL_MIN - 1], y[: PARALLEL_MIN - 1], reduction="sum")
    np.testing.assert_allclose(
        small[0], ref(name, x[: PARALLEL_MIN - 1], y[: PARALLEL_MIN - 1], "sum")[0], rtol=1e-6
    )


def test_large_float32_sum_is_accurate(rng):
    x, y = data(rng, 10**6 + 17, np.float32)
    expected = ref("mse_loss", x, y)[0]
    np.testing.assert_allclose(lf.mse_loss(x, y), expected, rtol=1e-6)


# -- out= ----------------------------------------------------------------------------------
def test_out_receives_the_gradient(rng):
    x, y = data(rng, (4, 4), np.float32)
    out = np.full_like(x, np.nan)
    value, grad = lf.mse_loss.value_and_grad(x, y, out=out)
    assert grad is out
    np.testing.assert_allclose(value, ref("mse_loss", x, y)[0], rtol=1e-6)
    np.testing.assert_allclose(out, ref("mse_loss", x, y)[1], rtol=1e-6)
    assert lf.mse_loss.grad(x, y, out=out) is out


def test_out_float16(rng):
    x, y = data(rng, 20, np.float16)
    out = np.empty_like(x)
    _, grad = lf.l1_loss.value_and_grad(x, y, out=out)
    assert grad is out
    np.testing.assert_array_equal(out, lf.l1_loss.grad(x, y))


@pytest.mark.parametrize(
    ("out", "error", "match"),
    [
        (np.empty((4, 5), np.float32), ValueError, r"shape \(4, 4\)"),
        (np.empty((4, 4), np.float64), TypeError, "dtype float32"),
        (np.empty((4, 8), np.float32)[:, ::2], ValueError, "C-contiguous"),
        ([[0.0] * 4] * 4, TypeError, "NumPy array"),
    ],
)
def test_bad_out(out, error, match, rng):
    x, y = data(rng, (4, 4), np.float32)
    with pytest.raises(error, match=match):
        lf.mse_loss.value_and_grad(x, y, out=out)


def test_out_of_the_compute_dtype_for_float16(rng):
    # float16 is computed in float32, but the gradient's dtype is float16: so must out's be
    x, y = data(rng, 8, np.float16)
    with pytest.raises(TypeError, match="dtype float16, got float32"):
        lf.mse_loss.value_and_grad(x, y, out=np.empty(8, np.float32))


def test_read_only_out(rng):
    x, y = data(rng, 8, np.float32)
    out = np.empty(8, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        lf.mse_loss.value_and_grad(x, y, out=out)


# -- the fast path (KernelSpec.fast) --------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", [(), (1000,), (3, 5, 7), (PARALLEL_MIN + 5,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_is_the_general_path(name, shape, dtype, rng):
    x, y = data(rng, shape, dtype)
    assert lf.get(name)._registry.fast_path(name)((x, y), None) is not None  # taken below
    assert_fast_path_is_general_path(name, (x, y), {"reduction": "mean"})


@pytest.mark.parametrize("name", LOSSES)
def test_fast_path_leaves_the_rest_to_the_general_path(name, rng):
    loss = lf.get(name)
    x, y = data(rng, (4, 6))
    for args in [(x, y.astype(np.float32)), (np.asfortranarray(x), y), (x.tolist(), y)]:
        expected = ref(name, *map(np.asarray, args))[0]
        np.testing.assert_allclose(loss.value_and_grad(*args)[0], expected, rtol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        loss.value_and_grad(x, y[:, :3])
    with pytest.raises(TypeError, match="dtype float64, got float32"):
        loss.value_and_grad(x, y, out=np.empty((4, 6), np.float32))
    value, grad = loss.value_and_grad(np.empty(0), np.empty(0))  # empty: nan
    assert np.isnan(value) and grad.shape == (0,)


# -- bad input (API.md section 5) ------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
def test_bad_reduction(name, rng):
    x, y = data(rng, 4)
    before = snapshot(x, y)
    with pytest.raises(
        ValueError, match=r"reduction must be one of 'none', 'mean', 'sum', got 'avg'"
    ):
        lf.get(name)(x, y, reduction="avg")
    assert_unchanged(before, (x, y))


@pytest.mark.parametrize(("name", "option"), [("smooth_l1_loss", "beta"), ("huber_loss", "delta")])
def test_negative_beta_delta(name, option, rng):
    x, y = data(rng, 4)
    with pytest.raises(ValueError, match=f"{option} must be a non-negative number, got -1.0"):
        lf.get(name)(x, y, **{option: -1.0})
    with pytest.raises(ValueError, match=option):
        lf.get(name)(x, y, **{option: float("nan")})


def test_huber_delta_zero(rng):
    x, y = data(rng, 4)
    with pytest.raises(ValueError, match="delta must be positive"):
        lf.huber_loss(x, y, delta=0.0)


@pytest.mark.parametrize("name", LOSSES)
def test_shape_mismatch(name, rng):
    x, y = rng.random((3, 4)), rng.random((4, 3))
    before = snapshot(x, y)
    with pytest.raises(ValueError, match=r"input of shape \(3, 4\) and target of shape \(4, 3\)"):
        lf.get(name)(x, y)
    assert_unchanged(before, (x, y))


@pytest.mark.parametrize("name", WEIGHTED)
def test_weight_shape_mismatch(name, rng):
    x, y = data(rng, (3, 4))
    with pytest.raises(ValueError, match=r"weight of shape \(4,\) and input of shape \(3, 4\)"):
        lf.get(name)(x, y, weight=np.ones(4))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128, object])
def test_non_float_dtypes(name, dtype):
    x = np.ones(3, dtype=dtype)
    y = np.ones(3)
    with pytest.raises(
        TypeError,
        match=f"input must be a float16, float32 or float64 array, got dtype {np.dtype(dtype)}",
    ):
        lf.get(name)(x, y)
    with pytest.raises(TypeError, match="target must be a float"):
        lf.get(name)(y, x)


def test_unknown_option_and_arity(rng):
    x, y = data(rng, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'size_average'"):
        lf.mse_loss(x, y, size_average=True)
    with pytest.raises(TypeError, match="takes 2 array arguments"):
        lf.mse_loss(x)


def test_bad_grad_output(rng):
    x, y = data(rng, (2, 3))
    with pytest.raises(ValueError, match="must be a scalar"):
        lf.mse_loss.grad(x, y, grad_output=np.ones(3))
    with pytest.raises(ValueError, match=r"value's shape \(2, 3\)"):
        lf.mse_loss.grad(x, y, reduction="none", grad_output=np.ones(3))
    with pytest.raises(TypeError, match="grad_output must be a float"):
        lf.mse_loss.grad(x, y, reduction="none", grad_output=np.ones((2, 3), int))


def _sum_in_documented_order(losses):
    """The regression kernel's sum, written out: per chunk of CHUNK elements, the loss of
    element k of every tile of TILE elements (and of the partial tile at the end) goes to
    running sum k, in order; the TILE sums are added by a halving tree; the chunk partials in
    chunk order. float64 throughout, one rounding per add, as the kernel."""
    from lossforge.runtime.cpu import CHUNK, TILE

    total = 0.0
    for c0 in range(0, losses.size, CHUNK):
        chunk = losses[c0 : c0 + CHUNK]
        sums = np.zeros(TILE)
        for t0 in range(0, chunk.size, TILE):
            tile = chunk[t0 : t0 + TILE]
            sums[: tile.size] += tile
        while sums.size > 1:
            half = sums.size // 2
            sums = sums[:half] + sums[half:]
        total += sums[0]
    return total


@given(n=st.integers(1, 3 * 2**14 + 200), seed=st.integers(0, 2**32 - 1))
def test_sum_is_in_the_documented_order(n, seed):
    # differences of 26 significant bits: their squares are exact, so the kernel's fused
    # multiply-add (contraction) rounds as the reference's add does; the wide exponents
    # make every add round, so that another order gives another sum
    rng = np.random.default_rng(seed)
    x = rng.integers(-(2**26), 2**26, n) * 2.0 ** rng.integers(-30, 30, n)
    y = np.zeros(n)
    assert lf.mse_loss(x, y, reduction="sum") == _sum_in_documented_order(x * x)
