"""cross_entropy and nll_loss against float64 NumPy references, PyTorch, finite differences."""

from __future__ import annotations

import lossforge.plugins.multiclass as multiclass
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lossforge.plugins.multiclass import cpu as multiclass_cpu
from support import (
    assert_fast_path_is_general_path,
    assert_unchanged,
    finite_difference,
    needs_torch,
    snapshot,
    torch_samples,
    torch_value_and_grad,
)

import lossforge as lf
from lossforge.runtime.cpu import threads


# -- independent float64 references --------------------------------------------------------
def log_softmax(x, axis):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def ref_cross_entropy(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Per PyTorch's definition, by explicit loops over samples (no vectorised shortcuts)."""
    x = np.asarray(x, np.float64)
    unbatched = x.ndim == 1
    if unbatched:
        x, t = x[None], np.asarray(t)[None]
    classes = x.shape[1]
    rows = np.moveaxis(x, 1, -1).reshape(-1, classes)
    w = np.ones(classes) if weight is None else np.asarray(weight, np.float64)
    e = label_smoothing
    losses, denominator = [], 0.0
    if np.asarray(t).dtype.kind == "f":
        targets = np.moveaxis(np.asarray(t, np.float64), 1, -1).reshape(-1, classes)
        for z, y in zip(rows, targets):
            lp = log_softmax(z, 0)
            y = (1 - e) * y + e / classes
            losses.append(-sum(w[c] * y[c] * lp[c] for c in range(classes)))
        denominator = len(rows)
    else:
        for z, k in zip(rows, np.asarray(t).reshape(-1)):
            if k == ignore_index:
                losses.append(0.0)
                continue
            lp = log_softmax(z, 0)
            nll = -w[k] * lp[k]
            smooth = -sum(w[c] * lp[c] for c in range(classes))
            losses.append((1 - e) * nll + e / classes * smooth)
            denominator += w[k]
    losses = np.array(losses)
    if reduction == "none":
        return losses.reshape(() if unbatched else (x.shape[0], *x.shape[2:]))
    total = losses.sum()
    return total if reduction == "sum" else total / denominator


def ref_nll(x, t, weight=None, ignore_index=-100, reduction="mean"):
    x = np.asarray(x, np.float64)
    unbatched = x.ndim == 1
    if unbatched:
        x, t = x[None], np.asarray(t)[None]
    classes = x.shape[1]
    rows = np.moveaxis(x, 1, -1).reshape(-1, classes)
    w = np.ones(classes) if weight is None else np.asarray(weight, np.float64)
    losses, denominator = [], 0.0
    for z, k in zip(rows, np.asarray(t).reshape(-1)):
        if k == ignore_index:
            losses.append(0.0)
        else:
            losses.append(-w[k] * z[k])
            denominator += w[k]
    losses = np.array(losses)
    if reduction == "none":
        return losses.reshape(() if unbatched else np.asarray(t).shape)
    return losses.sum() if reduction == "sum" else losses.sum() / denominator


REFS = {"cross_entropy": ref_cross_entropy, "nll_loss": ref_nll}


def case(rng, shape, classes_dim=1, dtype=np.float64, ignore=True):
    x = rng.standard_normal(shape).astype(dtype)
    classes = shape[classes_dim] if len(shape) > 1 else shape[0]
    tshape = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    t = rng.integers(0, classes, tshape)
    if ignore and t.ndim and t.size > 1:
        t.reshape(-1)[1] = -100
    return x, t


SHAPES = [(5,), (6, 4), (3, 5, 2), (2, 3, 2, 2)]


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_against_reference(name, shape, reduction, weighted, rng):
    x, t = case(rng, shape)
    classes = shape[1] if len(shape) > 1 else shape[0]
    options = {"reduction": reduction}
    if weighted:
        options["weight"] = rng.random(classes) + 0.1
    if name == "cross_entropy":
        options["label_smoothing"] = 0.2
    value = lf.get(name)(x, t, **options)
    np.testing.assert_allclose(value, REFS[name](x, t, **options), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 2, 2), (4,), (3, 300)])  # (3, 300): long rows
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets_against_reference(shape, weighted, rng):
    x = rng.standard_normal(shape)
    y = rng.random(shape)
    y /= y.sum(axis=1 if len(shape) > 1 else 0, keepdims=True)
    classes = shape[1] if len(shape) > 1 else shape[0]
    options = {"label_smoothing": 0.15}
    if weighted:
        options["weight"] = rng.random(classes) + 0.1
    for reduction in ["mean", "sum", "none"]:
        value = lf.cross_entropy(x, y, reduction=reduction, **options)
        expected = ref_cross_entropy(x, y, reduction=reduction, **options)
        np.testing.assert_allclose(value, expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2), (3,)])
