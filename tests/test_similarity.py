"""cosine_similarity and cosine_embedding_loss against float64 NumPy references, PyTorch and
finite differences, for both gradients."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import (
    assert_fast_path_is_general_path,
    assert_unchanged,
    finite_difference,
    layouts,
    needs_torch,
    snapshot,
    torch_samples,
    torch_value_and_grad,
)

import lossforge as lf
from lossforge.runtime.cpu import PARALLEL_MIN, threads


# -- independent float64 references ----------------------------------------------------------
def ref_cosine(a, b, dim=1, eps=1e-8):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    moved_a, moved_b = np.moveaxis(a, dim, -1), np.moveaxis(b, dim, -1)
    out = np.empty(moved_a.shape[:-1])
    for index in np.ndindex(out.shape):
        u, v = moved_a[index], moved_b[index]
        nu = max(np.sqrt(np.dot(u, u)), eps)
        nv = max(np.sqrt(np.dot(v, v)), eps)
        out[index] = np.dot(u / nu, v / nv)
    return out


def ref_embedding(a, b, t, margin=0.0, reduction="mean"):
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    losses = []
    for u, v, y in zip(a, b, np.atleast_1d(t)):
        eps = 9.999999960041972e-13  # PyTorch's 1e-12 is a C++ float
        cos = np.dot(u, v) / np.sqrt((np.dot(u, u) + eps) * (np.dot(v, v) + eps))
        losses.append(1 - cos if y == 1 else max(0.0, cos - margin) if y == -1 else 0.0)
    losses = np.array(losses)
    if reduction == "none":
        return losses.reshape(np.shape(t))
    return losses.sum() if reduction == "sum" else losses.mean()


@pytest.mark.parametrize(
    ("shape", "dim"), [((5, 4), 1), ((5, 4), 0), ((3, 4, 2), 1), ((3, 4, 2), -1), ((6,), 0)]
)
def test_cosine_against_reference(shape, dim, rng):
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    np.testing.assert_allclose(
        lf.cosine_similarity(a, b, dim=dim), ref_cosine(a, b, dim), rtol=1e-12
    )


@pytest.mark.parametrize(("shape", "dim"), [((3, 4), 1), ((2, 3, 2), 1), ((4,), 0)])
def test_cosine_finite_differences(shape, dim, rng):
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    go = rng.standard_normal(ref_cosine(a, b, dim).shape)
    g1, g2 = lf.cosine_similarity.grad(a, b, dim=dim, grad_output=go)
    n1 = finite_difference(lambda v: float(np.sum(go * ref_cosine(v, b, dim))), a)
    n2 = finite_difference(lambda v: float(np.sum(go * ref_cosine(a, v, dim))), b)
    np.testing.assert_allclose(g1, n1, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g2, n2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", [0.0, 0.3, -0.5])
def test_embedding_against_reference_and_finite_differences(reduction, margin, rng):
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    t = np.array([1, -1, 1, -1, -1, 1])
    value, (g1, g2) = lf.cosine_embedding_loss.value_and_grad(
        a,
        b,
        t,
        margin=margin,
        reduction=reduction,
        grad_output=np.ones(6) if reduction == "none" else None,
    )
    np.testing.assert_allclose(value, ref_embedding(a, b, t, margin, reduction), rtol=1e-12)
    total = lambda u, v: float(np.sum(ref_embedding(u, v, t, margin, reduction)))  # noqa: E731
    np.testing.assert_allclose(
        g1, finite_difference(lambda v: total(v, b), a), rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(
        g2, finite_difference(lambda v: total(a, v), b), rtol=1e-6, atol=1e-9
    )


# -- PyTorch ------------------------------------------------------------------------------------
@needs_torch
def test_cosine_torch_sample_inputs():
    count = 0
    for (a, b), options in torch_samples("cosine_similarity"):
        if a.shape != b.shape:
            continue  # broadcasting: lossforge requires equal shapes (documented)
        value, grads = lf.cosine_similarity.value_and_grad(a, b, **options)
        t_value, t_grads = torch_value_and_grad("cosine_similarity", (a, b), (0, 1), **options)
        rtol = 1e-5 if a.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
        for g, tg in zip(grads, t_grads):
            np.testing.assert_allclose(g, tg, rtol=rtol, atol=1e-6)
        count += 1
    assert count >= 2


@needs_torch
def test_embedding_torch_sample_inputs():
    count = 0
    for (a, b, t), options in torch_samples("cosine_embedding_loss", n_arrays=3):
        value, grads = lf.cosine_embedding_loss.value_and_grad(a, b, t, **options)
        t_value, t_grads = torch_value_and_grad(
            "cosine_embedding_loss", (a, b, t), (0, 1), **options
        )
        rtol = 1e-5 if a.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
        for g, tg in zip(grads, t_grads):
            np.testing.assert_allclose(g, tg, rtol=rtol, atol=1e-6)
        count += 1
    assert count >= 2


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_cosine_torch_with_zero_vectors(dtype, dim, rng):
    a, b = (
        rng.standard_normal((4, 5, 3)).astype(dtype),
        rng.standard_normal((4, 5, 3)).astype(dtype),
    )
    a[0] = 0
    go = rng.standard_normal(ref_cosine(a, b, dim).shape).astype(dtype)
    value, grads = lf.cosine_similarity.value_and_grad(a, b, dim=dim, grad_output=go)
    t_value, t_grads = torch_value_and_grad(
        "cosine_similarity", (a, b), (0, 1), grad_output=go, dim=dim
    )
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(value, t_value, rtol=rtol, atol=1e-6)
    for g, tg in zip(grads, t_grads):
        np.testing.assert_allclose(g, tg, rtol=rtol, atol=1e-5)


@needs_torch
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_embedding_torch_options(reduction, rng):
    a, b = (
        rng.standard_normal((8, 5)).astype(np.float32),
        rng.standard_normal((8, 5)).astype(np.float32),
    )
    t = np.array([1, -1, 1, -1, 1, -1, 0, 2], dtype=np.float32)  # 0 and 2 contribute 0
    go = rng.standard_normal(8).astype(np.float32) if reduction == "none" else 0.5
    value, grads = lf.cosine_embedding_loss.value_and_grad(
        a, b, t, margin=0.2, reduction=reduction, grad_output=go
    )
    t_value, t_grads = torch_value_and_grad(
        "cosine_embedding_loss", (a, b, t), (0, 1), grad_output=go, margin=0.2, reduction=reduction
    )
    np.testing.assert_allclose(value, t_value, rtol=2e-5, atol=1e-6)
    for g, tg in zip(grads, t_grads):
        np.testing.assert_allclose(g, tg, rtol=2e-5, atol=1e-6)


# -- properties ---------------------------------------------------------------------------------
@given(scale1=st.floats(1e-3, 1e3), scale2=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31))
def test_cosine_is_scale_invariant(scale1, scale2, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    # absolute tolerance: a cosine near 0 is a difference of terms of size 1 (|cos| <= 1)
    np.testing.assert_allclose(
        lf.cosine_similarity(a * scale1, b * scale2),
        lf.cosine_similarity(a, b),
        rtol=1e-12,
        atol=1e-14,
    )
    np.testing.assert_allclose(lf.cosine_similarity(a, a), 1.0, rtol=1e-12)


@given(rows=st.integers(0, 12), seed=st.integers(0, 2**31), g=st.floats(-4, 4))
def test_embedding_reductions_and_linearity(rows, seed, g):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((rows, 3)), rng.standard_normal((rows, 3))
    t = rng.choice([-1, 1], rows)
    loss = lf.cosine_embedding_loss
    total = loss(a, b, t, reduction="sum")
    np.testing.assert_allclose(total, loss(a, b, t, reduction="none").sum(), rtol=1e-12, atol=1e-12)
    assert loss.partial(a, b, t) == (float(total), float(rows))
    base = loss.grad(a, b, t, reduction="sum")
    scaled = loss.grad(a, b, t, reduction="sum", grad_output=g)
    for s, u in zip(scaled, base):
        # an element that is a difference of nearly equal terms rounds differently when g
        # scales them: linear to the rounding of the row's largest term
        atol = 1e-12 * abs(g) * (np.abs(u).max() if u.size else 0.0) + 1e-300
        np.testing.assert_allclose(s, g * u, rtol=1e-12, atol=atol)


def test_bitwise_identical_for_any_thread_count(rng):
    a = rng.standard_normal((PARALLEL_MIN // 16 + 5, 16)).astype(np.float32)
    b = rng.standard_normal(a.shape).astype(np.float32)
    t = rng.choice([-1, 1], a.shape[0])
    for loss, args in [(lf.cosine_embedding_loss, (a, b, t)), (lf.cosine_similarity, (a, b))]:
        with threads(1):
            v1, (g1, h1) = loss.value_and_grad(*args)
        with threads(2):
            v2, (g2, h2) = loss.value_and_grad(*args)
        assert v1.tobytes() == v2.tobytes()
        assert g1.tobytes() == g2.tobytes() and h1.tobytes() == h2.tobytes()


# -- dtypes, layouts, sizes, out= ---------------------------------------------------------------
def test_float16(rng):
    a, b = (
        rng.standard_normal((4, 6)).astype(np.float16),
        rng.standard_normal((4, 6)).astype(np.float16),
    )
    value, (g1, g2) = lf.cosine_similarity.value_and_grad(a, b)
    assert value.dtype == g1.dtype == g2.dtype == np.float16
    np.testing.assert_allclose(value, ref_cosine(a, b), rtol=3e-3, atol=1e-3)


@pytest.mark.parametrize("layout", ["strided", "fortran", "readonly", "bigendian"])
def test_memory_layouts(layout, rng):
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    t = np.array([1, -1, 1, 1, -1])
    expected = lf.cosine_embedding_loss.value_and_grad(a, b, t)
    al, bl = layouts(a)[layout], layouts(b)[layout]
    before = snapshot(al, bl, t)
    value, grads = lf.cosine_embedding_loss.value_and_grad(al, bl, t)
    assert value == expected[0]
    for g, e in zip(grads, expected[1]):
        np.testing.assert_array_equal(g, e)
    assert_unchanged(before, (al, bl, t))


def test_empty_and_out(rng):
    e = np.empty((0, 3))
    assert lf.cosine_similarity(e, e).shape == (0,)
    assert np.isnan(lf.cosine_embedding_loss(e, e, np.empty(0)))
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    out = (np.empty_like(a), np.empty_like(b))
    _, grads = lf.cosine_similarity.value_and_grad(a, b, out=out)
    assert grads[0] is out[0] and grads[1] is out[1]
    with pytest.raises(ValueError, match="out must be a tuple of 2 arrays"):
        lf.cosine_similarity.grad(a, b, out=(out[0],))


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input(rng):
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"x1 of shape \(4, 3\) and x2 of shape \(3, 4\)"):
        lf.cosine_similarity(a, b.T)
    with pytest.raises(IndexError, match="dim 2 is out of range for inputs of 2 dimensions"):
        lf.cosine_similarity(a, b, dim=2)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        lf.cosine_similarity(a, b, eps=-1.0)
    with pytest.raises(
        TypeError, match="x1 must be a float16, float32 or float64 array, got dtype int64"
    ):
        lf.cosine_similarity(a.astype(np.int64), b)
    with pytest.raises(ValueError, match=r"inputs of shape \(4, 3\) and target of shape \(3,\)"):
        lf.cosine_embedding_loss(a, b, np.ones(3))
    with pytest.raises(TypeError, match="target must hold 1 or -1"):
        lf.cosine_embedding_loss(a, b, np.ones(4, bool))
    with pytest.raises(ValueError, match="reduction must be one of"):
        lf.cosine_embedding_loss(a, b, np.ones(4), reduction="avg")
    with pytest.raises(TypeError, match="not a reduced loss"):
        lf.cosine_similarity.partial(a, b)


# -- the fast path (KernelSpec.fast) --------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 3), (64, 128), (PARALLEL_MIN // 64, 128)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_is_the_general_path(shape, dtype, rng):
    x1, x2 = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    t = np.where(rng.random(shape[0]) < 0.5, 1, -1).astype(dtype)
    fast = lf.get("cosine_similarity")._registry.fast_path
    assert fast("cosine_similarity")((x1, x2), None) is not None  # the calls below take it
    assert fast("cosine_embedding_loss")((x1, x2, t), None) is not None
    assert_fast_path_is_general_path("cosine_similarity", (x1, x2), {"dim": 1})
    assert_fast_path_is_general_path("cosine_embedding_loss", (x1, x2, t), {"margin": 0.0})
    assert_fast_path_is_general_path(
        "cosine_embedding_loss", (x1, x2, t.astype(np.int64)), {"margin": 0.0}
    )


def test_fast_path_leaves_the_rest_to_the_general_path(rng):
    x1, x2 = rng.standard_normal((2, 4, 3))
    t = np.array([1.0, -1.0, 1.0, 0.5])
    value, _ = lf.cosine_similarity.value_and_grad(x1[:, :2], x2[:, :2])  # strided
    np.testing.assert_allclose(value, ref_cosine(x1[:, :2], x2[:, :2]), rtol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        lf.cosine_embedding_loss.value_and_grad(x1, x2[:, :2], t)
    out = (np.empty((4, 3)), np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match="dtype float64, got float32"):
        lf.cosine_embedding_loss.value_and_grad(x1, x2, t, out=out)
    expected = ref_embedding(x1, x2, t)
    np.testing.assert_allclose(lf.cosine_embedding_loss(x1, x2, t), expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["cosine_similarity", "cosine_embedding_loss"])
def test_one_out_for_two_gradients_is_refused(name, rng):
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    arrays = (a, b) if name == "cosine_similarity" else (a, b, np.array([1, -1, 1, -1]))
    loss = lf.get(name)
    o = np.empty_like(a)
    for options in [{}, {"reduction": "sum"} if loss.reduced else {"dim": 1}]:
        with pytest.raises(ValueError, match="one array given for two outputs"):
            loss.value_and_grad(*arrays, out=(o, o), **options)
        with pytest.raises(ValueError, match="one array given for two outputs"):
            loss.grad(*arrays, out=(o, o), **options)
        buf = np.empty(a.size + 1)
        halves = (buf[:-1].reshape(a.shape), buf[1:].reshape(a.shape))
        with pytest.raises(ValueError, match="out arrays overlap"):
            loss.value_and_grad(*arrays, out=halves, **options)
