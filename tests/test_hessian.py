"""``grad_hess`` / ``value_grad_hess`` of the element-wise losses: the Hessian diagonal
against PyTorch's ``torch.autograd.functional.hessian``, the documented curvature of linear
pieces against a NumPy reference, ``out=``, dtypes, threads, and losses without a Hessian.
The conformance kit (tests/test_conformance.py) checks every loss with a Hessian against
finite differences of its gradient, per option set, and on CUDA under the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import F, needs_torch, torch

import lossforge as lf
from lossforge.runtime.cpu import threads
from lossforge.testing import THREADS_SIZE


def _inputs(name, rng, shape, options):
    """Inputs where the Hessian is the second derivative (inside the quadratic zones)."""
    x = rng.standard_normal(shape)
    if name in ("mse_loss", "smooth_l1_loss", "huber_loss"):
        zone = options.get("beta", options.get("delta", 1.0))
        return x, x + rng.uniform(-0.9, 0.9, shape) * zone
    if name == "poisson_nll_loss":
        y = rng.poisson(2.0, shape).astype(np.float64)
        return (np.exp(x) if options.get("log_input") is False else x), y
    if name == "binary_cross_entropy":
        return rng.uniform(0.02, 0.98, shape), rng.uniform(0, 1, shape)
    if name == "soft_margin_loss":
        return 2 * x, rng.choice([-1.0, 1.0], shape)
    return 2 * x, rng.uniform(0, 1, shape)  # logits, soft targets


CASES = [
    ("mse_loss", {}),
    ("mse_loss", {"weight": "full"}),
    ("smooth_l1_loss", {"beta": 0.5}),
    ("huber_loss", {"delta": 0.7, "weight": "full"}),
    ("poisson_nll_loss", {}),
    ("poisson_nll_loss", {"log_input": False, "full": True, "eps": 0.1}),
    ("binary_cross_entropy", {}),
    ("binary_cross_entropy", {"weight": "row"}),
    ("binary_cross_entropy_with_logits", {"pos_weight": "row", "weight": "full"}),
    ("soft_margin_loss", {}),
    ("multilabel_soft_margin_loss", {"weight": "row"}),
]


def _weights(options, rng, shape):
    """``"full"``: a weight of the input's shape; ``"row"``: one per class (last axis)."""
    sizes = {"full": shape, "row": shape[-1:]}
    return {k: (rng.uniform(0.2, 2.0, sizes[v]) if v in sizes else v) for k, v in options.items()}


def _torch_hessian_diagonal(name, x, y, options):
    """The diagonal of PyTorch's full Hessian of the reduced loss with respect to ``x``."""
    opts = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    target = torch.from_numpy(y)

    def f(t):
        return getattr(F, name)(t, target, **opts)

    full = torch.autograd.functional.hessian(f, torch.from_numpy(x))
    return full.reshape(x.size, x.size).diagonal().reshape(x.shape).numpy()


@needs_torch
@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hessian_diagonal_matches_torch(name, options, reduction, rng):
    shape = (3, 4)
    x, y = _inputs(name, rng, shape, options)
    options = {**_weights(options, rng, shape), "reduction": reduction}
    grad, hess = lf.get(name).grad_hess(x, y, **options)
    np.testing.assert_allclose(hess, _torch_hessian_diagonal(name, x, y, options), rtol=1e-10)
    np.testing.assert_array_equal(grad, lf.get(name).grad(x, y, **options))


@pytest.mark.parametrize(
    ("name", "options", "curvature"),
    [
        ("l1_loss", {}, 1.0),
        ("huber_loss", {"delta": 0.3}, 1.0),
        ("smooth_l1_loss", {"beta": 0.25}, 4.0),
        ("smooth_l1_loss", {"beta": 0.0}, 1.0),
    ],
)
def test_linear_pieces_get_the_quadratic_piece_curvature(name, options, curvature, rng):
    """Where the loss is linear (second derivative 0) the Hessian is the curvature of its
    quadratic piece, as XGBoost's and LightGBM's own objectives for these losses give."""
    x = rng.standard_normal(200)
    y = x + rng.choice([-3.0, 3.0], 200) * rng.uniform(1, 2, 200)  # all on linear pieces
    w = rng.uniform(0.5, 2.0, 200)
    if name != "smooth_l1_loss":
        options = {**options, "weight": w}
    _, hess = lf.get(name).grad_hess(x, y, reduction="sum", **options)
    expected = curvature * (w if "weight" in options else np.ones(200))
    np.testing.assert_array_equal(hess, expected)


