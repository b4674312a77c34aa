"""dice_loss and tversky_loss (no PyTorch function): a float64 NumPy reference written here,
gradients against torch autograd of the same expression and finite differences, tversky at
alpha = beta = 0.5 against dice, bad input and the CUDA simulator. Thread determinism:
the conformance kit (tests/test_conformance.py), for every option set."""

from __future__ import annotations

import numpy as np
import pytest
from support import assert_unchanged, finite_difference, layouts, needs_torch, snapshot

import lossforge as lf


def ref_overlap(x, t, alpha=None, beta=None, smooth=1e-5, sigmoid=False, batch=False):
    """Dice (alpha None) or Tversky, sample by sample (or the batch as one), in float64."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    q = 1 / (1 + np.exp(-x)) if sigmoid else x
    samples = [(q, t)] if batch else list(zip(q, t))
    out = []
    for qs, ts in samples:
        tp = float(np.sum(qs * ts))
        if alpha is None:
            out.append(1 - (2 * tp + smooth) / (np.sum(qs) + np.sum(ts) + smooth))
        else:
            fp, fn = float(np.sum(qs * (1 - ts))), float(np.sum((1 - qs) * ts))
            out.append(1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth))
    return np.array(out[0] if batch else out)


def _reduce(values, reduction):
    return {"none": values, "sum": np.sum(values), "mean": np.mean(values)}[reduction]


def _data(rng, shape, sigmoid=False, dtype=np.float64):
    x = rng.standard_normal(shape) if sigmoid else rng.uniform(0, 1, shape)
    t = (rng.uniform(0, 1, shape) > 0.6).astype(dtype)
    return x.astype(dtype), t


CASES = [
    ("dice_loss", {}),
    ("dice_loss", {"sigmoid": True, "smooth": 1.0}),
    ("dice_loss", {"batch": True}),
    ("tversky_loss", {"alpha": 0.3, "beta": 0.7}),
    ("tversky_loss", {"alpha": 0.9, "beta": 0.2, "sigmoid": True, "batch": True}),
    ("tversky_loss", {"smooth": 0.0}),
]


def _ref(name, x, t, **options):
    if name == "tversky_loss":
        options.setdefault("alpha", 0.5)
        options.setdefault("beta", 0.5)
    return ref_overlap(x, t, **options)


def _torch_grad(name, x, t, go, reduction, alpha=0.5, beta=0.5, smooth=1e-5, **options):
    """torch autograd of the same expression (the oracle of the gradient)."""
    import torch

    tx = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t)
    q = torch.sigmoid(tx) if options.get("sigmoid") else tx
    dims = None if options.get("batch") else tuple(range(1, tx.ndim))
    tp = (q * tt).sum(dims) if dims else (q * tt).sum()
    ps, ts = (q.sum(dims), tt.sum(dims)) if dims else (q.sum(), tt.sum())
    if name == "dice_loss":
        loss = 1 - (2 * tp + smooth) / (ps + ts + smooth)
    else:
        loss = 1 - (tp + smooth) / (tp + alpha * (ps - tp) + beta * (ts - tp) + smooth)
    value = {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]
    (g,) = torch.autograd.grad(value, tx, torch.as_tensor(go, dtype=value.dtype))
    return g.numpy()


@needs_torch
@pytest.mark.parametrize(("name", "options"), CASES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_value_and_gradient(name, options, reduction, rng):
    x, t = _data(rng, (4, 2, 3, 5), options.get("sigmoid", False))
    expected = _reduce(_ref(name, x, t, **options), reduction)
    go = rng.standard_normal(np.shape(expected)) if reduction == "none" else 0.7
    loss = lf.get(name)
    value, grad = loss.value_and_grad(x, t, reduction=reduction, grad_output=go, **options)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    assert np.shape(value) == np.shape(expected)
    np.testing.assert_allclose(
        grad, _torch_grad(name, x, t, go, reduction, **options), rtol=1e-10, atol=1e-15
    )


@pytest.mark.parametrize(("name", "options"), CASES, ids=str)
def test_finite_differences(name, options, rng):
    x, t = _data(rng, (3, 4), options.get("sigmoid", False))
    go = rng.standard_normal(() if options.get("batch") else 3)
    grad = lf.get(name).grad(x, t, reduction="none", grad_output=go, **options)
    numeric = finite_difference(lambda v: float(np.sum(go * _ref(name, v, t, **options))), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sigmoid", [False, True])
def test_tversky_at_one_half_is_dice(dtype, sigmoid, rng):
    x, t = _data(rng, (5, 40), sigmoid, dtype)
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    for smooth in (0.0, 1e-5, 1.0):  # tversky's smooth s is dice's 2 s
        dice, dice_grad = lf.dice_loss.value_and_grad(x, t, smooth=2 * smooth, sigmoid=sigmoid)
        tversky, tversky_grad = lf.tversky_loss.value_and_grad(
            x, t, alpha=0.5, beta=0.5, smooth=smooth, sigmoid=sigmoid
        )
        np.testing.assert_allclose(tversky, dice, rtol=rtol)
        np.testing.assert_allclose(tversky_grad, dice_grad, rtol=rtol, atol=rtol * 1e-3)


def test_float32_against_the_float64_reference(rng):
    x, t = _data(rng, (6, 1, 50), dtype=np.float32)
    value, grad = lf.dice_loss.value_and_grad(x, t, reduction="none", grad_output=np.ones(6))
    assert value.dtype == grad.dtype == np.float32
    np.testing.assert_allclose(value, ref_overlap(x, t), rtol=1e-6)
    wide = lf.dice_loss.grad(x.astype(np.float64), t.astype(np.float64), reduction="none")
    np.testing.assert_allclose(grad, wide, rtol=1e-5, atol=1e-7)


def test_empty_samples_and_batches():
    x = np.zeros((2, 3))
    np.testing.assert_array_equal(lf.dice_loss(x, x, reduction="none"), [0.0, 0.0])
    assert np.all(np.isnan(lf.dice_loss(x, x, smooth=0.0, reduction="none")))  # 0 / 0
    assert np.isnan(lf.dice_loss(np.zeros((0, 3)), np.zeros((0, 3))))
    assert lf.tversky_loss(np.zeros((0, 3)), np.zeros((0, 3)), reduction="sum") == 0
    assert lf.dice_loss(np.ones(4), np.ones(4), batch=True) == 0.0  # any shape with batch


def test_layouts_and_inputs_unchanged(rng):
    x, t = _data(rng, (3, 4))
    expected, expected_grad = lf.tversky_loss.value_and_grad(x, t, alpha=0.2, beta=0.6)
    for kind, xs in layouts(x).items():
        args = (xs, layouts(t)[kind])
        before = snapshot(*args)
        value, grad = lf.tversky_loss.value_and_grad(*args, alpha=0.2, beta=0.6)
        assert_unchanged(before, args)
        np.testing.assert_allclose(value, expected, rtol=1e-14)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-14)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: lf.dice_loss(x, x[:2]), ValueError, r"\(3, 4\).*\(2, 4\)"),
        (lambda x: lf.dice_loss(x[0], x[0]), ValueError, "batch"),
        (lambda x: lf.dice_loss(x, x, smooth=-1.0), ValueError, "smooth"),
        (lambda x: lf.tversky_loss(x, x, alpha=-0.1), ValueError, "alpha"),
        (lambda x: lf.tversky_loss(x, x, beta=np.nan), ValueError, "beta"),
        (lambda x: lf.dice_loss(x, x, reduction="avg"), ValueError, "reduction"),
        (lambda x: lf.dice_loss(x.astype(np.int64), x), TypeError, "int64"),
        (lambda x: lf.dice_loss(x, x.astype(bool)), TypeError, "bool"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(np.full((3, 4), 0.5))


@pytest.mark.parametrize(("name", "options"), CASES[1:5], ids=str)
def test_cuda_matches_the_cpu(name, options, rng):
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no GPU and no simulator")
    x, t = _data(rng, (3, 2, 4), options.get("sigmoid", False))
    go = rng.standard_normal(() if options.get("batch") else 3)
    loss = lf.get(name)
    value, grad = loss.value_and_grad(x, t, reduction="none", grad_output=go, **options)
    d_value, d_grad = loss.value_and_grad(
        cuda.to_device(x),
        cuda.to_device(t),
        reduction="none",
        grad_output=cuda.to_device(np.asarray(go)),
        **options,
    )
    np.testing.assert_allclose(d_value.copy_to_host(), value, rtol=1e-12)
    np.testing.assert_allclose(d_grad.copy_to_host(), grad, rtol=1e-12, atol=1e-15)
