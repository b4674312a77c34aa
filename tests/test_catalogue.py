"""The losses added from formulas after the first families: poisson_nll_loss,
soft_margin_loss, hinge_embedding_loss and kl_div, against PyTorch (its own OpInfo samples
too), with every option; the conformance kit (tests/test_conformance.py) checks them further."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import (
    assert_fast_path_is_general_path,
    needs_torch,
    rtol_for,
    torch_samples,
    torch_value_and_grad,
)

import lossforge as lf


def _inputs(name, rng, shape, dtype, options):
    x = rng.standard_normal(shape)
    if name == "poisson_nll_loss":
        y = rng.poisson(2.0, shape).astype(np.float64)
        if options.get("log_input") is False:
            x = np.exp(x)  # rates, not log rates
        return x.astype(dtype), y.astype(dtype)
    y = rng.choice([-1.0, 1.0, 0.5], shape)  # 0.5: a target that is neither, both terms
    return (2 * x).astype(dtype), y.astype(dtype)


CASES = [
    ("poisson_nll_loss", {}),
    ("poisson_nll_loss", {"full": True}),
    ("poisson_nll_loss", {"log_input": False}),
    ("poisson_nll_loss", {"log_input": False, "full": True, "eps": 0.1}),
    ("soft_margin_loss", {}),
    ("hinge_embedding_loss", {}),
    ("hinge_embedding_loss", {"margin": 0.3}),
    ("hinge_embedding_loss", {"margin": -1.5}),
]


@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (7,), (3, 4, 5)])
@needs_torch
def test_matches_torch(name, options, reduction, dtype, shape, rng):
    x, y = _inputs(name, rng, shape, dtype, options)
    options = {**options, "reduction": reduction}
    value, grad = lf.get(name).value_and_grad(x, y, **options)
    expected, (expected_grad,) = torch_value_and_grad(name, (x, y), **options)
    rtol = rtol_for(dtype) if dtype == np.float64 else 2e-4  # float32: lossforge in float64
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-6 if dtype == np.float32 else 0)
    np.testing.assert_allclose(grad, expected_grad, rtol=rtol, atol=1e-7)
    assert np.asarray(value).dtype == dtype and grad.dtype == dtype


@pytest.mark.parametrize(
    "name", ["poisson_nll_loss", "soft_margin_loss", "hinge_embedding_loss", "kl_div"]
)
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@needs_torch
def test_pytorch_opinfo_samples(name):
    ran = 0
    for (x, y), options in torch_samples(name):
        options = {k: v for k, v in options.items() if k in lf.get(name).options}
        if np.shape(x) != np.shape(y):  # PyTorch broadcasts them; lossforge refuses
            with pytest.raises(ValueError, match="same shape"):
                lf.get(name)(x, y, **options)
            continue
        value, grad = lf.get(name).value_and_grad(x, y, **options)
        expected, (expected_grad,) = torch_value_and_grad(name, (x, y), **options)
        rtol = 1e-10 if x.dtype == np.float64 else 2e-4
        np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-5)
        np.testing.assert_allclose(grad, expected_grad, rtol=rtol, atol=1e-5)
        ran += 1
    assert ran


@needs_torch
def test_soft_margin_overflows_as_pytorch_does():
    # log1p(exp(-y x)), as PyTorch computes it: inf where exp overflows (documented)
    x = np.array([-1000.0, -700.0, 0.0, 800.0])
    y = np.array([1.0, 1.0, -1.0, 1.0])
    value, grad = lf.soft_margin_loss.value_and_grad(x, y, reduction="none")
    expected, (expected_grad,) = torch_value_and_grad("soft_margin_loss", (x, y), reduction="none")
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12)  # nan where PyTorch's is
    assert np.isinf(value[0]) and np.isfinite(value[1])


@needs_torch
def test_hinge_gradient_at_the_margin_and_nan():
    x = np.array([1.0, np.nan, 0.25])
    y = np.array([-1.0, -1.0, -1.0])
    value, grad = lf.hinge_embedding_loss.value_and_grad(x, y, reduction="none")
    expected, (expected_grad,) = torch_value_and_grad(
        "hinge_embedding_loss", (x, y), reduction="none"
    )
    np.testing.assert_array_equal(value, expected)  # nan propagates through the clamp
    np.testing.assert_array_equal(grad, expected_grad)  # -1 at margin - x = 0


@pytest.mark.parametrize(
    ("name", "options", "error", "match"),
    [
        ("poisson_nll_loss", {"log_input": 1}, TypeError, "log_input must be True or False"),
        ("poisson_nll_loss", {"full": "yes"}, TypeError, "full must be True or False"),
        ("poisson_nll_loss", {"eps": None}, TypeError, "eps must be a real number"),
        ("hinge_embedding_loss", {"margin": "1"}, TypeError, "margin must be a real number"),
        ("soft_margin_loss", {"reduction": "avg"}, ValueError, "reduction must be one of"),
    ],
)
def test_bad_options(name, options, error, match):
    x = np.ones(4)
    with pytest.raises(error, match=match):
        lf.get(name)(x, x, **options)


@pytest.mark.parametrize("name", ["poisson_nll_loss", "soft_margin_loss", "hinge_embedding_loss"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_is_the_general_path(name, dtype, rng):
    x, y = _inputs(name, rng, (100,), dtype, {})
    assert lf.get(name)._registry.fast_path(name) is not None
    assert_fast_path_is_general_path(name, (x, y), {"reduction": "mean"})


# -- kl_div ---------------------------------------------------------------------------------
def _kl_inputs(rng, shape, dtype, log_target):
    x = np.log(rng.uniform(0.05, 1.0, shape))  # log-probabilities (not normalised: any works)
    y = rng.uniform(0.0, 1.0, shape)
    if np.size(y):
        y.reshape(-1)[::4] = 0.0  # xlogy(0, 0) = 0
    if log_target:
        y = np.log(y + 0.1)
    return x.astype(dtype), y.astype(dtype)


def _torch_quietly(name, arrays, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_value_and_grad(name, arrays, **options)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (7,), (3, 4, 5), (0, 3)])
@needs_torch
def test_kl_div_matches_torch(log_target, reduction, dtype, shape, rng):
    x, y = _kl_inputs(rng, shape, dtype, log_target)
    options = {"reduction": reduction, "log_target": log_target}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value, grad = lf.kl_div.value_and_grad(x, y, **options)
    expected, (expected_grad,) = _torch_quietly("kl_div", (x, y), **options)
    rtol = rtol_for(dtype) if dtype == np.float64 else 2e-5  # float32: lossforge in float64
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-6 if dtype == np.float32 else 0)
    np.testing.assert_allclose(grad, expected_grad, rtol=rtol, atol=1e-7)
    assert np.asarray(value).dtype == dtype and grad.dtype == dtype


def test_kl_div_batchmean_is_the_sum_over_the_first_dimension(rng):
    x, y = _kl_inputs(rng, (6, 5), np.float64, False)
    reference = np.where(y == 0, 0.0, y * np.log(np.where(y == 0, 1.0, y))) - y * x
    batchmean = lf.kl_div(x, y, reduction="batchmean")
    np.testing.assert_allclose(batchmean, reference.sum() / 6, rtol=1e-13)
    total, denominator = lf.kl_div.partial(x, y, reduction="batchmean")
    assert denominator == 6.0 and np.isclose(total / denominator, batchmean, rtol=1e-15)
    assert lf.kl_div.partial(x, y)[1] == 30.0  # "mean"'s denominator by default
    grad = lf.kl_div.grad(x, y, reduction="batchmean", grad_output=2.0)
    np.testing.assert_allclose(grad, -2.0 * y / 6, rtol=1e-15)
    # a 0-d input: PyTorch divides by nothing
    assert lf.kl_div(x[0, 0], y[0, 0], reduction="batchmean") == reference[0, 0]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@needs_torch
def test_kl_div_warns_as_pytorch_does(reduction):
    x, y = np.log(np.full(4, 0.25)), np.full(4, 0.25)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        lf.kl_div.value_and_grad(x, y, reduction=reduction)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch_value_and_grad("kl_div", (x, y), reduction=reduction)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert [w.category for w in ours] == [w.category for w in theirs]
    assert len(ours) == (reduction == "mean")
    assert all(w.filename == __file__ for w in ours)  # points at the caller's line


def test_kl_div_bad_input():
    x = np.zeros(4)
    with pytest.raises(TypeError, match="log_target must be True or False"):
        lf.kl_div(x, x, log_target=1, reduction="sum")
    with pytest.raises(ValueError, match=r"reduction must be one of .*'batchmean', got 'avg'"):
        lf.kl_div(x, x, reduction="avg")
    with pytest.raises(ValueError, match="same shape"):
        lf.kl_div(x, x[:3], reduction="sum")
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean', 'sum', got"):
        lf.mse_loss(x, x, reduction="batchmean")  # another loss's own reduction


def _cuda_matches_cpu(name, arrays, grad_output=None, **options):
    """The CUDA kernel (the simulator without a GPU) against the CPU's: value and gradient."""
    from numba import cuda

    loss = lf.get(name)
    value, grad = loss.value_and_grad(*arrays, grad_output=grad_output, **options)
    device = [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]
    d_value, d_grad = loss.value_and_grad(*device, grad_output=grad_output, **options)
    d_value = d_value.copy_to_host() if hasattr(d_value, "copy_to_host") else d_value
    rtol = 1e-12 if np.asarray(value).dtype == np.float64 else 1e-5
    np.testing.assert_allclose(d_value, value, rtol=rtol, atol=1e-12)
    grads, d_grads = (grad, d_grad) if isinstance(grad, tuple) else ((grad,), (d_grad,))
    for g, d in zip(grads, d_grads, strict=True):
        np.testing.assert_allclose(d.copy_to_host(), g, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_batchmean_on_cuda(log_target, rng):
    x, y = _kl_inputs(rng, (5, 3), np.float64, log_target)
    _cuda_matches_cpu(
        "kl_div", (x, y), grad_output=0.5, reduction="batchmean", log_target=log_target
    )


# -- log_cosh_loss, pinball_loss, tweedie_loss: no PyTorch peer; float64 NumPy references
# written here, from the definitions (not the kernels' stable forms)
def _ref_log_cosh(x, y):
    d = np.asarray(x - y)
    # cosh d - 1 = 2 sinh(d/2)**2 has no cancellation near 0; logaddexp no overflow far off
    with np.errstate(over="ignore"):
        near = np.log1p(2 * np.sinh(d / 2) ** 2)
    return np.where(abs(d) < 1, near, np.logaddexp(d, -d) - np.log(2.0)), np.tanh(d)


def _ref_pinball(x, y, quantile=0.5):
    d = y - x
    loss = np.where(d >= 0, quantile * d, (quantile - 1) * d)
    return loss, np.select([d > 0, d < 0], [-quantile, 1 - quantile], 0.5 - quantile)


def _ref_tweedie(x, y, power=1.5):
    mu = np.exp(x)  # the input is the log of the mean
    loss = mu ** (2 - power) / (2 - power) - y * mu ** (1 - power) / (1 - power)
    return loss, mu ** (2 - power) - y * mu ** (1 - power)


EXTRAS = {
    "log_cosh_loss": _ref_log_cosh,
    "pinball_loss": _ref_pinball,
    "tweedie_loss": _ref_tweedie,
}
EXTRA_CASES = [
    ("log_cosh_loss", {}),
    ("pinball_loss", {}),
    ("pinball_loss", {"quantile": 0.05}),
    ("pinball_loss", {"quantile": 0.9}),
    ("tweedie_loss", {}),
    ("tweedie_loss", {"power": 1.01}),
    ("tweedie_loss", {"power": 1.99}),
]


def _extra_inputs(name, rng, shape, dtype):
    x = rng.standard_normal(shape)
    if name == "tweedie_loss":
        y = rng.poisson(1.0, shape) * rng.gamma(2.0, 0.5, shape)
        return (0.5 * x).astype(dtype), y.astype(dtype)
    y = rng.standard_normal(shape)
    if name == "log_cosh_loss":
        x = x * 20  # into the linear tails too
    if np.size(x) > 2:
        y.reshape(-1)[:2] = x.reshape(-1)[:2]  # ties: the kink of pinball_loss
    return x.astype(dtype), y.astype(dtype)


@pytest.mark.parametrize(("name", "options"), EXTRA_CASES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (7,), (3, 4, 5)])
def test_extras_match_the_reference(name, options, reduction, dtype, shape, rng):
    x, y = _extra_inputs(name, rng, shape, dtype)
    loss, grad = EXTRAS[name](x.astype(np.float64), y.astype(np.float64), **options)
    go = rng.standard_normal(shape) if reduction == "none" else 0.75
    value, g = lf.get(name).value_and_grad(
        x,
        y,
        reduction=reduction,
        grad_output=go.astype(dtype) if reduction == "none" else go,
        **options,
    )
    n = max(np.size(loss), 1)
    expected = {"none": loss, "sum": np.sum(loss), "mean": np.sum(loss) / n}[reduction]
    expected_grad = grad * (go / n if reduction == "mean" else go)
    rtol = 1e-12 if dtype == np.float64 else 2e-6  # float32 inputs, computed in float64
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(g, expected_grad, rtol=rtol, atol=1e-7)
    assert np.asarray(value).dtype == dtype and g.dtype == dtype


