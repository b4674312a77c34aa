"""The CUDA kernels: every loss and option against the CPU kernels (themselves tested against
NumPy references, PyTorch and finite differences), bad input, dtypes, empty input, device
and host arrays, ``out=``, determinism, and the runtime's helpers.

Without a GPU these run under Numba's CUDA simulator (``tests/conftest.py`` sets
``NUMBA_ENABLE_CUDASIM=1`` before Numba is imported); the simulator runs every thread as a
Python thread, so shapes are tiny. On a machine with a GPU, ``NUMBA_ENABLE_CUDASIM=0 pytest
tests/test_cuda.py`` runs the same tests on the device, and the ``gpu``-marked ones too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numba
import numpy as np
import pytest
from numba import cuda
from numba.np import numpy_support

import lossforge as lf
from lossforge import KernelSpec, LossSpec, Prepared, dispatch, hookimpl, validate
from lossforge.runtime import cuda as rt

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

pytestmark = pytest.mark.skipif(
    not (SIMULATOR or cuda.is_available()),
    reason="no CUDA GPU, and Numba was imported before NUMBA_ENABLE_CUDASIM=1 was set",
)
needs_gpu = pytest.mark.skipif(
    SIMULATOR or not cuda.is_available(), reason="needs a real CUDA GPU (simulator off)"
)


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator():
    # The simulator's threads meet at barriers: a short switch interval makes them ~4x faster.
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(before)


@pytest.fixture(autouse=True, scope="module")
def _faithful_simulator():
    # Numba's device arrays reshape and ravel only contiguous arrays (they never copy); the
    # simulator's arrays are NumPy arrays that copy silently. Make them refuse as the real
    # ones do, so that a missing as_contiguous shows here. And fix a race in the simulator's
    # shared arrays (see _shared_array). Real device arrays refuse an ellipsis index too.
    if not SIMULATOR:
        yield
        return
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    def refusing(method):
        def strict(self, *args, **kwargs):
            if not self._ary.flags.c_contiguous:
                raise NotImplementedError("operation requires copying")
            return method(self, *args, **kwargs)

        return strict

    def no_ellipsis(self, key, value):
        # A real device array takes no ellipsis (seen on an H200, numba-cuda 0.30.4).
        if key is Ellipsis or (isinstance(key, tuple) and Ellipsis in key):
            raise TypeError("unsupported operand type(s) for +: 'ellipsis' and 'int'")
        return setitem(self, key, value)

    setitem = FakeCUDAArray.__setitem__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeCUDAArray, "__setitem__", no_ellipsis)
        patch.setattr(FakeCUDAArray, "reshape", refusing(FakeCUDAArray.reshape))
        patch.setattr(FakeCUDAArray, "ravel", refusing(FakeCUDAArray.ravel))
        patch.setattr(FakeCUDAShared, "array", _shared_array)
        yield


_shared_lock = threading.Lock()


def _shared_array(self, shape, dtype, alignment=None):
    """The simulator's ``cuda.shared.array`` (numba-cuda 0.30), with its race fixed: it finds
    a block's array by the calling line without a lock, so two threads of a block can each
    make their own "shared" array and a reduction through it goes wrong, now and then (seen
    under load). Also faster: the caller from its frame, not ``traceback.extract_stack``."""
    if shape == 0 or alignment is not None:
        raise NotImplementedError("dynamic or aligned shared arrays: not used by lossforge")
    if isinstance(dtype, numba.types.Type):
        dtype = numpy_support.as_dtype(dtype)
    frame = sys._getframe(1)
    caller = (frame.f_code.co_filename, frame.f_lineno)
    with _shared_lock:
        found = self._allocations.get(caller)
        if found is None:
            found = self._allocations[caller] = np.empty(shape, dtype)
    return found


# -- helpers ------------------------------------------------------------------------------


def dev(a):
    """A NumPy array (or None, or a scalar option) as a Numba device array."""
    if not isinstance(a, np.ndarray):
        return a
    return cuda.to_device(a if a.flags.c_contiguous else a.copy())


def host(a):
    if a is None or isinstance(a, (np.ndarray, np.generic, float)):
        return a
    assert rt.is_device_array(a), type(a)
    return a.copy_to_host()


TOLERANCE = {np.float64: 1e-12, np.float32: 2.5e-7, np.float16: 2e-3}


def assert_close(actual, expected):
    """``actual`` (CUDA) equals ``expected`` (CPU) up to the rounding of sums done in another
    order: 1e-12 relative in float64, float32/float16 rounding otherwise; same dtype and
    shape; nan where nan."""
    if isinstance(expected, np.ndarray):
        assert rt.is_device_array(actual), "arrays must stay on the device"
    else:
        assert isinstance(actual, np.generic), "a reduced value is a host NumPy scalar"
    expected = np.asarray(expected)
    actual = np.asarray(host(actual))
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    rtol = TOLERANCE[expected.dtype.type]
    scale = np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0)
    np.testing.assert_allclose(
        actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=rtol * scale
    )


def both(name, arrays, grad_output=None, **options):
    """(CPU value and gradients, CUDA value and gradients) of one call; the CUDA inputs are
    checked unchanged."""
    loss = lf.get(name)
    value, grad = loss.value_and_grad(*arrays, grad_output=grad_output, **options)
    device = [dev(a) for a in arrays]
    device_options = {k: dev(v) for k, v in options.items()}
    dvalue, dgrad = loss.value_and_grad(*device, grad_output=dev(grad_output), **device_options)
    for a, d in zip(arrays, device):
        np.testing.assert_array_equal(host(d), a)
    grads = grad if isinstance(grad, tuple) else (grad,)
    dgrads = dgrad if isinstance(dgrad, tuple) else (dgrad,)
    return (value, grads), (dvalue, dgrads)


def check(name, arrays, grad_output=None, **options):
    (value, grads), (dvalue, dgrads) = both(name, arrays, grad_output, **options)
    assert_close(dvalue, value)
    assert len(dgrads) == len(grads)
    for dg, g in zip(dgrads, grads):
        assert_close(dg, g)


# -- every loss and option against the CPU kernels ----------------------------------------


def _regression(rng, dtype):
    x = rng.normal(size=(4, 5)).astype(dtype)
    y = rng.normal(size=(4, 5)).astype(dtype)
    y[0, :2] = x[0, :2]  # ties: the l1 gradient is 0 there
    y[1, 0] = x[1, 0] + 0.5  # at smooth_l1's beta
    return x, y


def _probabilities(rng, dtype):
    x = rng.random((4, 5)).astype(dtype)
    x[0, :3] = [0.0, 1.0, 0.5]  # PyTorch's clamps
    return x, rng.random((4, 5)).astype(dtype)


def _logits(rng, dtype):
    x = (rng.normal(size=(4, 5)) * 4).astype(dtype)
    x[0, :2] = [1e4, -1e4]  # finite losses and gradients
    return x, (rng.random((4, 5)) > 0.5).astype(dtype)


def _multilabel(rng, dtype):
    return rng.normal(size=(4, 19)).astype(dtype), (rng.random((4, 19)) > 0.5).astype(dtype)


def _classes(rng, dtype, n=5, c=11, ignored=-100):
    x = (rng.normal(size=(n, c)) * 3).astype(dtype)
    t = rng.integers(0, c, n)
    t[1] = ignored
    return x, t


def _classes_k(rng, dtype):
    return rng.normal(size=(3, 4, 2, 3)).astype(dtype), rng.integers(0, 4, (3, 2, 3))


def _soft(rng, dtype, shape=(5, 11)):
    p = rng.random(shape)
    return rng.normal(size=shape).astype(dtype), (p / p.sum(1, keepdims=True)).astype(dtype)


def _pairs(rng, dtype):
    x1, x2 = rng.normal(size=(6, 9)).astype(dtype), rng.normal(size=(6, 9)).astype(dtype)
    x2[2] = -x1[2]  # cos = -1
    x1[3] = 0.0  # cos = 0 exactly: with margin 0, at the hinge of a target -1
    return x1, x2, np.array([1, -1, 1, -1, 0, 1])


def _pairs_nonzero(rng, dtype):
    x1, x2, t = _pairs(rng, dtype)
    return x1 + dtype(1), x2, t  # no zero vector: gradients within float16's range


def _weight(shape):
    return lambda rng, dtype: rng.random(shape).astype(dtype)


REDUCED = [
    # (name, arrays, options: values or functions of (rng, dtype))
    ("mse_loss", _regression, {}),
    ("mse_loss", _regression, {"weight": _weight((4, 5))}),
    ("l1_loss", _regression, {"weight": _weight((4, 5))}),
    ("smooth_l1_loss", _regression, {"beta": 0.5}),
    ("smooth_l1_loss", _regression, {"beta": 0.0}),
    ("huber_loss", _regression, {"delta": 0.7, "weight": _weight((4, 5))}),
    ("binary_cross_entropy", _probabilities, {"weight": _weight((5,))}),
    ("binary_cross_entropy_with_logits", _logits, {}),
    (
        "binary_cross_entropy_with_logits",
        _logits,
        {"pos_weight": _weight((5,)), "weight": _weight((4, 1))},
    ),
    ("multilabel_soft_margin_loss", _multilabel, {"weight": _weight((19,))}),
    (
        "multilabel_soft_margin_loss",
        lambda rng, dtype: (rng.normal(size=7).astype(dtype), np.ones(7, dtype)),
        {},
    ),
    ("cross_entropy", _classes, {}),
    (
        "cross_entropy",
        lambda rng, dtype: _classes(rng, dtype, ignored=3),
        {"weight": _weight((11,)), "label_smoothing": 0.2, "ignore_index": 3},
    ),
    ("cross_entropy", lambda rng, dtype: _classes(rng, dtype, 30, 3), {"label_smoothing": 0.1}),
    ("cross_entropy", lambda rng, dtype: _classes(rng, dtype, 3, 40), {"weight": _weight((40,))}),
    ("cross_entropy", _soft, {"weight": _weight((11,)), "label_smoothing": 0.1}),
    ("cross_entropy", _classes_k, {"weight": _weight((4,)), "ignore_index": 1}),
    ("cross_entropy", lambda rng, dtype: _soft(rng, dtype, (3, 4, 2, 3)), {}),
    (
        "cross_entropy",
        lambda rng, dtype: (rng.normal(size=6).astype(dtype), np.array(4)),
        {"label_smoothing": 0.3},
    ),
    ("nll_loss", _classes, {"weight": _weight((11,))}),
    ("nll_loss", _classes_k, {"ignore_index": 2}),
    ("cosine_embedding_loss", _pairs, {"margin": 0.0}),
    (
        "cosine_embedding_loss",
        lambda rng, dtype: (*_pairs(rng, dtype)[:2], np.array([1.0, -1, -1, 1, 1, -1])),
        {"margin": -0.5},
    ),
]


def _ids(case):
    name, _, options = case
    return "-".join([name, *options])


def _build(case, dtype, seed=7):
    name, make, options = case
    rng = np.random.default_rng(seed)
    arrays = make(rng, dtype)
    options = {k: (v(rng, dtype) if callable(v) else v) for k, v in options.items()}
    return name, arrays, options, rng


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", REDUCED, ids=[_ids(c) for c in REDUCED])
def test_value_and_gradient_match_the_cpu_float64(case, reduction):
    name, arrays, options, rng = _build(case, np.float64)
    go = None
    if reduction == "sum":
        go = 0.7
    elif reduction == "none":  # an upstream gradient of the value's shape
        shape = np.shape(lf.get(name)(*arrays, reduction="none", **options))
        go = rng.normal(size=shape)
    check(name, arrays, grad_output=go, reduction=reduction, **options)


@pytest.mark.parametrize("case", REDUCED, ids=[_ids(c) for c in REDUCED])
def test_value_and_gradient_match_the_cpu_float32(case):
    name, arrays, options, _ = _build(case, np.float32)
    check(name, arrays, reduction="mean", **options)


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cosine_similarity_matches_the_cpu(dim, dtype):
    rng = np.random.default_rng(dim + 3)
    x1, x2 = rng.normal(size=(3, 5, 4)).astype(dtype), rng.normal(size=(3, 5, 4)).astype(dtype)
    x1[0, :, 0] = 0  # a zero vector along dim 1: the eps clamp
    shape = np.delete(np.array(x1.shape), dim % 3)
    check("cosine_similarity", (x1, x2), dim=dim)
    check("cosine_similarity", (x1, x2), grad_output=rng.normal(size=shape).astype(dtype), dim=dim)


def test_value_only_and_gradient_only_calls():
    rng = np.random.default_rng(0)
    x, t = _classes(rng, np.float64)
    for reduction in ("none", "mean"):
        assert_close(
            lf.cross_entropy(dev(x), dev(t), reduction=reduction),
            lf.cross_entropy(x, t, reduction=reduction),
        )
    assert_close(lf.cross_entropy.grad(dev(x), dev(t)), lf.cross_entropy.grad(x, t))
    x1, x2, target = _pairs(rng, np.float64)
    g = lf.cosine_embedding_loss.grad(x1, x2, target, reduction="sum")
    dg = lf.cosine_embedding_loss.grad(dev(x1), dev(x2), dev(target), reduction="sum")
    assert_close(dg[0], g[0])
    assert_close(dg[1], g[1])


def test_partial_pairs_match_the_cpu():
    rng = np.random.default_rng(1)
    x, t = _classes(rng, np.float64)
    w = rng.random(11)
    total, denominator = lf.cross_entropy.partial(x, t, weight=w)
    dtotal, ddenominator = lf.cross_entropy.partial(dev(x), dev(t), weight=dev(w))
    assert isinstance(dtotal, float) and isinstance(ddenominator, float)
    np.testing.assert_allclose([dtotal, ddenominator], [total, denominator], rtol=1e-13)
    x, y = _regression(rng, np.float64)
    w = rng.random((4, 5))
    np.testing.assert_allclose(
        lf.mse_loss.partial(dev(x), dev(y), weight=dev(w)),
        lf.mse_loss.partial(x, y, weight=w),
        rtol=1e-13,
    )


def test_against_independent_references():
    """Two losses straight against float64 NumPy formulas written here."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    value, grad = lf.mse_loss.value_and_grad(dev(x), dev(y))
    np.testing.assert_allclose(value, np.mean((x - y) ** 2), rtol=1e-14)
    np.testing.assert_allclose(host(grad), 2 * (x - y) / x.size, rtol=1e-14)
    z, t = rng.normal(size=(6, 7)) * 5, rng.integers(0, 7, 6)
    value, grad = lf.cross_entropy.value_and_grad(dev(z), dev(t), reduction="sum")
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(value, -np.log(p[np.arange(6), t]).sum(), rtol=1e-13)
    p[np.arange(6), t] -= 1
    np.testing.assert_allclose(host(grad), p, rtol=1e-12, atol=1e-15)


