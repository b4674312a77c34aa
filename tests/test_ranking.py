"""margin_ranking_loss: gradients for both inputs from one element-wise formula (its
``target_grad``), against PyTorch (its OpInfo samples too) with every option; the
conformance kit (tests/test_conformance.py) checks it further, on CUDA included."""

from __future__ import annotations

import numpy as np
import pytest
from support import needs_torch, torch_samples, torch_value_and_grad

import lossforge as lf

pytestmark = needs_torch
loss = lf.margin_ranking_loss


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("margin", [0.0, 0.4, -1.0])
@pytest.mark.parametrize("shape", [(), (9,), (3, 4, 5)])
def test_matches_torch(reduction, dtype, margin, shape, rng):
    x1, x2 = rng.standard_normal((2, *shape)).astype(dtype)
    t = rng.choice([-1.0, 1.0, 0.5], shape).astype(dtype)  # 0.5: taken as it is
    if x1.size:
        x2.flat[0] = x1.flat[0] - margin * t.flat[0]  # the clamp's argument exactly 0
    value, (g1, g2) = loss.value_and_grad(x1, x2, t, margin=margin, reduction=reduction)
    expected, (e1, e2) = torch_value_and_grad(
        "margin_ranking_loss", (x1, x2, t), (0, 1), margin=margin, reduction=reduction
    )
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(g1, e1, rtol=rtol)
    np.testing.assert_allclose(g2, e2, rtol=rtol)
    assert np.asarray(value).dtype == dtype and g1.dtype == g2.dtype == dtype


def test_pytorch_opinfo_samples():
    ran = 0
    for (x1, x2, t), options in torch_samples("margin_ranking_loss", 3):
        if not (np.shape(x1) == np.shape(x2) == np.shape(t)):  # PyTorch broadcasts
            with pytest.raises(ValueError, match="same shape"):
                loss(x1, x2, t, **options)
            continue
        value, (g1, g2) = loss.value_and_grad(x1, x2, t, **options)
        expected, (e1, e2) = torch_value_and_grad(
            "margin_ranking_loss", (x1, x2, t), (0, 1), **options
        )
        rtol = 1e-10 if x1.dtype == np.float64 else 1e-5
        np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(g1, e1, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(g2, e2, rtol=rtol, atol=1e-6)
        ran += 1
    assert ran


def test_out_grad_output_and_the_gradients_are_opposite(rng):
    x1, x2 = rng.standard_normal((2, 50))
    t = rng.choice([-1.0, 1.0], 50)
    go = rng.standard_normal(50)
    out = (np.empty(50), np.empty(50))
    _, (g1, g2) = loss.value_and_grad(x1, x2, t, reduction="none", grad_output=go, out=out)
    assert g1 is out[0] and g2 is out[1]
    active = 0.0 - t * (x1 - x2) >= 0
    np.testing.assert_array_equal(g1, np.where(active, -t * go, 0.0))
    np.testing.assert_array_equal(g2, -g1)


@pytest.mark.parametrize(
    ("args", "options", "error", "match"),
    [
        ((np.ones(3), np.ones(4), np.ones(3)), {}, ValueError, "same shape"),
        ((np.ones(3), np.ones(3), np.ones(3)), {"margin": "1"}, TypeError, "margin must be"),
        ((np.ones(3), np.ones(3, int), np.ones(3)), {}, TypeError, "input2"),
        ((np.ones(3), np.ones(3)), {}, TypeError, "takes 3 array arguments"),
    ],
)
def test_bad_input(args, options, error, match):
    with pytest.raises(error, match=match):
        loss(*args, **options)