@pytest.mark.parametrize(("name", "options"), EXTRA_CASES)
def test_extras_gradient_is_the_derivative(name, options, rng):
    from support import finite_difference

    x, y = _extra_inputs(name, rng, (12,), np.float64)
    x[:2] += 0.1  # off pinball's kink, where the derivative is not defined
    grad = lf.get(name).grad(x, y, reduction="sum", **options)
    numeric = finite_difference(lambda v: lf.get(name)(v, y, reduction="sum", **options), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@needs_torch
def test_pinball_gradient_at_a_tie_is_pytorchs_for_maximum():
    import torch

    x = np.array([0.5, -1.0, 2.0])
    for q in (0.1, 0.5, 0.8):
        t = torch.tensor(x, requires_grad=True)
        d = torch.tensor(x) - t  # target == input
        (expected,) = torch.autograd.grad(torch.maximum(q * d, (q - 1) * d).sum(), t)
        grad = lf.pinball_loss.grad(x, x.copy(), quantile=q, reduction="sum")
        np.testing.assert_allclose(grad, expected.numpy(), rtol=1e-15)


@given(
    st.lists(st.floats(-50, 50), min_size=1, max_size=40),
    st.sampled_from([0.1, 0.25, 0.5, 0.9]),
)
def test_pinball_is_smallest_at_the_quantile(values, q):
    # the defining property: a constant prediction's mean pinball loss is smallest at a
    # q-quantile of the targets (numpy's "inverted_cdf" is one)
    y = np.array(values)
    best = np.quantile(y, q, method="inverted_cdf")
    at = lf.pinball_loss(np.full_like(y, best), y, quantile=q)
    for step in (1e-3, 0.5):
        for c in (best - step, best + step):
            assert at <= lf.pinball_loss(np.full_like(y, c), y, quantile=q) + 1e-12


@given(st.floats(1e-3, 1e3), st.floats(1.01, 1.99))
def test_tweedie_is_smallest_at_the_log_of_the_target(y, power):
    # the prediction's derivative vanishes at mean = target (input = log target)
    x = np.array([np.log(y)])
    target = np.array([y])
    grad = lf.tweedie_loss.grad(x, target, power=power, reduction="sum")
    assert abs(grad[0]) <= 1e-12 * y ** (2 - power) * 10
    at = lf.tweedie_loss(x, target, power=power)
    assert at <= lf.tweedie_loss(x + 0.01, target, power=power)
    assert at <= lf.tweedie_loss(x - 0.01, target, power=power)


@given(st.floats(-1e300, 1e300))
def test_log_cosh_is_finite_and_exact_for_any_difference(d):
    value, grad = lf.log_cosh_loss.value_and_grad(np.array([d]), np.zeros(1), reduction="sum")
    expected, _ = _ref_log_cosh(np.array(d), 0.0)
    assert np.isfinite(value) and np.isclose(value, expected, rtol=1e-14, atol=1e-300)
    assert np.isclose(grad[0], np.tanh(d), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("pinball_loss", {"quantile": 0.0}, r"quantile must be in the open interval \(0.0, 1.0\)"),
        ("pinball_loss", {"quantile": 1.0}, "quantile must be in the open interval"),
        ("pinball_loss", {"quantile": np.nan}, "quantile must be in the open interval"),
        ("tweedie_loss", {"power": 1.0}, r"power must be in the open interval \(1.0, 2.0\)"),
        ("tweedie_loss", {"power": 2.5}, "power must be in the open interval"),
        ("log_cosh_loss", {"reduction": "batchmean"}, "reduction must be one of"),
    ],
)
def test_extras_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        lf.get(name)(np.ones(3), np.ones(3), **options)
    with pytest.raises(TypeError, match="must be a real number"):
        lf.pinball_loss(np.ones(3), np.ones(3), quantile="0.5")


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_tweedie_refuses_a_negative_target(backend):
    x, y = np.zeros(5), np.array([1.0, 0.0, -2.5, 3.0, -1.0])
    with pytest.raises(ValueError, match=r"tweedie_loss target must be non-negative, found -2.5"):
        lf.tweedie_loss.value_and_grad(x, y, backend=backend)
    assert np.isfinite(lf.tweedie_loss(x, np.abs(y), backend=backend))