# -- dtypes, empty input, layouts ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, make",
    [
        ("mse_loss", _regression),
        ("cross_entropy", _classes),
        ("cosine_embedding_loss", _pairs_nonzero),
    ],
)
def test_float16_in_float16_out(name, make):
    arrays = make(np.random.default_rng(3), np.float16)
    check(name, arrays, reduction="none")
    check(name, arrays)


def test_nan_and_inf_propagate():
    x = np.array([np.nan, 1.0, np.inf, 0.0])
    check("mse_loss", (x, np.zeros(4)), reduction="none")
    value, grad = lf.mse_loss.value_and_grad(dev(x), dev(np.zeros(4)))
    assert np.isnan(value) and np.isnan(host(grad)[0])


def test_empty_inputs():
    for reduction, expected in (("mean", np.nan), ("sum", 0.0)):
        value, grad = lf.mse_loss.value_and_grad(
            dev(np.zeros(0)), dev(np.zeros(0)), reduction=reduction
        )
        np.testing.assert_equal(value, expected)
        assert host(grad).shape == (0,)
    check("mse_loss", (np.zeros((0, 3)), np.zeros((0, 3))), reduction="none")
    check("cross_entropy", (np.zeros((0, 4)), np.zeros(0, np.int64)), reduction="sum")
    check("cross_entropy", (np.zeros((0, 4, 2)), np.zeros((0, 2), np.int64)), reduction="none")
    check("nll_loss", (np.zeros((0, 4)), np.zeros(0, np.int64)), reduction="sum")
    check("multilabel_soft_margin_loss", (np.zeros((0, 4)), np.zeros((0, 4))), reduction="none")
    check("cosine_similarity", (np.zeros((0, 4)), np.zeros((0, 4))))
    check("cosine_embedding_loss", (np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0)))
    check("binary_cross_entropy", (np.zeros((2, 0)), np.zeros((2, 0))), reduction="sum")


