"""sigmoid_focal_loss against torchvision's formula (written here in PyTorch, whose autograd
gives the reference gradient) and the lossforge conformance kit."""

from __future__ import annotations

import numpy as np
import pytest

import lossforge as lf
from lossforge.testing import check_loss

torch = pytest.importorskip("torch")


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    # torchvision.ops.sigmoid_focal_loss, verbatim in substance
    p = torch.sigmoid(inputs)
    ce_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        inputs, targets, reduction="none"
    )
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.8, 1.5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torchvision(reduction, alpha, gamma, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 5)) * 3).astype(dtype)
    y = (rng.random((6, 5)) < 0.3).astype(dtype)
    value, grad = lf.sigmoid_focal_loss.value_and_grad(
        x, y, alpha=alpha, gamma=gamma, reduction=reduction
    )
    xt = torch.from_numpy(x).requires_grad_(True)
    expected = torchvision_sigmoid_focal_loss(xt, torch.from_numpy(y), alpha, gamma, reduction)
    (expected_grad,) = torch.autograd.grad(expected, xt, torch.ones_like(expected))
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(value, expected.detach().numpy(), rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(grad, expected_grad.numpy(), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize(
    ("alpha", "gamma"), [(0.25, 2.0), (-1.0, 1.5), (0.8, 0.5), (0.25, 0.0), (0.3, 1.0), (0.3, 3.0)]
)
def test_hessian_is_torch_autograds(alpha, gamma):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(12) * 3
    y = rng.random(12)
    y[:6] = np.round(y[:6])  # hard labels and soft ones
    target = torch.from_numpy(y)

    def total(t):
        return torchvision_sigmoid_focal_loss(t, target, alpha, gamma, reduction="sum")

    full = torch.autograd.functional.hessian(total, torch.from_numpy(x))
    _, hess = lf.sigmoid_focal_loss.grad_hess(x, y, alpha=alpha, gamma=gamma, reduction="sum")
    np.testing.assert_allclose(hess, full.diagonal().numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_where_p_t_rounds_to_1_the_derivatives_are_0(gamma):
    x, y = np.array([40.0, -800.0]), np.array([1.0, 0.0])  # sigmoid(x) rounds to y
    value, grad = lf.sigmoid_focal_loss.value_and_grad(x, y, gamma=gamma)
    _, hess = lf.sigmoid_focal_loss.grad_hess(x, y, gamma=gamma)
    assert not value.any() and not grad.any() and not hess.any()
    xt = torch.from_numpy(x).requires_grad_(True)
    torch_loss = torchvision_sigmoid_focal_loss(xt, torch.from_numpy(y), gamma=gamma)
    (torch_grad,) = torch.autograd.grad(torch_loss.sum(), xt)
    assert np.isnan(torch_grad.numpy()).all() == (gamma < 1)  # the limit, where torch has nan


def test_defaults_are_torchvisions():
    loss = lf.get("sigmoid_focal_loss")
    assert dict(loss.options) == {"alpha": 0.25, "gamma": 2.0, "reduction": "none"}
    assert loss.plugin == "focal" and loss.backends == ("cpu", "cuda")


def test_conformance():
    # without a GPU, "cuda" runs under Numba's simulator (conftest.py); NUMBA_ENABLE_CUDASIM=0
    # and no GPU make the kit fail rather than skip it
    ran = check_loss("sigmoid_focal_loss")
    assert {"reference", "gradient", "hessian", "threads", "cuda"} <= set(ran)