@pytest.mark.parametrize("name", list(EXTRAS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extras_fast_path_is_the_general_path(name, dtype, rng):
    x, y = _extra_inputs(name, rng, (100,), dtype)
    assert lf.get(name)._registry.fast_path(name) is not None
    assert_fast_path_is_general_path(name, (x, y), {"reduction": "mean"})


# -- cosine_similarity broadcasting its inputs, as PyTorch does -----------------------------
BROADCAST = [
    ((1, 6), (5, 6), 1),  # one query row against many
    ((6,), (5, 6), -1),
    ((5, 6), (6,), 1),
    ((3, 1, 4), (1, 5, 4), -1),
    ((3, 1, 4), (1, 5, 4), 0),  # along a broadcast dimension, moved to rows
    ((2, 1), (2, 3), 0),
]


@needs_torch
@pytest.mark.parametrize(("shape1", "shape2", "dim"), BROADCAST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_similarity_broadcasts_as_pytorch(shape1, shape2, dim, dtype, rng):
    x1 = rng.standard_normal(shape1).astype(dtype)
    x2 = rng.standard_normal(shape2).astype(dtype)
    value = lf.cosine_similarity(x1, x2, dim=dim)
    go = rng.standard_normal(value.shape).astype(dtype)
    before = (x1.copy(), x2.copy())
    value, (g1, g2) = lf.cosine_similarity.value_and_grad(x1, x2, dim=dim, grad_output=go)
    expected, (e1, e2) = torch_value_and_grad(
        "cosine_similarity", (x1, x2), (0, 1), grad_output=go, dim=dim
    )
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    # atol: an input broadcast along dim is a direction the cosine ignores, its gradient a
    # sum that cancels to 0 (float32 rounding, PyTorch's and lossforge's alike)
    atol = 1e-9 if dtype == np.float64 else 5e-5
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(g1, e1, rtol=rtol, atol=atol)
    np.testing.assert_allclose(g2, e2, rtol=rtol, atol=atol)
    assert g1.shape == shape1 and g2.shape == shape2 and g1.dtype == g2.dtype == dtype
    assert np.array_equal(x1, before[0]) and np.array_equal(x2, before[1])
    outs = (np.empty(shape1, dtype), np.empty(shape2, dtype))
    _, got = lf.cosine_similarity.value_and_grad(x1, x2, dim=dim, grad_output=go, out=outs)
    assert got[0] is outs[0] and np.array_equal(got[0], g1) and np.array_equal(got[1], g2)


def test_cosine_similarity_broadcast_float16_and_mixed_dtypes(rng):
    x1 = rng.standard_normal((1, 4))
    x2 = rng.standard_normal((3, 4)).astype(np.float32)
    value, (g1, g2) = lf.cosine_similarity.value_and_grad(x1, x2)
    assert value.dtype == np.float64 and g1.dtype == np.float64 and g2.dtype == np.float32
    value, (g1, g2) = lf.cosine_similarity.value_and_grad(x1.astype(np.float16), x2)
    assert value.dtype == np.float32 and g1.dtype == np.float16 and g1.shape == (1, 4)


def test_cosine_similarity_refuses_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"x1 of shape \(2, 3\) and x2 of shape \(4, 3\) do not"):
        lf.cosine_similarity(np.ones((2, 3)), np.ones((4, 3)))
    with pytest.raises(IndexError, match="dim 2 is out of range"):
        lf.cosine_similarity(np.ones((1, 3)), np.ones((4, 3)), dim=2)


def test_cosine_similarity_broadcast_is_the_same_for_any_thread_count(rng):
    from lossforge.runtime.cpu import threads

    x1 = rng.standard_normal((1, 64))
    x2 = rng.standard_normal((4096, 64))  # above the parallel threshold
    results = []
    for n in (1, 2):
        with threads(n):
            value, (g1, g2) = lf.cosine_similarity.value_and_grad(x1, x2)
        results.append((value.tobytes(), g1.tobytes(), g2.tobytes()))
    assert results[0] == results[1]


@pytest.mark.parametrize(("shape1", "shape2", "dim"), [BROADCAST[0], BROADCAST[4]])
def test_cosine_similarity_broadcast_on_cuda(shape1, shape2, dim, rng):
    x1, x2 = rng.standard_normal(shape1), rng.standard_normal(shape2)
    _cuda_matches_cpu("cosine_similarity", (x1, x2), dim=dim)