class Foreign:
    """A device array of another library: only ``__cuda_array_interface__`` (under the
    simulator, device memory is host memory), with any strides."""

    def __init__(self, array):
        self.array = array
        info = array.__array_interface__
        self.__cuda_array_interface__ = {
            "shape": array.shape,
            "typestr": array.dtype.str,
            "data": info["data"],
            "strides": info["strides"],
            "version": 3,
        }


@pytest.mark.skipif(not SIMULATOR, reason="fakes a device pointer with a host pointer")
def test_foreign_arrays_with_any_strides_are_read_in_place():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(6, 8, 3))
    x, y = base[::2, 1:, 0].T, base[1::2, 1:, 2].T  # transposed, strided views
    value, grad = lf.mse_loss.value_and_grad(Foreign(x), Foreign(y), reduction="sum")
    expected_value, expected_grad = lf.mse_loss.value_and_grad(x, y, reduction="sum")
    assert_close(value, expected_value)
    assert_close(grad, expected_grad)
    # zero-copy: a change to the foreign memory is seen by the wrapped array
    wrapped = rt.as_device_array(Foreign(base))
    base[0, 0, 0] = 123.0
    assert wrapped.copy_to_host()[0, 0, 0] == 123.0
    z, t = rng.normal(size=(3, 6)), np.array([1, 2, 5])
    zf = np.asfortranarray(z)
    value, grad = lf.cross_entropy.value_and_grad(Foreign(zf), Foreign(t.astype(np.int32)))
    expected_value, expected_grad = lf.cross_entropy.value_and_grad(z, t)
    assert_close(value, expected_value)
    assert_close(grad, expected_grad)


