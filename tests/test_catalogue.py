"""The losses added from formulas after the first families: poisson_nll_loss,
soft_margin_loss and hinge_embedding_loss, against PyTorch (its own OpInfo samples too),
with every option; the conformance kit (tests/test_conformance.py) checks them further."""

from __future__ import annotations

import numpy as np
import pytest
from support import (
    assert_fast_path_is_general_path,
    needs_torch,
    rtol_for,
    torch_samples,
    torch_value_and_grad,
)

import lossforge as lf

pytestmark = needs_torch


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
def test_matches_torch(name, options, reduction, dtype, shape, rng):
    x, y = _inputs(name, rng, shape, dtype, options)
    options = {**options, "reduction": reduction}
    value, grad = lf.get(name).value_and_grad(x, y, **options)
    expected, (expected_grad,) = torch_value_and_grad(name, (x, y), **options)
    rtol = rtol_for(dtype) if dtype == np.float64 else 2e-4  # float32: lossforge in float64
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-6 if dtype == np.float32 else 0)
    np.testing.assert_allclose(grad, expected_grad, rtol=rtol, atol=1e-7)
    assert np.asarray(value).dtype == dtype and grad.dtype == dtype


@pytest.mark.parametrize("name", ["poisson_nll_loss", "soft_margin_loss", "hinge_embedding_loss"])
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


def test_soft_margin_overflows_as_pytorch_does():
    # log1p(exp(-y x)), as PyTorch computes it: inf where exp overflows (documented)
    x = np.array([-1000.0, -700.0, 0.0, 800.0])
    y = np.array([1.0, 1.0, -1.0, 1.0])
    value, grad = lf.soft_margin_loss.value_and_grad(x, y, reduction="none")
    expected, (expected_grad,) = torch_value_and_grad("soft_margin_loss", (x, y), reduction="none")
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12)  # nan where PyTorch's is
    assert np.isinf(value[0]) and np.isfinite(value[1])


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