@given(
    x=st.lists(st.floats(-800, 800), min_size=1, max_size=40),
    seed=st.integers(0, 2**32 - 1),
    pos_weight=st.floats(0.0, 10.0),
)
def test_logits_hessian_is_stable_everywhere(x, seed, pos_weight):
    """``((1 - y) + a y) sigmoid(x) sigmoid(-x)`` in float64, independently written with
    ``logaddexp`` (no overflow for |x| up to 800)."""
    x = np.array(x)
    y = np.random.default_rng(seed).uniform(0, 1, x.size)
    a = np.full(x.size, pos_weight)
    _, hess = lf.binary_cross_entropy_with_logits.grad_hess(x, y, pos_weight=a, reduction="sum")
    log_s, log_1s = -np.logaddexp(0, -x), -np.logaddexp(0, x)
    expected = ((1 - y) + a * y) * np.exp(log_s + log_1s)
    np.testing.assert_allclose(hess, expected, rtol=1e-12, atol=1e-300)
    assert np.all(np.isfinite(hess)) and np.all(hess >= 0)


def test_value_grad_hess_is_one_pass_of_everything(rng):
    x, y = rng.standard_normal((5, 6)), rng.uniform(0, 1, (5, 6))
    loss = lf.binary_cross_entropy_with_logits
    value, grad, hess = loss.value_grad_hess(x, y, reduction="none")
    np.testing.assert_array_equal(value, loss(x, y, reduction="none"))
    np.testing.assert_array_equal(grad, loss.grad(x, y, reduction="none"))
    g2, h2 = loss.grad_hess(x, y, reduction="none")
    np.testing.assert_array_equal(g2, grad)
    np.testing.assert_array_equal(h2, hess)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_out_and_dtypes(dtype, rng):
    x, y = rng.standard_normal(50).astype(dtype), rng.standard_normal(50).astype(dtype)
    g, h = np.empty(50, dtype), np.empty(50, dtype)
    grad, hess = lf.mse_loss.grad_hess(x, y, out=(g, h))
    assert grad is g and hess is h
    np.testing.assert_allclose(g, 2 * (x.astype(np.float64) - y) / 50, rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(h, np.full(50, 2 / 50, dtype))
    assert lf.mse_loss.grad_hess(x, y)[1].dtype == dtype


def test_bad_out(rng):
    x, y = rng.standard_normal(8), rng.standard_normal(8)
    g = np.empty(8)
    with pytest.raises(ValueError, match="out must be a tuple of 2 arrays"):
        lf.mse_loss.grad_hess(x, y, out=g)
    with pytest.raises(ValueError, match="one array given for two outputs"):
        lf.mse_loss.grad_hess(x, y, out=(g, g))
    with pytest.raises(ValueError, match=r"out \(the Hessian diagonal of input\) overlaps input"):
        lf.mse_loss.grad_hess(x, y, out=(g, x))
    with pytest.raises(ValueError, match=r"out \(the Hessian diagonal of input\) must have shape"):
        lf.mse_loss.grad_hess(x, y, out=(g, np.empty(7)))
    with pytest.raises(TypeError, match=r"out \(the gradient of input\) must have dtype"):
        lf.mse_loss.grad_hess(x, y, out=(np.empty(8, np.float32), np.empty(8)))


@pytest.mark.parametrize("name", ["hinge_embedding_loss", "cosine_embedding_loss", "nll_loss"])
def test_a_loss_without_a_hessian_says_so(name, rng):
    loss = lf.get(name)
    with pytest.raises(NotImplementedError, match=f"loss '{name}' has no Hessian on cpu"):
        loss.grad_hess(*[np.ones((2, 3)) for _ in loss.arguments])


@pytest.mark.parametrize("name", ["mse_loss", "binary_cross_entropy_with_logits"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_for_any_thread_count(name, dtype, rng):
    x = rng.standard_normal(THREADS_SIZE).astype(dtype)
    y = rng.uniform(0, 1, THREADS_SIZE).astype(dtype)
    results = []
    for n in (1, 2):
        with threads(n):
            results.append(lf.get(name).value_grad_hess(x, y, reduction="sum"))
    for a, b in zip(*results):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