def test_strided_device_views_and_broadcast_weights():
    rng = np.random.default_rng(5)
    x, y = dev(rng.normal(size=(5, 4))), dev(rng.normal(size=(5, 4)))
    xt, yt = rt.moveaxis(x, 0, 1), rt.moveaxis(y, 0, 1)  # (4, 5) views, not contiguous
    assert not rt.is_c_contiguous(xt)
    value, grad = lf.huber_loss.value_and_grad(xt, yt, reduction="none")
    expected = lf.huber_loss.value_and_grad(host(x).T, host(y).T, reduction="none")
    assert_close(value, expected[0])
    assert_close(grad, expected[1])
    z, p = dev(rng.normal(size=12))[::2], dev(rng.random(12))[1::2]  # 1-D, strided
    for target in (dev(np.array(3)), p):
        value, grad = lf.cross_entropy.value_and_grad(z, target, label_smoothing=0.1)
        expected = lf.cross_entropy.value_and_grad(host(z), host(target), label_smoothing=0.1)
        assert_close(value, expected[0])
        assert_close(grad, expected[1])
    w = rt.broadcast_to(dev(rng.random(5)), (4, 5))
    value = lf.binary_cross_entropy_with_logits(xt, dev(rng.random((4, 5))), weight=w)
    assert np.isfinite(value)


# -- out=, grad_output on the device, determinism ------------------------------------------