def test_finite_differences(name, shape, rng):
    x, t = case(rng, shape)
    w = rng.random(shape[1] if len(shape) > 1 else shape[0]) + 0.1
    options = {"weight": w}
    if name == "cross_entropy":
        options["label_smoothing"] = 0.1
    grad = lf.get(name).grad(x, t, **options)
    numeric = finite_difference(lambda v: float(REFS[name](v, t, **options)), x)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_probability_targets_finite_differences(rng):
    x = rng.standard_normal((3, 4))
    y = rng.random((3, 4))
    grad = lf.cross_entropy.grad(x, y, weight=np.arange(1.0, 5.0), label_smoothing=0.3)
    numeric = finite_difference(
        lambda v: float(ref_cross_entropy(v, y, weight=np.arange(1.0, 5.0), label_smoothing=0.3)), x
    )
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


# -- PyTorch ---------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_torch_sample_inputs(name):
    count = 0
    for (x, t), options in torch_samples(name):
        value, grad = lf.get(name).value_and_grad(x, t, **options)
        t_value, (t_grad,) = torch_value_and_grad(name, (x, t), **options)
        rtol = 1e-5 if x.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=1e-6)
        assert np.asarray(value).dtype == x.dtype
        count += 1
    assert count >= 20


TORCH_CASES = [
    ((8, 5), {}),
    ((8, 5), {"label_smoothing": 0.3}),
    ((8, 5), {"label_smoothing": 0.3, "weight": True}),
    ((8, 5), {"label_smoothing": 0.3, "weight": True, "ignore_index": 2}),
    ((4, 5, 3, 2), {"label_smoothing": 0.1, "weight": True}),
    ((5,), {"label_smoothing": 0.2, "weight": True}),
    ((64, 1000), {"label_smoothing": 0.05}),
    # each side of the class count where rows change kernels, over several of the
    # row-transposing kernel's blocks
    ((300, 31), {"label_smoothing": 0.1, "weight": True}),
    ((300, 32), {"label_smoothing": 0.1, "weight": True}),
]


