"""triplet_margin_loss and triplet_margin_with_distance_loss against PyTorch (values and the
gradients of all three inputs, every option, its OpInfo samples), a float64 NumPy reference
with finite differences, bad input and the CUDA simulator. Thread determinism: the
conformance kit (tests/test_conformance.py), for every option set."""

from __future__ import annotations

import numpy as np
import pytest
from support import (
    assert_unchanged,
    finite_difference,
    layouts,
    needs_torch,
    snapshot,
    torch_samples,
    torch_value_and_grad,
)

import lossforge as lf

ALL = (0, 1, 2)


def ref_triplet(a, b, c, margin=1.0, p=2.0, eps=1e-6, swap=False):
    """Row by row in float64, from the definition (norms as torch.linalg.vector_norm defines
    them for every p), the inputs broadcast together first."""
    a, b, c = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (a, b, c)))
    shape = a.shape[:-1]
    a, b, c = (x.reshape(-1, x.shape[-1]) for x in (a, b, c))
    out = []
    for u, v, w in zip(a, b, c):

        def d(x, y):
            r = np.abs(x - y + eps)
            if p == 0:
                return float(np.count_nonzero(r))
            if p == np.inf:
                return float(r.max())
            if p == -np.inf:
                return float(r.min())
            with np.errstate(divide="ignore"):  # 0 ** -1 is inf: the norm is 0
                return float(np.sum(r**p) ** (1.0 / p))

        neg = min(d(u, w), d(v, w)) if swap else d(u, w)
        out.append(max(margin + d(u, v) - neg, 0.0))
    return np.array(out).reshape(shape)


def _triplet(rng, shape, dtype=np.float64):
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


OPTIONS = [
    {},
    {"margin": 2.0, "swap": True},
    {"p": 1.0},
    {"p": 0.5, "margin": 0.3},
    {"p": 1.5, "eps": 0.0, "swap": True},
    {"p": 3.0, "eps": 1e-3, "margin": 4.0},
    # the norms PyTorch also takes: counts, max, min, negative powers
    {"p": 0.0},
    {"p": np.inf, "swap": True},
    {"p": -np.inf, "margin": 0.2},
    {"p": -1.0, "swap": True, "margin": 0.1},
    {"p": -0.5, "eps": 0.0},
]


@needs_torch
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(6, 5), (7,), (2, 3, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_pytorch(options, shape, reduction, rng):
    arrays = _triplet(rng, shape)
    value, grads = lf.triplet_margin_loss.value_and_grad(*arrays, reduction=reduction, **options)
    go = None
    if reduction == "none":
        go = rng.standard_normal(shape[:-1])
        value, grads = lf.triplet_margin_loss.value_and_grad(
            *arrays, reduction=reduction, grad_output=go, **options
        )
    expected, expected_grads = torch_value_and_grad(
        "triplet_margin_loss", arrays, ALL, grad_output=go, reduction=reduction, **options
    )
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-15)
    assert np.shape(value) == np.shape(expected)
    for g, e in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_matches_pytorch(dtype, rng):
    arrays = _triplet(rng, (9, 16), dtype)
    value, grads = lf.triplet_margin_loss.value_and_grad(*arrays, swap=True, p=1.5)
    expected, expected_grads = torch_value_and_grad(
        "triplet_margin_loss", arrays, ALL, swap=True, p=1.5
    )
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    assert value.dtype == dtype and all(g.dtype == dtype for g in grads)
    np.testing.assert_allclose(value, expected, rtol=rtol)
    for g, e in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * np.abs(e).max())


@needs_torch
def test_swap_ties_and_zero_distances_match_pytorch(rng):
    # positive == anchor: d(positive, negative) ties d(anchor, negative) (torch.minimum
    # splits the gradient) and, with eps=0, d(anchor, positive) is 0 (the norm's gradient 0)
    a, _, c = _triplet(rng, (4, 3))
    for options in ({"swap": True, "margin": 5.0}, {"swap": True, "eps": 0.0, "p": 1.5}):
        value, grads = lf.triplet_margin_loss.value_and_grad(a, a.copy(), c, **options)
        expected, expected_grads = torch_value_and_grad(
            "triplet_margin_loss", (a, a.copy(), c), ALL, **options
        )
        np.testing.assert_allclose(value, expected, rtol=1e-12)
        for g, e in zip(grads, expected_grads, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("name", ["triplet_margin_loss", "triplet_margin_with_distance_loss"])
def test_pytorch_opinfo_samples(name):
    samples = list(torch_samples(name, 3))
    assert samples
    for arrays, options in samples:
        value, grads = lf.get(name).value_and_grad(*arrays, **options)
        expected, expected_grads = torch_value_and_grad(name, arrays, ALL, **options)
        rtol = 2e-5 if arrays[0].dtype == np.float32 else 1e-12
        np.testing.assert_allclose(value, expected, rtol=rtol, atol=rtol)
        for g, e in zip(grads, expected_grads, strict=True):
            np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * max(np.abs(e).max(), 1e-3))