def test_out_receives_the_gradient():
    rng = np.random.default_rng(6)
    x, y = _regression(rng, np.float64)
    out = cuda.device_array(x.shape, np.float64)
    _, grad = lf.mse_loss.value_and_grad(dev(x), dev(y), out=out)
    assert grad is out
    np.testing.assert_allclose(host(out), lf.mse_loss.grad(x, y), rtol=1e-12)
    out16 = cuda.device_array(x.shape, np.float16)
    x16, y16 = x.astype(np.float16), y.astype(np.float16)
    grad = lf.mse_loss.grad(dev(x16), dev(y16), out=out16)
    assert grad is out16
    np.testing.assert_allclose(host(out16), lf.mse_loss.grad(x16, y16), rtol=2e-3)
    x1, x2, t = _pairs(rng, np.float64)
    outs = (cuda.device_array(x1.shape), cuda.device_array(x1.shape))
    _, grads = lf.cosine_embedding_loss.value_and_grad(dev(x1), dev(x2), dev(t), out=outs)
    assert grads[0] is outs[0] and grads[1] is outs[1]
    np.testing.assert_allclose(
        host(outs[1]), lf.cosine_embedding_loss.grad(x1, x2, t)[1], rtol=1e-12, atol=1e-15
    )
    with pytest.raises(ValueError, match=r"must have shape \(4, 5\), got \(5, 4\)"):
        lf.mse_loss.grad(dev(x), dev(y), out=cuda.device_array((5, 4)))
    with pytest.raises(TypeError, match="must have dtype float64, got float32"):
        lf.mse_loss.grad(dev(x), dev(y), out=cuda.device_array((4, 5), np.float32))
    with pytest.raises(TypeError, match="must be a CUDA array, got ndarray"):
        lf.mse_loss.grad(dev(x), dev(y), out=np.empty((4, 5)))
    with pytest.raises(ValueError, match="C-contiguous CUDA array"):
        lf.mse_loss.grad(dev(x), dev(y), out=rt.moveaxis(cuda.device_array((5, 4)), 0, 1))


def test_grad_output_on_the_device():
    rng = np.random.default_rng(7)
    x, t = _classes(rng, np.float64)
    expected = lf.cross_entropy.grad(x, t, grad_output=2.5)
    assert_close(lf.cross_entropy.grad(dev(x), dev(t), grad_output=dev(np.array(2.5))), expected)
    with pytest.raises(ValueError, match="must have the value's shape"):
        lf.cross_entropy.grad(dev(x), dev(t), reduction="none", grad_output=dev(np.ones(4)))


