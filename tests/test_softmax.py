"""The softmax losses built from row formulas (lossforge.kernels.Softmax): softmax_focal_loss,
poly1_cross_entropy and softmax_cross_entropy (z-loss, soft-capping), against PyTorch
(F.cross_entropy where a loss reduces to it, else the loss written in PyTorch and
differentiated by autograd), finite differences, thread counts, bad input and the CUDA
simulator."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda
from support import finite_difference, needs_torch, torch_samples

import lossforge as lf
from lossforge.runtime.cpu import threads

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None

LOSSES = ["softmax_cross_entropy", "softmax_focal_loss", "poly1_cross_entropy"]
#: each loss's parameters at which it is cross_entropy, and at a non-trivial value
NEUTRAL = {
    "softmax_cross_entropy": {"z_loss": 0.0},
    "softmax_focal_loss": {"gamma": 0.0},
    "poly1_cross_entropy": {"epsilon": 0.0},
}
PARAMS = {
    "softmax_cross_entropy": {"z_loss": 0.05, "softcap": 4.0},
    "softmax_focal_loss": {"gamma": 2.0},
    "poly1_cross_entropy": {"epsilon": 1.5},
}


def torch_loss(
    name,
    x,
    t,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    grad_output=None,
    **params,
):
    """The loss written in PyTorch from its papers' definitions (each row
    ``sum_c q_c w_c l(log p_c)`` over the smoothed target distribution ``q``), its gradient
    by autograd."""
    x = torch.from_numpy(np.array(x)).requires_grad_(True)
    z = x
    if params.get("softcap") is not None:
        z = params["softcap"] * torch.tanh(x / params["softcap"])
    axis = 1 if x.ndim > 1 else 0
    classes = x.shape[axis]
    lp = torch.log_softmax(z, axis)
    lse = torch.logsumexp(z, axis, keepdim=True)
    if name == "softmax_cross_entropy":
        per_class = -lp + params.get("z_loss", 0.0) * lse**2
    elif name == "softmax_focal_loss":
        per_class = -((1 - lp.exp()) ** params.get("gamma", 2.0)) * lp
    else:
        per_class = -lp + params.get("epsilon", 1.0) * (1 - lp.exp())
    shape = [1] * x.ndim
    shape[axis] = classes
    w = torch.ones(classes, dtype=x.dtype) if weight is None else torch.from_numpy(weight)
    t = np.asarray(t)
    if t.dtype.kind == "f":
        q = torch.from_numpy(t).to(x.dtype)
        keep = torch.ones(q.sum(axis).shape, dtype=torch.bool)
        denominator = torch.tensor(float(keep.numel()), dtype=x.dtype)
    else:
        tt = torch.from_numpy(t.astype(np.int64))
        keep = tt != ignore_index
        safe = torch.where(keep, tt, torch.zeros_like(tt))
        q = torch.movedim(F.one_hot(safe, classes).to(x.dtype), -1, axis)
        denominator = (w[safe] * keep).sum()
    q = (1 - label_smoothing) * q + label_smoothing / classes
    rows = (q * w.reshape(shape) * per_class).sum(axis) * keep
    value = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / denominator}[reduction]
    go = torch.ones_like(value)
    if grad_output is not None:
        go = torch.as_tensor(np.asarray(grad_output, x.detach().numpy().dtype))
    (grad,) = torch.autograd.grad(value, x, go)
    return value.detach().numpy(), grad.numpy()


def case(rng, shape, dtype=np.float64, ignored=True):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    classes = shape[1] if len(shape) > 1 else shape[0]
    t = rng.integers(0, classes, (shape[0], *shape[2:]) if len(shape) > 1 else ())
    if ignored and t.ndim and t.size > 1:
        t.reshape(-1)[1] = -100
    return x, t


def assert_close(actual, expected, dtype):
    rtol = 2e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-6 if rtol > 1e-6 else 1e-13)


# -- PyTorch -------------------------------------------------------------------------------
@needs_torch
def test_cross_entropy_opinfo_samples():
    """Over PyTorch's OpInfo samples of cross_entropy (K-dimensional inputs, probabilities,
    weights, ignore_index, smoothing, reductions): at its neutral parameter each loss is
    F.cross_entropy; at another it is the loss written in PyTorch."""
    count = 0
    for (x, t), options in torch_samples("cross_entropy"):
        t_x = torch.from_numpy(x).requires_grad_(True)
        t_value = F.cross_entropy(
            t_x,
            torch.from_numpy(t),
            **{
                k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                for k, v in options.items()
            },
        )
        (t_grad,) = torch.autograd.grad(t_value, t_x, torch.ones_like(t_value))
        for name in LOSSES:
            value, grad = lf.get(name).value_and_grad(x, t, **options, **NEUTRAL[name])
            assert_close(value, t_value.detach().numpy(), x.dtype)
            assert_close(grad, t_grad.numpy(), x.dtype)
            assert np.asarray(value).dtype == x.dtype
            value, grad = lf.get(name).value_and_grad(x, t, **options, **PARAMS[name])
            expected, expected_grad = torch_loss(name, x, t, **options, **PARAMS[name])
            assert_close(value, expected, x.dtype)
            assert_close(grad, expected_grad, x.dtype)
        count += 1
    assert count >= 20


CASES = [
    ((8, 5), {}),
    ((8, 5), {"label_smoothing": 0.3, "weight": True}),
    ((8, 5), {"weight": True, "ignore_index": 2}),
    ((4, 5, 3, 2), {"label_smoothing": 0.1, "weight": True}),
    ((5,), {"weight": True}),
    ((6, 300), {}),  # rows over 256 classes: the widened sum
    ((6, 300), {"probabilities": True, "weight": True, "label_smoothing": 0.2}),
]


@needs_torch
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(("shape", "options"), CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_torch(name, shape, options, reduction, dtype, rng):
    x, t = case(rng, shape, dtype)
    options = dict(options, reduction=reduction)
    if options.pop("probabilities", False):
        p = rng.random(shape)
        t = (p / p.sum(1, keepdims=True)).astype(dtype)
    if options.get("ignore_index") == 2:
        t[t == -100] = 2
    if options.get("weight"):
        options["weight"] = (rng.random(shape[1] if len(shape) > 1 else shape[0]) + 0.1).astype(
            dtype
        )
    value_shape = np.shape(lf.get(name)(x, t, **{**options, "reduction": "none"}))
    if reduction != "none":
        value_shape = ()
    go = rng.standard_normal(value_shape).astype(dtype) if value_shape else 0.7
    value, grad = lf.get(name).value_and_grad(x, t, grad_output=go, **options, **PARAMS[name])
    t_value, t_grad = torch_loss(name, x, t, grad_output=go, **options, **PARAMS[name])
    assert_close(value, t_value, dtype)
    assert_close(grad, t_grad, dtype)


@needs_torch
def test_z_loss_and_softcap_as_in_training_code(rng):
    """PaLM's z-loss and Gemma 2's soft-capping as training code writes them, on top of
    F.cross_entropy."""
    x, t = case(rng, (16, 50), ignored=False)
    z_loss, cap = 1e-2, 3.0
    tx = torch.from_numpy(x).requires_grad_(True)
    capped = cap * torch.tanh(tx / cap)
    expected = (
        F.cross_entropy(capped, torch.from_numpy(t))
        + z_loss * (torch.logsumexp(capped, -1) ** 2).mean()
    )
    (t_grad,) = torch.autograd.grad(expected, tx)
    value, grad = lf.softmax_cross_entropy.value_and_grad(x, t, z_loss=z_loss, softcap=cap)
    np.testing.assert_allclose(value, expected.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, t_grad.numpy(), rtol=1e-10, atol=1e-15)


@needs_torch
def test_poly1_as_in_the_paper(rng):
    """Leng et al.'s Poly-1: CE + epsilon (1 - pt), pt = sum(labels * softmax), with smoothed
    labels."""
    x, t = case(rng, (12, 7), ignored=False)
    labels = F.one_hot(torch.from_numpy(t), 7).double() * 0.9 + 0.1 / 7
    tx = torch.from_numpy(x)
    pt = (labels * tx.softmax(-1)).sum(-1)
    expected = F.cross_entropy(tx, torch.from_numpy(t), label_smoothing=0.1, reduction="none")
    expected = expected + 2.0 * (1 - pt)
    value = lf.poly1_cross_entropy(x, t, epsilon=2.0, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(value, expected.numpy(), rtol=1e-12)


def test_focal_against_a_numpy_reference(rng):
    """-w_t (1 - p_t)^gamma log p_t, mean over the summed weights of the counted targets."""
    x, t = case(rng, (9, 6))
    w = rng.random(6) + 0.5
    z = x - x.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    keep = t != -100
    lp_t = logp[np.arange(9), np.where(keep, t, 0)]
    w_t = w[np.where(keep, t, 0)]
    rows = np.where(keep, -w_t * (1 - np.exp(lp_t)) ** 1.5 * lp_t, 0.0)
    value = lf.softmax_focal_loss(x, t, gamma=1.5, weight=w)
    np.testing.assert_allclose(value, rows.sum() / w_t[keep].sum(), rtol=1e-12)


# -- finite differences, threads -----------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("probabilities", [False, True])
def test_finite_differences(name, probabilities, rng):
    x, t = case(rng, (4, 6), ignored=not probabilities)
    x = x / 3
    if probabilities:
        p = rng.random((4, 6))
        t = p / p.sum(1, keepdims=True)
    options = {"weight": rng.random(6) + 0.5, "label_smoothing": 0.1, **PARAMS[name]}
    grad = lf.get(name).grad(x, t, **options)
    numeric = finite_difference(lambda v: float(lf.get(name)(v, t, **options)), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["softmax_focal_loss"])  # one kernel for the three
def test_bitwise_identical_for_any_thread_count(name, rng):
    # 70000 logits: parallel, five chunks (float64: the conformance kit's kernel too)
    x, t = case(rng, (700, 100))
    with threads(1):
        v1, g1 = lf.get(name).value_and_grad(x, t, **PARAMS[name])
    with threads(2):
        v2, g2 = lf.get(name).value_and_grad(x, t, **PARAMS[name])
    assert v1.tobytes() == v2.tobytes() and g1.tobytes() == g2.tobytes()


def test_extreme_logits_stay_finite(rng):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4 + 1]])
    t = np.array([1, 2])
    for name in LOSSES:
        value, grad = lf.get(name).value_and_grad(x, t, **NEUTRAL[name])
        # row 0: the target's log p is -2e4; row 1's: -log(1 + 2 / e)
        np.testing.assert_allclose(value, (2e4 + np.log1p(2 / np.e)) / 2, rtol=1e-12)
        p1 = np.array([1, 1, np.e]) / (2 + np.e)
        expected = np.array([[1.0, -1.0, 0.0], p1 - [0, 0, 1]]) / 2
        np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-300)


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "error", "match"),
    [
        ("softmax_focal_loss", {"gamma": -1.0}, ValueError, "gamma"),
        ("poly1_cross_entropy", {"epsilon": -1.5}, ValueError, "epsilon"),
        ("softmax_cross_entropy", {"softcap": 0.0}, ValueError, "softcap"),
        ("softmax_cross_entropy", {"z_loss": -1.0}, ValueError, "z_loss"),
        ("softmax_cross_entropy", {"softcap": "30"}, TypeError, "softcap"),
        ("softmax_focal_loss", {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ("poly1_cross_entropy", {"reduction": "avg"}, ValueError, "reduction"),
        ("softmax_focal_loss", {"weight": np.ones(3)}, ValueError, "weight"),
    ],
)
def test_bad_options(name, options, error, match, rng):
    x, t = case(rng, (4, 5))
    with pytest.raises(error, match=match):
        lf.get(name)(x, t, **options)


@pytest.mark.parametrize("name", LOSSES)
def test_bad_targets(name, rng):
    x, t = case(rng, (4, 5))
    t[2] = 5
    with pytest.raises(IndexError, match="5"):
        lf.get(name)(x, t)
    with pytest.raises(TypeError, match="dtype"):
        lf.get(name)(x.astype(np.int64), t)
    with pytest.raises(ValueError, match="shape"):
        lf.get(name)(x, t[:3])


def test_inputs_unchanged(rng):
    x, t = case(rng, (4, 5))
    before = x.copy(), t.copy()
    lf.softmax_cross_entropy.value_and_grad(x, t, softcap=2.0, z_loss=0.1)
    lf.softmax_cross_entropy.grad_hess(x, t, softcap=2.0, z_loss=0.1)
    assert np.array_equal(x, before[0]) and np.array_equal(t, before[1])


# -- CUDA (the simulator without a GPU) ------------------------------------------------------
@pytest.mark.skipif(not cuda.is_available(), reason="no CUDA simulator or GPU")
@pytest.mark.parametrize(
    ("name", "shape", "options"),
    [
        *[(name, (5, 11), {}) for name in LOSSES],
        # the three losses share one kernel (formulas.py): the options with one of them
        ("softmax_cross_entropy", (5, 11), {"weight": True, "label_smoothing": 0.1}),
        ("softmax_focal_loss", (3, 40), {"weight": True}),  # rows longer than a block
        ("softmax_cross_entropy", (3, 4, 2), {"probabilities": True, "label_smoothing": 0.2}),
        ("poly1_cross_entropy", (3, 4, 2), {"ignore_index": 1, "reduction": "none"}),
    ],
)
def test_cuda_matches_cpu(name, shape, options, rng):
    x, t = case(rng, shape)
    if options.get("ignore_index") == 1:
        t[t == -100] = 1
    options = dict(options, **PARAMS[name])
    if options.pop("probabilities", False):
        p = rng.random(shape)
        t = p / p.sum(1, keepdims=True)
    if options.get("weight"):
        options["weight"] = rng.random(shape[1]) + 0.5
    reduction = options.get("reduction", "mean")
    go = 0.5
    if reduction == "none":
        go = rng.standard_normal(np.shape(lf.get(name)(x, t, **options)))
    dev = {k: cuda.to_device(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    d_go = cuda.to_device(go) if isinstance(go, np.ndarray) else go
    value, grad = lf.get(name).value_and_grad(
        cuda.to_device(x), cuda.to_device(t), grad_output=d_go, **dev
    )
    expected, expected_grad = lf.get(name).value_and_grad(x, t, grad_output=go, **options)
    value = value.copy_to_host() if hasattr(value, "copy_to_host") else value
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad.copy_to_host(), expected_grad, rtol=1e-12, atol=1e-14)
