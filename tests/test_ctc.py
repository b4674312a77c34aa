"""ctc_loss: PyTorch 2.13 as the oracle (its OpInfo samples, every option and target layout),
a brute-force reference over every alignment, finite differences through log_softmax,
partial pairs, thread determinism, bad input, and the CUDA kernel under the simulator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from support import needs_torch, torch_samples, torch_value_and_grad

import lossforge as lf
from lossforge.runtime.cpu import threads

ctc = lf.get("ctc_loss")


def log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def case(rng, steps=9, batch=4, classes=5, width=3, dtype=np.float64, feasible=True):
    """(log_probs (T, N, C), padded targets (N, S), input_lengths, target_lengths) with ids
    in [1, C); some targets empty, some repeated ids, input lengths below T."""
    lp = log_softmax(rng.standard_normal((steps, batch, classes)) * 2).astype(dtype)
    tl = rng.integers(0, width + 1, batch)
    targets = rng.integers(1, classes, (batch, width))
    targets[:, 1] = np.where(rng.random(batch) < 0.5, targets[:, 0], targets[:, 1])
    low = 2 * tl + 1 if feasible else np.zeros(batch, np.int64)
    il = rng.integers(np.minimum(low, steps), steps + 1)
    return lp, targets, il, tl


def concatenated(targets, tl):
    return targets[np.arange(targets.shape[1]) < tl[:, None]]


def brute_force(lp, labels, steps, blank):
    """-log of the summed probability of every alignment of ``steps`` frames that collapses
    (repeats merged, then blanks removed) to ``labels``."""
    classes = lp.shape[-1]
    total = 0.0
    for path in itertools.product(range(classes), repeat=steps):
        merged = [k for i, k in enumerate(path) if i == 0 or k != path[i - 1]]
        if [k for k in merged if k != blank] == list(labels):
            total += np.exp(sum(lp[t, k] for t, k in enumerate(path)))
    return -np.log(total) if total > 0 else np.inf


def test_against_every_alignment(rng):
    steps, classes = 5, 3
    lp = log_softmax(rng.standard_normal((steps, 6, classes)))
    targets = np.array([[1, 2, 0], [1, 1, 0], [2, 0, 0], [1, 2, 1], [1, 1, 1], [0, 0, 0]])
    tl = np.array([2, 2, 1, 3, 3, 0])
    il = np.array([5, 4, 3, 5, 4, 2])  # [1, 1, 1] in 4 frames is infeasible: inf
    for blank in (0, 2):
        t = np.where(targets == blank, 2 - blank, targets) if blank else targets
        expected = [brute_force(lp[: il[n], n], t[n, : tl[n]], il[n], blank) for n in range(6)]
        assert np.isinf(expected[4])
        value = ctc(lp, t, il, tl, blank=blank, reduction="none")
        np.testing.assert_allclose(value, expected, rtol=1e-12)


@needs_torch
def test_torch_sample_inputs():
    count = 0
    for arrays, options in torch_samples("ctc_loss", n_arrays=4):
        value, grad = ctc.value_and_grad(*arrays, **options)
        t_value, (t_grad,) = torch_value_and_grad("ctc_loss", arrays, **options)
        if arrays[0].dtype == np.float32:
            # PyTorch's float32 recursions lose ~1e-4 over 50 frames, ours run in float64:
            # close to PyTorch's float32, and to float32 rounding of its float64 result
            np.testing.assert_allclose(grad, t_grad, rtol=1e-3, atol=2e-4)
            wide = (arrays[0].astype(np.float64), *arrays[1:])
            t_value, (t_grad,) = torch_value_and_grad("ctc_loss", wide, **options)
        np.testing.assert_allclose(value, t_value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, t_grad, rtol=1e-5, atol=1e-6)
        if arrays[0].dtype == np.float64:
            np.testing.assert_allclose(value, t_value, rtol=1e-12)
            # (exp(log_probs) minus the posterior: cancellation near 1 makes an absolute error)
            np.testing.assert_allclose(grad, t_grad, rtol=1e-12, atol=1e-13)
        assert np.asarray(value).dtype == arrays[0].dtype
        count += 1
    assert count == 24


@needs_torch
@pytest.mark.parametrize("layout", ["padded", "concatenated", "unbatched"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_options(layout, reduction, zero_infinity, dtype, rng):
    lp, targets, il, tl = case(rng, dtype=dtype, batch=6, feasible=False)
    tl[:2] = 3  # an infeasible sample (few frames) and an empty target among them
    il[:2] = (2, 7)
    tl[2] = 0
    if layout == "concatenated":
        targets = concatenated(targets, tl)
    elif layout == "unbatched":
        lp, targets, il, tl = lp[:, 0], targets[0], il[0], tl[0]
    blank = 0 if dtype == np.float32 else lp.shape[-1] - 1
    if blank:
        targets = targets - 1  # ids in [0, C - 1)
    options = {"blank": blank, "reduction": reduction, "zero_infinity": zero_infinity}
    shape = np.shape(ctc(lp, targets, il, tl, **options))
    go = rng.standard_normal(shape) if shape else 0.7
    value, grad = ctc.value_and_grad(lp, targets, il, tl, grad_output=go, **options)
    t_value, (t_grad,) = torch_value_and_grad(
        "ctc_loss", (lp, targets, il, tl), grad_output=go, **options
    )
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=1e-6, equal_nan=True)
    assert np.asarray(value).dtype == dtype and grad.dtype == dtype and grad.shape == lp.shape
    if layout != "unbatched" and not zero_infinity:
        assert np.isnan(grad[:2, 0]).all()  # the infeasible sample's frames, as PyTorch


@needs_torch
@pytest.mark.parametrize("length", [0, 1])
def test_samples_without_frames_like_torch(length, rng):
    lp, targets, il, tl = case(rng)
    il[1], tl[1] = 0, length
    value, grad = ctc.value_and_grad(lp, targets, il, tl, reduction="none")
    t_value, (t_grad,) = torch_value_and_grad("ctc_loss", (lp, targets, il, tl), reduction="none")
    np.testing.assert_allclose(value, t_value, rtol=1e-12)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-12, atol=1e-15)
    assert value[1] == (np.inf if length else 0.0)


def test_gradient_is_the_derivative_through_log_softmax(rng):
    """PyTorch's gradient with respect to log_probs equals the derivative of the loss with
    respect to the logits that log_softmax turned into them: checked by central differences
    over the logits."""
    z = rng.standard_normal((7, 3, 4))
    _, targets, il, tl = case(rng, steps=7, batch=3, classes=4, width=2)
    go = rng.standard_normal(3)
    grad = ctc.grad(log_softmax(z), targets, il, tl, reduction="none", grad_output=go)
    eps = 1e-6
    numeric = np.empty_like(z)
    for index in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[index] += eps
        down[index] -= eps
        values = [ctc(log_softmax(v), targets, il, tl, reduction="none") @ go for v in (up, down)]
        numeric[index] = (values[0] - values[1]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_mean_and_partial_pairs(rng):
    lp, targets, il, tl = case(rng, batch=8)
    tl[0] = 0  # divided by 1, not 0
    losses = ctc(lp, targets, il, tl, reduction="none")
    mean = ctc(lp, targets, il, tl)
    np.testing.assert_allclose(mean, np.mean(losses / np.maximum(tl, 1)), rtol=1e-14)
    assert ctc(lp, targets, il, tl, reduction="sum") == pytest.approx(losses.sum(), rel=1e-14)
    # two chunks of the batch combine into the mean
    pairs = [
        ctc.partial(lp[:, part], targets[part], il[part], tl[part])
        for part in (slice(0, 3), slice(3, 8))
    ]
    total, denominator = map(sum, zip(*pairs))
    assert denominator == 8
    np.testing.assert_allclose(total / denominator, mean, rtol=1e-14)


def test_unbatched_is_one_sample(rng):
    lp, targets, il, tl = case(rng, batch=1)
    value, grad = ctc.value_and_grad(lp, targets, il, tl, reduction="sum")
    for lengths in ((il[0], tl[0]), (int(il[0]), int(tl[0])), (il, tl), ([il[0]], (tl[0],))):
        u_value, u_grad = ctc.value_and_grad(lp[:, 0], targets[0], *lengths, reduction="sum")
        assert u_value == value
        np.testing.assert_array_equal(u_grad, grad[:, 0])
    assert ctc(lp[:, 0], targets[0], il[0], tl[0], reduction="none").shape == ()


def test_layouts_dtypes_and_unchanged_inputs(rng):
    lp, targets, il, tl = case(rng)
    value, grad = ctc.value_and_grad(lp, targets, il, tl)
    awkward = np.asfortranarray(lp)  # and targets of another integer dtype, lengths as lists
    arrays = (awkward, targets.astype(np.uint8), list(il), tuple(tl))
    before = [np.array(a, copy=True) for a in arrays]
    v, g = ctc.value_and_grad(*arrays)
    assert v == value
    np.testing.assert_array_equal(g, grad)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)
    v16, g16 = ctc.value_and_grad(lp.astype(np.float16), targets, il, tl)
    assert v16.dtype == np.float16 and g16.dtype == np.float16
    np.testing.assert_allclose(v16, value, rtol=1e-3)


def test_padding_is_not_read(rng):
    lp, targets, il, tl = case(rng)
    padded = targets.copy()
    padded[np.arange(targets.shape[1]) >= tl[:, None]] = -1  # never checked or read
    np.testing.assert_array_equal(
        ctc(lp, padded, il, tl, reduction="none"), ctc(lp, targets, il, tl, reduction="none")
    )


def test_bitwise_identical_for_any_thread_count(rng):
    lp, targets, il, tl = case(rng, steps=30, batch=300, classes=8, width=6)
    results = []
    for n in (1, 2):
        with threads(n):
            value, grad = ctc.value_and_grad(lp, targets, il, tl, reduction="sum")
        results.append((value.tobytes(), grad.tobytes()))
    assert results[0] == results[1]


def test_no_hessian(rng):
    with pytest.raises(NotImplementedError):
        ctc.grad_hess(*case(rng))


BAD = [
    # (what to change, error, words the message must hold)
    (lambda a: (a[0], np.where(a[1] == 2, 5, a[1]), *a[2:]), IndexError, "target 5"),
    (lambda a: (a[0], np.where(a[1] == 2, -3, a[1]), *a[2:]), IndexError, "target -3"),
    (lambda a: (*a[:2], a[2] + 20, a[3]), ValueError, "input_lengths"),
    (lambda a: (*a[:2], -a[2], a[3]), ValueError, "input_lengths"),
    (lambda a: (*a[:3], a[3] - 5), ValueError, "target_lengths"),
    (lambda a: (*a[:3], a[3] + 4), ValueError, "target_lengths"),
    (lambda a: (*a[:2], a[2][:3], a[3]), ValueError, "input_lengths"),
    (lambda a: (a[0], a[1][:3], *a[2:]), ValueError, "targets"),
    (lambda a: (a[0], concatenated(a[1], a[3])[1:], *a[2:]), ValueError, "sum(target_lengths)"),
    (lambda a: (a[0][0], *a[1:]), ValueError, "log_probs"),
    (lambda a: (a[0].astype(np.int64), *a[1:]), TypeError, "int64"),
    (lambda a: (a[0], a[1].astype(np.float32), *a[2:]), TypeError, "float32"),
    (lambda a: (*a[:2], a[2].astype(np.float64), a[3]), TypeError, "float64"),
]


@pytest.mark.parametrize(("change", "error", "words"), BAD)
def test_bad_input(change, error, words, rng):
    lp, targets, il, tl = case(rng)
    tl[:] = 3  # every id is read
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        ctc(*change((lp, targets, il, tl)))


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"blank": 5}, ValueError, "blank"),
        ({"blank": -1}, ValueError, "blank"),
        ({"blank": 1.0}, TypeError, "blank"),
        ({"zero_infinity": 1}, TypeError, "zero_infinity"),
        ({"reduction": "batchmean"}, ValueError, "reduction"),
    ],
)
def test_bad_options(options, error, words, rng):
    with pytest.raises(error, match=words):
        ctc(*case(rng), **options)


# -- CUDA (the simulator without a GPU: tests/conftest.py) -------------------------------------
@pytest.mark.parametrize("layout", ["padded", "concatenated", "unbatched"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_matches_the_cpu(layout, reduction, rng):
    from numba import cuda

    lp, targets, il, tl = case(rng, steps=6, batch=3, classes=4, width=2, feasible=False)
    if layout == "concatenated":
        targets = concatenated(targets, tl)
    elif layout == "unbatched":
        lp, targets, il, tl = lp[:, 1], targets[1], il[1:2], tl[1:2]
    options = {"reduction": reduction, "zero_infinity": layout == "padded", "blank": 1}
    targets = np.where(targets == 1, 0, targets)
    go = rng.standard_normal(np.shape(ctc(lp, targets, il, tl, **options))) + 1.0
    value, grad = ctc.value_and_grad(lp, targets, il, tl, grad_output=go, **options)
    device = [cuda.to_device(np.ascontiguousarray(a)) for a in (lp, targets, il, tl)]
    device.append(cuda.to_device(np.asarray(go)))
    d_value, d_grad = ctc.value_and_grad(*device[:4], grad_output=device[4], **options)
    host = d_value.copy_to_host() if hasattr(d_value, "copy_to_host") else d_value
    np.testing.assert_allclose(host, value, rtol=1e-13)
    np.testing.assert_allclose(d_grad.copy_to_host(), grad, rtol=1e-13, equal_nan=True)
    with pytest.raises(IndexError, match="target 7"):
        ctc(device[0], cuda.to_device(np.full_like(targets, 7)), *device[2:4])