@pytest.mark.parametrize("tail", [0, 3, 4 * rt.THREADS * rt.MAX_BLOCKS - 1])
def test_grid_stride_rounds_and_their_tail(tail):
    # The element-wise kernels take four elements a thread a round, then one at a time:
    # sizes of whole rounds, and rounds plus a tail shorter than a grid and up to four grids.
    grid = rt.THREADS * rt.MAX_BLOCKS
    n = 2 * 4 * grid + tail
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=n), rng.normal(size=n)
    check("mse_loss", (x, y), grad_output=rng.normal(size=n), reduction="none")
    check("huber_loss", (x, y), weight=rng.random(n))
    p = rng.random(n)
    check("binary_cross_entropy", (p, rng.random(n)))
    check("binary_cross_entropy_with_logits", (x, rng.random(n)), pos_weight=rng.random(n))
    # Two in one thread's round (its second and fourth elements), one in the last element.
    p[[grid + 5, 3 * grid + 5, n - 1]] = [1.5, -2.0, 3.0]
    with pytest.raises(ValueError, match=r"input .* found 1\.5"):
        lf.binary_cross_entropy(dev(p), dev(rng.random(n)))
    x, t = _classes(np.random.default_rng(12), np.float64, n=n // 3 + 1, c=3, ignored=2)
    check("nll_loss", (x, t), ignore_index=2)


def test_partials_read_back_are_reused_and_carry_nothing_over():
    # A reduced call's per-block partials are reused by this thread's next launch of the same
    # grid once read back: a flagged element of a failed call must not leak into the next.
    rng = np.random.default_rng(13)
    n = 200
    p, y = rng.random(n), rng.random(n)
    p[150] = 1.5
    with pytest.raises(ValueError, match=r"input .* found 1\.5"):
        lf.binary_cross_entropy(dev(p), dev(rng.random(n)))
    used = rt._finished()[rt.blocks_for(n)]
    p[150] = 0.5
    check("binary_cross_entropy", (p, y))
    check("mse_loss", (p, y), reduction="sum")
    assert rt._finished()[rt.blocks_for(n)] is used


def test_deterministic_from_run_to_run():
    rng = np.random.default_rng(8)
    x, t = _classes(rng, np.float32, n=40, c=7)
    first = lf.cross_entropy.value_and_grad(dev(x), dev(t), label_smoothing=0.1)
    second = lf.cross_entropy.value_and_grad(dev(x), dev(t), label_smoothing=0.1)
    assert first[0].tobytes() == second[0].tobytes()
    assert host(first[1]).tobytes() == host(second[1]).tobytes()
    y = rng.normal(size=200).astype(np.float32)
    first = lf.l1_loss(dev(y), dev(y[::-1].copy()))
    assert first.tobytes() == lf.l1_loss(dev(y), dev(y[::-1].copy())).tobytes()


# -- bad input: the CPU's exceptions -------------------------------------------------------


def _bad_cases():
    rng = np.random.default_rng(9)
    x, t = _classes(rng, np.float64)
    high, low = t.copy(), t.copy()
    high[2], low[4] = 11, -7
    probabilities = rng.random((3, 4))
    outside = probabilities.copy()
    outside[1, 2] = 1.5
    wrapping = t.astype(np.uint64)
    wrapping[3] = 2**64 - 100  # -100 as int64: the default ignore_index
    return [
        ("cross_entropy", (x, wrapping), {}),
        ("nll_loss", (x, t), {"ignore_index": 2**63}),
        ("binary_cross_entropy", (probabilities, outside), {}),
        ("binary_cross_entropy", (outside, -probabilities), {"reduction": "none"}),
        ("cross_entropy", (x, high), {}),
        ("cross_entropy", (x, low), {"weight": rng.random(11)}),
        ("nll_loss", (x, high), {"ignore_index": 0}),
        ("cross_entropy", (x, t), {"weight": rng.random(10)}),
        ("cross_entropy", (x, t[:4]), {}),
        ("cross_entropy", (x, t.astype(np.float64)), {}),
        ("cross_entropy", (x, t), {"label_smoothing": 1.5}),
        ("binary_cross_entropy", (outside, probabilities), {}),
        ("binary_cross_entropy", (-probabilities, probabilities), {"reduction": "none"}),
        ("binary_cross_entropy_with_logits", (x, x), {"pos_weight": rng.random(4)}),
        ("mse_loss", (x, x[:, :4]), {}),
        ("mse_loss", (x.astype(np.int64), x), {}),
        ("mse_loss", (x, x), {"reduction": "avg"}),
        ("huber_loss", (x, x), {"delta": -1.0}),
        ("huber_loss", (x, x), {"weight": np.ones(3)}),
        ("multilabel_soft_margin_loss", (x[None], x[None]), {}),
        ("cosine_similarity", (x, x), {"dim": 2}),
        ("cosine_embedding_loss", (x, x, t[:3].astype(np.float64)), {}),
        ("cosine_embedding_loss", (x, x, t.astype(np.complex128)), {}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_gets_the_cpu_exception(case):
    name, arrays, options = _bad_cases()[case]
    with pytest.raises(Exception) as on_cpu:
        lf.get(name).value_and_grad(*arrays, **options)
    device = [dev(a) for a in arrays]
    device_options = {k: dev(v) for k, v in options.items()}
    with pytest.raises(type(on_cpu.value)) as on_cuda:
        lf.get(name).value_and_grad(*device, **device_options)
    assert str(on_cuda.value) == str(on_cpu.value)
    for a, d in zip(arrays, device):
        np.testing.assert_array_equal(host(d), a)


def test_mixing_host_and_device_arrays():
    x = np.ones(3)
    with pytest.raises(ValueError, match="same device: got a mix of host arrays and CUDA"):
        lf.mse_loss(x, dev(x))
    with pytest.raises(ValueError, match="same device"):
        lf.cosine_embedding_loss(dev(x), dev(x), np.array(1.0))
    with pytest.raises(ValueError, match="backend='cpu' was asked for"):
        lf.mse_loss(dev(x), dev(x), backend="cpu")


def test_a_device_array_refusing_its_interface_is_still_a_device_array():
    class RequiresGrad:  # what a PyTorch CUDA tensor that requires grad does
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    assert dispatch.backend_of([RequiresGrad(), dev(np.ones(2))]) == "cuda"
    with pytest.raises(ValueError, match="same device"):
        dispatch.backend_of([RequiresGrad(), np.ones(2)])


def test_backend_cuda_forced_on_host_arrays():
    rng = np.random.default_rng(10)
    x, t = _classes(rng, np.float32)
    w = rng.random(11).astype(np.float32)
    value, grad = lf.cross_entropy.value_and_grad(x, t, weight=w, backend="cuda")
    expected = lf.cross_entropy.value_and_grad(x, t, weight=w)
    assert_close(value, expected[0])
    assert_close(grad, expected[1])  # a device array: results stay where the work was done
    big = x.astype(x.dtype.newbyteorder(">"))  # host layouts are normalised before the copy
    assert_close(
        lf.cross_entropy(big, t, reduction="none", backend="cuda"),
        lf.cross_entropy(x, t, reduction="none"),
    )
    with pytest.raises(TypeError, match="input must be a float16, float32 or float64 array"):
        lf.mse_loss(np.array(["a"]), np.array(["b"]), backend="cuda")


def test_a_loss_without_a_cuda_kernel():
    def prepare(arrays, options, backend):
        (x,), _, dtype, dtypes, shape = validate.elementwise(arrays, ("input",), None, backend)
        return Prepared((x,), (), options["reduction"], 1.0, shape, (shape,), dtype, dtypes)

    class Plugin:
        @hookimpl
        def lossforge_losses(self):
            yield LossSpec(
                "cpu_only_loss", "test", ("input",), ("input",), {"reduction": "sum"}, prepare
            )

        @hookimpl
        def lossforge_kernels(self):
            yield KernelSpec("cpu_only_loss", "cpu", lambda p, *args: 0.0)

    lf.registry.register(Plugin(), "cpu-only")
    try:
        assert lf.get("cpu_only_loss").backends == ("cpu",)
        assert lf.get("cpu_only_loss")(np.ones(3)) == 0.0
        with pytest.raises(NotImplementedError, match="'cpu_only_loss' has no cuda kernel"):
            lf.get("cpu_only_loss")(dev(np.ones(3)))
    finally:
        lf.registry.unregister("cpu-only")


# -- the runtime ----------------------------------------------------------------------------


def test_runtime_sums_views_and_launch_configuration():
    rng = np.random.default_rng(11)
    a = rng.normal(size=1000)
    assert rt.total(dev(a)) == pytest.approx(np.sum(a), rel=1e-14)
    assert rt.total(dev(a)) == rt.total(dev(a))
    assert rt.total(dev(np.zeros(0))) == 0.0
    b = rng.normal(size=(2, 3, 4)).astype(np.float32)
    moved = rt.moveaxis(dev(b), 1, -1)
    np.testing.assert_array_equal(
        host(rt.as_contiguous(moved, np.float64)), np.moveaxis(b, 1, -1).astype(np.float64)
    )
    np.testing.assert_array_equal(
        host(rt.broadcast_to(dev(b[0, 0]), (3, 4))), np.tile(b[0, 0], (3, 1))
    )
    with pytest.raises(ValueError, match="cannot broadcast"):
        rt.broadcast_to(dev(b[0, 0]), (3, 5))
    assert host(rt.astype(dev(b), np.float16)).dtype == np.float16
    for rows, columns in [(1, 1), (10, 3), (5, 1000), (100000, 7)]:
        lanes, blocks = rt.rows_config(rows, columns)
        assert lanes & (lanes - 1) == 0 and 1 <= lanes <= rt.THREADS
        assert lanes >= min(columns, rt.THREADS) and lanes < 2 * max(columns, 1)
        assert 1 <= blocks <= rt.MAX_BLOCKS
    assert rt.blocks_for(0) == 1 and rt.blocks_for(10**9) == rt.MAX_BLOCKS


def test_import_lossforge_imports_no_cuda_stack():
    code = (
        "import sys, numpy as np, lossforge, lossforge.bench_cuda; "
        "lossforge.mse_loss(np.ones(3), np.ones(3)); "
        "assert 'numba.cuda' not in sys.modules and 'lossforge.runtime.cuda' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_kernels_compile_for_the_cuda_target():
    """The simulator runs kernels as Python; this types and lowers each one for the real CUDA
    target (and compiles it to PTX where libNVVM is installed), in a fresh process."""
    script = Path(__file__).with_name("cuda_compile.py")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-5000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    assert " 0 failed" in done.stdout


# -- python -m lossforge.bench_cuda -------------------------------------------------------------


@pytest.mark.skipif(not SIMULATOR, reason="checks the refusal under the simulator")
def test_cuda_benchmark_refuses_the_simulator(capsys):
    from lossforge import bench_cuda

    assert bench_cuda.main(["--sizes", "1000"]) == 2
    assert "needs a real GPU" in capsys.readouterr().err
    assert bench_cuda.main(["--loss", "no_such_loss"]) == 2  # a usage error, GPU or not
    assert "unknown loss 'no_such_loss'" in capsys.readouterr().err


def test_cuda_benchmark_cases_cover_every_cuda_loss_dtype_and_size():
    from lossforge import bench_cuda

    with_cuda = {n for n in lf.list_losses() if "cuda" in lf.get(n).backends}
    selected = bench_cuda.cases()
    assert {c.name for c in selected} == with_cuda
    for name in with_cuda:
        declared = [dict(v) for v in lf.get(name).spec.example_variants] or [{}]
        timed = [
            (c.variant, c.size, c.dtype) for c in selected if c.name == name and not c.overhead
        ]
        expected = [
            (v, n, d) for d in ("float32", "float64") for v in declared for n in (2**20, 2**26)
        ]
        assert sorted(map(repr, timed)) == sorted(map(repr, expected))
        overhead = [(c.variant, c.size, c.dtype) for c in selected if c.name == name and c.overhead]
        assert overhead == [(declared[0], 1024, "float32"), (declared[0], 1024, "float64")]
    one = bench_cuda.cases(["cross_entropy"], [100], ["float64"], 0, {"classes": 7})
    assert one == [bench_cuda.Case("cross_entropy", 100, "float64", {"classes": 7})]
    # An example that does not take the keyword: the case is left out, with a message.
    messages = []
    wrong = bench_cuda.cases(["mse_loss"], [100], ["float64"], 0, {"classes": 7})
    assert bench_cuda.run(wrong, repeat=1, progress=messages.append) == []
    assert "mse_loss" in messages[0] and "left out" in messages[0]
    with pytest.raises(ValueError, match="unknown loss"):
        bench_cuda.cases(["no_such_loss"])


def _bench_rows(names, dtype, overhead_size):
    """One timed call a row under the simulator, PyTorch on the CPU as the peer (its value and
    gradients are compared with the CUDA kernels' as on a GPU)."""
    torch = pytest.importorskip("torch")
    from lossforge import bench_cuda

    selected = [
        c
        for c in bench_cuda.cases(names, [48], [dtype], overhead_size)
        if c.overhead or c.variant == (lf.get(c.name).spec.example_variants or [{}])[0]
    ]
    rows = bench_cuda.run(selected, repeat=1, min_time=0.0, torch=torch, torch_device="cpu")
    assert len(rows) == len(selected)
    return rows


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # kl_div's, as PyTorch's
def test_cuda_benchmark_runs_every_loss_and_agrees_with_torch():
    from lossforge import bench_cuda, inputs

    torch = pytest.importorskip("torch")
    # ctc_loss is left out: the simulator runs its 200 time steps of barriers as Python
    # threads, ~6 s a call; the other losses take ~0.2 s.
    names = [n for n in lf.list_losses() if "cuda" in lf.get(n).backends and n != "ctc_loss"]
    rows = _bench_rows(names, "float64", 0)
    assert [r["loss"] for r in rows] == names
    for r in rows:
        loss = lf.get(r["loss"])
        arrays = inputs.draw(loss, 48, "float64", 0, r["variant"])
        _, grads = loss.value_and_grad(*arrays)  # on the CPU: the gradients a pass writes
        grads = grads if isinstance(grads, tuple) else (grads,)
        assert r["bytes"] == sum(a.nbytes for a in arrays) + sum(g.nbytes for g in grads)
        assert r["shape"] == list(arrays[0].shape) and r["lossforge_s"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / r["lossforge_s"] / 1e9)
        if hasattr(torch.nn.functional, r["loss"]):
            assert r["torch"]["ok"], r
            assert r["torch"]["ratio"] == pytest.approx(r["torch"]["s"] / r["lossforge_s"])
        else:
            assert r["torch"] is None
    table = bench_cuda.format_table(rows, 3350.0).splitlines()
    assert table[1].split() == " ".join(bench_cuda.BANDWIDTH_COLUMNS).split()
    assert len(table) == 2 + len(rows) and not any(" !" in line for line in table)
    mse = next(line.split() for line in table if line.startswith("mse_loss "))
    assert mse[:4] == ["mse_loss", "-", "6x8", "float64"] and mse[-1].endswith("x")
    dice = next(line.split() for line in table if line.startswith("dice_loss "))
    assert dice[-2:] == ["-", "-"]  # PyTorch has no dice_loss


def test_cuda_benchmark_host_overhead_rows():
    from lossforge import bench_cuda

    rows = _bench_rows(["mse_loss", "cosine_similarity", "cross_entropy"], "float32", 256)
    assert [(r["loss"], r["overhead"]) for r in rows] == [
        (name, overhead)
        for name in ("mse_loss", "cosine_similarity", "cross_entropy")
        for overhead in (False, True)
    ]
    assert rows[1]["shape"] == [32, 8] and rows[3]["shape"] == [2, 128]
    assert all(r["torch"]["ok"] and r["torch"]["s"] > 0 for r in rows)
    assert json.loads(json.dumps(rows)) == rows  # what --json writes
    table = bench_cuda.format_table(rows, 3350.0).splitlines()
    at = table.index("host overhead: wall time per call, a synchronization each")
    assert table[at + 1].split() == " ".join(bench_cuda.OVERHEAD_COLUMNS).split()
    cells = [line.split() for line in table[at + 2 :]]
    assert [c[:3] for c in cells] == [
        ["mse_loss", "32x8", "float32"],
        ["cosine_similarity", "2x128", "float32"],
        ["cross_entropy", "25x10", "float32"],
    ]
    for c, r in zip(cells, rows[1::2]):
        assert float(c[3]) == pytest.approx(r["lossforge_s"] * 1e6, abs=0.1)
        assert c[5] == f"{r['torch']['s'] / r['lossforge_s']:.1f}x"


@needs_gpu
def test_cuda_benchmark_on_a_gpu(capsys):
    from lossforge import bench_cuda

    argv = ["--loss", "mse_loss", "--loss", "cross_entropy", "--sizes", "4096"]
    assert bench_cuda.main([*argv, "--overhead-size", "1024", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert " ".join(bench_cuda.BANDWIDTH_COLUMNS) in " ".join(out.split())
    assert " ".join(bench_cuda.OVERHEAD_COLUMNS) in " ".join(out.split())
    assert " !" not in out


# -- a real GPU: PyTorch and CuPy arrays -------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cuda_tensors_round_trip(dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs PyTorch built with CUDA")
    x = torch.randn(64, 10, dtype=getattr(torch, dtype), device="cuda", requires_grad=True)
    t = torch.randint(0, 10, (64,), device="cuda")
    value, grad = lf.cross_entropy.value_and_grad(x, t, reduction="none")
    assert isinstance(value, torch.Tensor) and isinstance(grad, torch.Tensor)
    assert grad.device == x.device and grad.dtype == x.dtype
    expected = torch.nn.functional.cross_entropy(x, t, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected, x, torch.ones_like(expected))
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad, expected_grad)
    with torch.cuda.stream(torch.cuda.Stream()):
        mean = lf.cross_entropy(x, t)
    assert abs(float(mean) - float(expected.mean())) < 1e-5


@pytest.mark.gpu
@needs_gpu
def test_cupy_arrays_round_trip():
    cupy = pytest.importorskip("cupy")
    x, y = cupy.random.rand(1000), cupy.random.rand(1000)
    value, grad = lf.mse_loss.value_and_grad(x, y, reduction="none")
    assert isinstance(value, cupy.ndarray) and isinstance(grad, cupy.ndarray)
    cupy.testing.assert_allclose(grad, 2 * (x - y))