@needs_torch
@pytest.mark.parametrize(("shape", "options"), TORCH_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_options(shape, options, reduction, dtype, rng):
    x, t = case(rng, shape, dtype=dtype)
    if options.get("ignore_index") == 2:
        t[t == -100] = 2
    options = dict(options, reduction=reduction)
    if options.get("weight"):
        options["weight"] = (rng.random(shape[1] if len(shape) > 1 else shape[0]) + 0.1).astype(
            dtype
        )
    go = rng.standard_normal(t.shape).astype(dtype) if reduction == "none" else 0.7
    for name in ["cross_entropy", "nll_loss"]:
        opts = dict(options)
        if name == "nll_loss":
            opts.pop("label_smoothing", None)
        value, grad = lf.get(name).value_and_grad(x, t, grad_output=go, **opts)
        t_value, (t_grad,) = torch_value_and_grad(name, (x, t), grad_output=go, **opts)
        rtol = 2e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(grad, t_grad, rtol=rtol, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_probability_targets(smoothing, reduction, rng):
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    y = rng.random((6, 4, 3)).astype(np.float32)
    w = (rng.random(4) + 0.1).astype(np.float32)
    options = {"label_smoothing": smoothing, "reduction": reduction, "weight": w}
    value, grad = lf.cross_entropy.value_and_grad(x, y, **options)
    t_value, (t_grad,) = torch_value_and_grad("cross_entropy", (x, y), **options)
    np.testing.assert_allclose(value, t_value, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, t_grad, rtol=2e-5, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits(dtype, rng):
    x = (rng.choice([-1e4, 1e4], size=(6, 5)) * rng.random((6, 5))).astype(dtype)
    x[0] = [1e4, -1e4, 1e4, 0, -1e4]
    t = rng.integers(0, 5, 6)
    for options in [{}, {"label_smoothing": 0.2, "weight": np.arange(1, 6, dtype=dtype)}]:
        value, grad = lf.cross_entropy.value_and_grad(x, t, **options)
        assert np.isfinite(value) and np.isfinite(grad).all()
        t_value, (t_grad,) = torch_value_and_grad("cross_entropy", (x, t), **options)
        np.testing.assert_allclose(value, t_value, rtol=1e-6)
        np.testing.assert_allclose(grad, t_grad, rtol=1e-6, atol=1e-7)


@needs_torch
@pytest.mark.parametrize("classes", [100, 1000])  # short rows (lane maximum), long (trees)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_logits_like_torch(classes, dtype, rng):
    x = rng.standard_normal((5, classes)).astype(dtype)
    x[0, 7] = np.nan
    x[1, 3] = -np.inf
    x[2, 5] = np.inf
    x[3, :] = -np.inf
    x[4, classes // 2 - 1] = 1e30  # long rows: in the part a padded tree leaves unpaired
    t = np.array([1, 2, 5, 0, 3])
    rows = lf.cross_entropy(x, t, reduction="none")
    t_rows, _ = torch_value_and_grad("cross_entropy", (x, t), reduction="none")
    np.testing.assert_allclose(rows, t_rows, rtol=1e-5)  # nan where PyTorch has nan
    grad = lf.cross_entropy.grad(x, t, reduction="sum")
    _, (t_grad,) = torch_value_and_grad("cross_entropy", (x, t), reduction="sum")
    np.testing.assert_allclose(grad[1:2], t_grad[1:2], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(t_grad))


@needs_torch
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_all_ignored(name, rng):
    x = rng.standard_normal((4, 3))
    t = np.full(4, -100)
    value, grad = lf.get(name).value_and_grad(x, t, weight=np.ones(3))
    t_value, (t_grad,) = torch_value_and_grad(name, (x, t), weight=np.ones(3))
    assert np.isnan(value) and np.isnan(t_value)
    np.testing.assert_array_equal(grad, t_grad)
    assert lf.get(name)(x, t, reduction="sum") == 0


# -- properties -------------------------------------------------------------------------------
@given(
    rows=st.integers(0, 20),
    classes=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    smoothing=st.floats(0, 1),
)
def test_reductions_agree(rows, classes, seed, smoothing):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, classes)) * 5
    t = rng.integers(-1, classes, rows)
    options = {"ignore_index": -1, "label_smoothing": smoothing, "weight": rng.random(classes)}
    none = lf.cross_entropy(x, t, reduction="none", **options)
    total = lf.cross_entropy(x, t, reduction="sum", **options)
    np.testing.assert_allclose(total, none.sum(), rtol=1e-12, atol=1e-12)
    pair = lf.cross_entropy.partial(x, t, **options)
    np.testing.assert_allclose(pair[1], options["weight"][t[t >= 0]].sum(), rtol=1e-12)
    mean = lf.cross_entropy(x, t, **options)
    np.testing.assert_allclose(mean, pair[0] / pair[1] if pair[1] else np.nan, rtol=1e-12)


@given(g=st.floats(-5, 5), seed=st.integers(0, 2**31))
def test_gradient_linear_in_grad_output(g, seed):
    rng = np.random.default_rng(seed)
    x, t = rng.standard_normal((5, 4)), rng.integers(0, 4, 5)
    base = lf.cross_entropy.grad(x, t, reduction="sum", label_smoothing=0.1)
    np.testing.assert_allclose(
        lf.cross_entropy.grad(x, t, reduction="sum", grad_output=g, label_smoothing=0.1),
        g * base,
        rtol=1e-12,
        atol=1e-300,
    )
    go = rng.standard_normal(5)
    np.testing.assert_allclose(
        lf.cross_entropy.grad(x, t, reduction="none", grad_output=go, label_smoothing=0.1),
        go[:, None] * base,
        rtol=1e-12,
        atol=1e-15,
    )


@pytest.mark.parametrize(
    ("rows", "classes"), [(multiclass_cpu.CROSS_ENTROPY_PARALLEL_MIN // 4, 4), (40, 32000)]
)
def test_bitwise_identical_for_any_thread_count(rows, classes, rng):
    x = rng.standard_normal((rows, classes)).astype(np.float32)
    t = rng.integers(0, classes, rows)
    with threads(1):
        v1, g1 = lf.cross_entropy.value_and_grad(x, t, label_smoothing=0.1)
    with threads(2):
        v2, g2 = lf.cross_entropy.value_and_grad(x, t, label_smoothing=0.1)
    assert v1.tobytes() == v2.tobytes() and g1.tobytes() == g2.tobytes()


def test_large_float32_accuracy(rng):
    x = rng.standard_normal((20000, 50)).astype(np.float32)
    t = rng.integers(0, 50, 20000)
    lp = log_softmax(x, 1)
    expected = -lp[np.arange(20000), t].mean()
    np.testing.assert_allclose(lf.cross_entropy(x, t), expected, rtol=1e-6)


# -- the fast path (KernelSpec.fast) ----------------------------------------------------------
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("shape", [(64, 10), (300, 40), (300, 100), (1000, 100), (2**14, 16)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_is_the_general_path(name, shape, dtype, rng):
    x, t = case(rng, shape, dtype=dtype)
    if name == "cross_entropy":
        spec = multiclass.CROSS_ENTROPY
        parallel_min = spec.kernels[1].parallel_min
        taken = spec.fast((x, t), None, params=(0.0,)) is not None
    else:
        parallel_min = multiclass_cpu._nll.parallel_min
        taken = multiclass_cpu.fast_nll_loss((x, t), None) is not None
    # small inputs; large ones (cross_entropy's (1000, 100), both losses' (2**14, 16)): the
    # general path
    assert taken == (x.size < parallel_min)
    assert_fast_path_is_general_path(name, (x, t), {"reduction": "mean"})


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_fast_path_leaves_the_rest_to_the_general_path(name, rng):
    loss = lf.get(name)
    x, t = case(rng, (6, 4))
    expected = REFS[name](x, t)
    # inputs and outputs it does not take as they are: the general path's results or errors
    for args in [(x, t.astype(np.int32)), (np.asfortranarray(x), t), (x.tolist(), t)]:
        np.testing.assert_allclose(loss.value_and_grad(*args)[0], expected, rtol=1e-12)
    with pytest.raises(ValueError, match="C-contiguous"):
        loss.value_and_grad(x, t, out=np.empty((4, 6)).T)
    with pytest.raises(TypeError, match="dtype float64, got float32"):
        loss.value_and_grad(x, t, out=np.empty((6, 4), np.float32))
    with pytest.raises(IndexError, match="target 9 is out of bounds"):
        loss.value_and_grad(x, np.array([0, 1, 9, 2, 0, 1]))
    value, grad = loss.value_and_grad(x, np.full(6, -100))  # all ignored: nan, zero gradient
    assert np.isnan(value) and not grad.any()


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("bad", [5, -3, 100])
def test_class_index_out_of_range(name, bad, rng):
    x, t = rng.standard_normal((4, 5)), np.array([0, 1, bad, 2])
    before = snapshot(x, t)
    with pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
        lf.get(name)(x, t)
    assert_unchanged(before, (x, t))


def test_the_first_bad_index_is_named(rng):
    # enough targets for the parallel check, bad ones in different chunks, weights given
    x, t = rng.standard_normal((200_000, 3)), rng.integers(0, 3, 200_000)
    t[150_000], t[190_000], t[10] = 7, -5, -100
    with pytest.raises(IndexError, match="target 7 is out of bounds"):
        lf.nll_loss(x, t, weight=np.ones(3))


def test_mean_denominator_of_many_weighted_targets(rng):
    # the summed weights of the counted targets, over many chunks, against NumPy's sum
    x, t = rng.standard_normal((300_000, 4)), rng.integers(0, 4, 300_000)
    t[::3] = -100
    w = rng.random(4) + 0.5
    total = lf.nll_loss(x, t, weight=w, reduction="sum")
    kept = t != -100
    np.testing.assert_allclose(
        lf.nll_loss(x, t, weight=w), total / np.sum(w[t[kept]], dtype=np.float64), rtol=1e-12
    )


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_weight_of_wrong_length(name, rng):
    x, t = case(rng, (4, 5))
    with pytest.raises(
        ValueError, match=r"weight must be a 1-D array of length 5 .* got shape \(3,\)"
    ):
        lf.get(name)(x, t, weight=np.ones(3))


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_label_smoothing_range(value, rng):
    x, t = case(rng, (4, 5))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 1.0\]"):
        lf.cross_entropy(x, t, label_smoothing=value)


def test_target_shape_mismatch(rng):
    x = rng.standard_normal((4, 5))
    with pytest.raises(ValueError, match=r"shape \(4,\) for input of shape \(4, 5\).*\(3,\)"):
        lf.cross_entropy(x, np.zeros(3, int))
    with pytest.raises(ValueError, match=r"input of shape \(4, 5\) and target of shape \(4, 4\)"):
        lf.cross_entropy(x, np.zeros((4, 4)))


def test_dtypes(rng):
    x, t = case(rng, (4, 5))
    with pytest.raises(
        TypeError, match="target must hold integer class indices, got dtype float64"
    ):
        lf.nll_loss(x, t.astype(float))
    with pytest.raises(
        TypeError, match="input must be a float16, float32 or float64 array, got dtype int64"
    ):
        lf.cross_entropy(t[:, None].repeat(5, 1), t)
    with pytest.raises(TypeError, match="got dtype bool"):
        lf.cross_entropy(x, t.astype(bool))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        lf.cross_entropy(x, t, ignore_index=1.5)


def test_any_integer_target_dtype(rng):
    x, t = case(rng, (6, 5), ignore=False)
    expected = lf.cross_entropy(x, t)
    for dtype in [np.int8, np.uint8, np.int16, np.int32, np.uint64]:
        assert lf.cross_entropy(x, t.astype(dtype)) == expected


def test_float16(rng):
    x, t = case(rng, (6, 5), dtype=np.float16)
    value, grad = lf.cross_entropy.value_and_grad(x, t)
    assert value.dtype == np.float16 and grad.dtype == np.float16
    np.testing.assert_allclose(value, ref_cross_entropy(x, t), rtol=2e-3)


def test_empty(rng):
    x, t = np.empty((0, 5)), np.empty(0, int)
    assert np.isnan(lf.cross_entropy(x, t))
    assert lf.cross_entropy(x, t, reduction="sum") == 0
    assert lf.cross_entropy(x, t, reduction="none").shape == (0,)
    assert lf.nll_loss.grad(x, t).shape == (0, 5)


def test_layouts_and_out(rng):
    x, t = case(rng, (6, 5), ignore=False)
    expected = lf.cross_entropy.value_and_grad(x, t)
    fortran = np.asfortranarray(x)
    value, grad = lf.cross_entropy.value_and_grad(fortran, t[::-1][::-1].copy())
    assert value == expected[0]
    np.testing.assert_array_equal(grad, expected[1])
    out = np.empty_like(x)
    value, grad = lf.cross_entropy.value_and_grad(x.astype(">f8"), t.astype(">i4"), out=out)
    assert grad is out and value == expected[0]
    np.testing.assert_array_equal(out, expected[1])


# -- indices and options beyond int64 (API.md section 5: never a wrapped value) -----------------
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("big", [2**63, 2**64 - 100])
def test_uint64_target_beyond_int64_is_refused(name, big, rng):
    # 2**64 - 100 wrapped to int64 is -100, the default ignore_index: the row would be dropped
    x, t = case(rng, (4, 5), ignore=False)
    t = t.astype(np.uint64)
    t[2] = big
    before = snapshot(x, t)
    loss = lf.get(name)
    with pytest.raises(ValueError, match=rf"target .*{big}.* int64"):
        loss(x, t)
    with pytest.raises(ValueError, match=rf"target .*{big}.* int64"):
        loss.value_and_grad(x, t)
    with pytest.raises(ValueError, match=rf"target .*{big}.* int64"):
        loss.value_and_grad(x, t, reduction="sum", ignore_index=-100)
    assert_unchanged(before, (x, t))


def test_unsigned_targets_that_fit_int64_are_class_indices(rng):
    x, t = case(rng, (6, 5), ignore=False)
    expected = lf.nll_loss.value_and_grad(x, t)
    for dtype in [np.uint8, np.uint16, np.uint32, np.uint64]:
        value, grad = lf.nll_loss.value_and_grad(x, t.astype(dtype))
        assert value == expected[0]
        np.testing.assert_array_equal(grad, expected[1])


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, np.uint64(2**63)])
def test_ignore_index_beyond_int64_is_refused(name, ignore_index, rng):
    x, t = case(rng, (4, 5))
    with pytest.raises(ValueError, match=r"ignore_index must fit int64"):
        lf.get(name)(x, t, ignore_index=ignore_index)
