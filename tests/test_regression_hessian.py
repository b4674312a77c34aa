"""``grad_hess`` of log_cosh_loss, pinball_loss, tweedie_loss and kl_div: the Hessian
diagonal against PyTorch's ``torch.autograd.functional.hessian`` of the loss written as a
torch expression (or of ``F.kl_div``), pinball's documented bound against NumPy, and log-cosh's
at large differences. Finite differences per option set, CUDA under the simulator and the
reduction's scaling are the conformance kit's (tests/test_conformance.py)."""

from __future__ import annotations

import numpy as np
import pytest
from support import F, needs_torch, torch

import lossforge as lf


def _log_cosh(x, y):
    return torch.log(torch.cosh(x - y))  # fine for the |d| < 5 used here


def _tweedie(power):
    def f(x, y):
        return torch.exp((2 - power) * x) / (2 - power) - y * torch.exp((1 - power) * x) / (
            1 - power
        )

    return f


def _inputs(name, rng, shape):
    x = rng.standard_normal(shape)
    if name == "tweedie_loss":
        return 0.5 * x, rng.poisson(1.0, shape) * rng.gamma(2.0, 0.5, shape)
    if name == "kl_div":
        return x, rng.uniform(0.0, 1.0, shape)
    return x, rng.standard_normal(shape)


CASES = [
    ("log_cosh_loss", {}, _log_cosh),
    ("tweedie_loss", {}, _tweedie(1.5)),
    ("tweedie_loss", {"power": 1.2}, _tweedie(1.2)),
    ("kl_div", {}, None),
    ("kl_div", {"log_target": True}, None),
]


@needs_torch
@pytest.mark.parametrize(("name", "options", "expression"), CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hessian_diagonal_matches_torch(name, options, expression, reduction, rng):
    if name == "kl_div" and reduction == "mean":
        reduction = "batchmean"  # kl_div's "mean" warns; its Hessian is 0 either way
    x, y = _inputs(name, rng, (3, 4))
    if options.get("log_target"):
        y = np.log(y)
    target = torch.from_numpy(y)

    def f(t):
        if expression is None:
            return F.kl_div(t, target, reduction=reduction, **options)
        per_element = expression(t, target)
        return per_element.mean() if reduction == "mean" else per_element.sum()

    full = torch.autograd.functional.hessian(f, torch.from_numpy(x))
    expected = full.reshape(x.size, x.size).diagonal().reshape(x.shape).numpy()
    grad, hess = lf.get(name).grad_hess(x, y, reduction=reduction, **options)
    np.testing.assert_allclose(hess, expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(grad, lf.get(name).grad(x, y, reduction=reduction, **options))


@pytest.mark.parametrize("quantile", [0.1, 0.5, 0.9])
def test_pinball_hessian_is_ones(quantile, rng):
    """Linear pieces (true second derivative 0): 1, l1_loss's and the boosting libraries'."""
    x, y = rng.standard_normal((2, 50))
    go = rng.uniform(0.5, 2.0, 50)
    grad, hess = lf.pinball_loss.grad_hess(
        x, y, quantile=quantile, reduction="none", grad_output=go
    )
    np.testing.assert_array_equal(hess, go)
    d = y - x
    np.testing.assert_array_equal(grad, go * np.where(d > 0, -quantile, 1 - quantile))


def test_log_cosh_hessian_is_stable(rng):
    """``sech(d)^2`` in float64 from ``logaddexp``: no overflow, positive, 0 far out."""
    d = np.concatenate([rng.uniform(-800, 800, 200), rng.uniform(-1e-3, 1e-3, 50), [0.0]])
    _, hess = lf.log_cosh_loss.grad_hess(d, np.zeros_like(d), reduction="sum")
    expected = np.exp(np.log(4.0) - 2 * np.logaddexp(d, -d))
    np.testing.assert_allclose(hess, expected, rtol=1e-14, atol=1e-300)
    assert np.all(np.isfinite(hess)) and hess[-1] == 1.0