@needs_torch
def test_with_distance_takes_pytorch_distances(rng):
    import torch

    arrays = _triplet(rng, (5, 4))
    default = lf.triplet_margin_loss(*arrays)
    for function in (None, torch.pairwise_distance, torch.nn.functional.pairwise_distance):
        got = lf.triplet_margin_with_distance_loss(*arrays, distance_function=function)
        assert got == default
    module = torch.nn.PairwiseDistance(p=1.5, eps=1e-3)
    got = lf.triplet_margin_with_distance_loss(*arrays, distance_function=module, swap=True)
    assert got == lf.triplet_margin_loss(*arrays, p=1.5, eps=1e-3, swap=True)
    for norm in (np.inf, 0.0, -1.0):  # any p, as triplet_margin_loss takes it
        module = torch.nn.PairwiseDistance(p=norm)
        value, grads = lf.triplet_margin_with_distance_loss.value_and_grad(
            *arrays, distance_function=module
        )
        expected, expected_grads = torch_value_and_grad(
            "triplet_margin_with_distance_loss", arrays, ALL, distance_function=module
        )
        np.testing.assert_allclose(value, expected, rtol=1e-12)
        for g, e in zip(grads, expected_grads, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-14)
    with pytest.raises(TypeError, match="compiled kernel"):
        lf.triplet_margin_with_distance_loss(
            *arrays, distance_function=torch.nn.PairwiseDistance(keepdim=True)
        )


#: Shapes that broadcast, as PyTorch broadcasts them through pairwise_distance (inputs of
#: one number of dimensions): one anchor against many rows, a broadcast last dimension,
#: outer products of rows, one positive and negative for all.
BROADCASTS = [
    [(1, 5), (6, 5), (6, 5)],
    [(6, 5), (1, 5), (1, 5)],
    [(6, 1), (6, 5), (1, 5)],
    [(4, 1, 5), (1, 3, 5), (1, 1, 5)],
    [(1,), (5,), (5,)],
    [(2, 1, 3), (2, 4, 3), (2, 4, 3)],
]


@needs_torch
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize(
    "options",
    [{}, {"swap": True, "p": 1.5}, {"p": np.inf, "swap": True}, {"p": -1.0}, {"p": 0.0}],
    ids=str,
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_broadcasting_matches_pytorch(shapes, options, dtype, rng):
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    full = np.broadcast_shapes(*shapes)[:-1]
    go = rng.standard_normal(full).astype(dtype)
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    for reduction, g in (("none", go), ("mean", None), ("sum", 0.5)):
        value, grads = lf.triplet_margin_loss.value_and_grad(
            *arrays, reduction=reduction, grad_output=g, **options
        )
        expected, expected_grads = torch_value_and_grad(
            "triplet_margin_loss", arrays, ALL, grad_output=g, reduction=reduction, **options
        )
        assert np.shape(value) == np.shape(expected) and value.dtype == dtype
        np.testing.assert_allclose(value, expected, rtol=rtol, atol=rtol)
        for got, x, e in zip(grads, arrays, expected_grads, strict=True):
            assert got.shape == x.shape and got.dtype == dtype
            np.testing.assert_allclose(got, e, rtol=rtol, atol=rtol * max(np.abs(e).max(), 1))
        if not options:
            same = lf.triplet_margin_with_distance_loss.value_and_grad(
                *arrays, reduction=reduction, grad_output=g
            )
            np.testing.assert_array_equal(same[0], value)
            for got, e in zip(same[1], grads, strict=True):
                np.testing.assert_array_equal(got, e)


@pytest.mark.parametrize("shapes", BROADCASTS[:4], ids=str)
def test_broadcasting_finite_differences(shapes, rng):
    arrays = [rng.standard_normal(s) for s in shapes]
    go = rng.standard_normal(np.broadcast_shapes(*shapes)[:-1])
    options = {"swap": True, "margin": 3.0}
    value = lf.triplet_margin_loss(*arrays, reduction="none", **options)
    np.testing.assert_allclose(value, ref_triplet(*arrays, **options), rtol=1e-12)
    grads = lf.triplet_margin_loss.grad(*arrays, reduction="none", grad_output=go, **options)
    for i, g in enumerate(grads):

        def f(x, i=i):
            args = list(arrays)
            args[i] = x
            return float(np.sum(go * ref_triplet(*args, **options)))

        np.testing.assert_allclose(g, finite_difference(f, arrays[i]), rtol=1e-6, atol=1e-8)


def test_one_row_broadcast_is_not_copied(rng):
    from lossforge.plugins.similarity import triplet

    anchor, rows = rng.standard_normal((1, 4)), rng.standard_normal((6, 4))
    options = lf.get("triplet_margin_loss").spec.options
    p = triplet.prepare((anchor, rows, rows[::-1]), options, "cpu")
    assert p.arrays[0].shape == (1, 4) and np.shares_memory(p.arrays[0], anchor)
    assert p.params["broadcast"] == (6, 4) and p.grad_shapes == ((1, 4), (6, 4), (6, 4))


@needs_torch
@pytest.mark.parametrize("p", [np.inf, -np.inf, -1.0, 0.5, 0.0, 1.5])
def test_ties_and_zeros_match_autograd(p):
    # integers with eps=0: |v| ties at the max and min (the infinity norms share the
    # gradient among them), zero elements (0^p = inf for p < 0, the norm 0), zero rows,
    # and tied swap distances
    a = np.array([[1.0, -1.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0], [2.0, -2.0, 1.0, -1.0]])
    b = np.array([[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]])
    c = np.array([[3.0, -1.0, 0.5, 2.0], [1.0, 1.0, -1.0, 1.0], [0.0, 0.0, 2.0, -2.0]])
    for options in ({"margin": 5.0, "swap": True}, {"margin": 0.5}):
        value, grads = lf.triplet_margin_loss.value_and_grad(
            a, b, c, p=p, eps=0.0, reduction="none", **options
        )
        expected, expected_grads = torch_value_and_grad(
            "triplet_margin_loss", (a, b, c), ALL, p=p, eps=0.0, reduction="none", **options
        )
        np.testing.assert_allclose(value, expected, rtol=1e-12)
        for g, e in zip(grads, expected_grads, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-15)


@needs_torch
@pytest.mark.parametrize("p", [2.0, 1.5, 0.5, 0.0, -1.0, np.inf, -np.inf, np.nan])
def test_nan_propagates_as_in_pytorch(p, rng):
    a, b, c = _triplet(rng, (4, 3))
    a[1, 2] = np.nan
    c[2, 0] = np.nan
    value, grads = lf.triplet_margin_loss.value_and_grad(a, b, c, p=p, swap=True, reduction="none")
    expected, expected_grads = torch_value_and_grad(
        "triplet_margin_loss", (a, b, c), ALL, p=p, swap=True, reduction="none"
    )
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    for g, e in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_reference_and_finite_differences(options, rng):
    arrays = _triplet(rng, (4, 3))
    go = rng.standard_normal(4)
    value = lf.triplet_margin_loss(*arrays, reduction="none", **options)
    np.testing.assert_allclose(value, ref_triplet(*arrays, **options), rtol=1e-12)
    grads = lf.triplet_margin_loss.grad(*arrays, reduction="none", grad_output=go, **options)
    for i, g in enumerate(grads):

        def f(x, i=i):
            args = list(arrays)
            args[i] = x
            return float(np.sum(go * ref_triplet(*args, **options)))

        np.testing.assert_allclose(g, finite_difference(f, arrays[i]), rtol=1e-6, atol=1e-8)


def test_with_distance_is_the_default_pairwise_distance(rng):
    arrays = _triplet(rng, (6, 5))
    for swap in (False, True):
        value, grads = lf.triplet_margin_with_distance_loss.value_and_grad(
            *arrays, swap=swap, margin=0.7, reduction="sum"
        )
        np.testing.assert_allclose(value, ref_triplet(*arrays, 0.7, swap=swap).sum(), rtol=1e-12)
        same = lf.triplet_margin_loss.value_and_grad(
            *arrays, swap=swap, margin=0.7, reduction="sum"
        )
        assert value == same[0]
        for g, e in zip(grads, same[1], strict=True):
            np.testing.assert_array_equal(g, e)


def test_layouts_and_inputs_unchanged(rng):
    arrays = _triplet(rng, (5, 4))
    expected, expected_grads = lf.triplet_margin_loss.value_and_grad(*arrays, swap=True)
    for kind, anchor in layouts(arrays[0]).items():
        args = (anchor, layouts(arrays[1])[kind], arrays[2])
        before = snapshot(*args)
        value, grads = lf.triplet_margin_loss.value_and_grad(*args, swap=True)
        assert_unchanged(before, args)
        np.testing.assert_allclose(value, expected, rtol=1e-14)
        for g, e in zip(grads, expected_grads, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-14)


def test_empty_inputs():
    empty = (np.zeros((0, 4)),) * 3
    assert np.isnan(lf.triplet_margin_loss(*empty))
    assert lf.triplet_margin_loss(*empty, reduction="sum") == 0
    no_features = (np.zeros((3, 0)),) * 3  # every distance 0: the loss is the margin
    np.testing.assert_array_equal(lf.triplet_margin_loss(*no_features, reduction="none"), [1.0] * 3)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a: lf.triplet_margin_loss(a, a, a[:2]), ValueError, r"\(3, 4\).*\(2, 4\)"),
        (lambda a: lf.triplet_margin_loss(a, a, a[0]), ValueError, "dimensions"),
        (lambda a: lf.triplet_margin_loss(a[0, 0], a[0, 0], a[0, 0]), ValueError, "dimensions"),
        (lambda a: lf.triplet_margin_loss(a, a, a, p="2"), TypeError, "p must"),
        (lambda a: lf.triplet_margin_loss(a, a, a, margin=0.0), ValueError, "margin"),
        (lambda a: lf.triplet_margin_loss(a, a, a, reduction="avg"), ValueError, "reduction"),
        (lambda a: lf.triplet_margin_loss(a, a, a.astype(int)), TypeError, "int64"),
        (lambda a: lf.triplet_margin_with_distance_loss(a, a, a, margin=-1), ValueError, "margin"),
        (
            lambda a: lf.triplet_margin_with_distance_loss(
                a, a, a, distance_function=lambda x, y: abs(x - y).sum(-1)
            ),
            TypeError,
            "compiled kernel",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(np.ones((3, 4)))


#: What PyTorch refuses with a RuntimeError (a ValueError here, API.md 5): shapes that do not
#: broadcast, a (D) anchor against (N, D) rows (unequal dimension counts), and a norm without
#: an identity (p < 0, +-inf) over an empty last dimension.
PYTORCH_REJECTS = [
    ([(3, 2), (3, 4), (3, 4)], {}, r"\(3, 2\).*\(3, 4\).*broadcast"),
    ([(3, 4), (3, 4), (2, 4)], {"swap": True}, r"\(3, 4\).*\(2, 4\)"),
    ([(4,), (3, 4), (3, 4)], {}, "dimensions"),
    ([(3, 0), (3, 0), (3, 0)], {"p": np.inf}, "p=inf.*empty"),
    ([(0, 0), (0, 0), (0, 0)], {"p": -np.inf}, "empty"),
    ([(3, 1), (3, 0), (1, 0)], {"p": -1.0}, r"empty.*\(3, 0\)"),
]


@pytest.mark.parametrize(("shapes", "options", "match"), PYTORCH_REJECTS, ids=str)
def test_what_pytorch_rejects_is_a_value_error(shapes, options, match, rng):
    arrays = [rng.standard_normal(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        lf.triplet_margin_loss.value_and_grad(*arrays, **options)
    if not options:
        with pytest.raises(ValueError, match=match):
            lf.triplet_margin_with_distance_loss(*arrays)
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError):
        torch.nn.functional.triplet_margin_loss(*map(torch.from_numpy, arrays), **options)


@pytest.mark.parametrize(
    ("shapes", "options"),
    [
        ([(5, 6)] * 3, {}),
        ([(5, 6)] * 3, {"swap": True, "p": 1.5}),
        ([(5, 6)] * 3, {"p": 1.0, "reduction": "none"}),
        ([(5, 6)] * 3, {"p": np.inf, "swap": True}),
        ([(5, 6)] * 3, {"p": -np.inf, "reduction": "none"}),
        ([(5, 6)] * 3, {"p": -1.0, "swap": True}),
        ([(5, 6)] * 3, {"p": 0.0}),
        ([(1, 6), (5, 6), (5, 6)], {"swap": True, "reduction": "none"}),
        ([(5, 1), (1, 6), (5, 6)], {"p": np.inf}),
        ([(2, 1, 6), (1, 3, 6), (1, 1, 6)], {"swap": True, "reduction": "none"}),
    ],
    ids=str,
)
def test_cuda_matches_the_cpu(shapes, options, rng):
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no GPU and no simulator")
    arrays = [rng.standard_normal(s) for s in shapes]
    full = np.broadcast_shapes(*shapes)[:-1]
    go = rng.standard_normal(full) if options.get("reduction") == "none" else None
    value, grads = lf.triplet_margin_loss.value_and_grad(*arrays, grad_output=go, **options)
    device = tuple(cuda.to_device(a) for a in arrays)
    d_go = None if go is None else cuda.to_device(go)
    d_value, d_grads = lf.triplet_margin_loss.value_and_grad(*device, grad_output=d_go, **options)
    d_value = d_value.copy_to_host() if hasattr(d_value, "copy_to_host") else d_value
    np.testing.assert_allclose(d_value, value, rtol=1e-12)
    for d, g, x in zip(d_grads, grads, arrays, strict=True):
        assert d.shape == x.shape
        np.testing.assert_allclose(d.copy_to_host(), g, rtol=1e-12, atol=1e-15)
