"""Every registered loss passes the conformance kit that plugin authors use, and the kit fails
on planted bugs: each mutation test below registers a loss or kernel that is wrong in one way
only, and checks that the kit names the loss and the check that catches it."""

from __future__ import annotations

import dataclasses

import numba
import numpy as np
import pytest
from lossforge.plugins import DEFAULT_PLUGINS

import lossforge as lf
from lossforge import KernelSpec, LossSpec, hookimpl, testing
from lossforge.registry import Registry
from lossforge.runtime import mathfn
from lossforge.runtime.cpu import threads
from lossforge.testing import CHECKS, OPTION_CHECKS, check_loss, parametrize_losses


@parametrize_losses()
def test_check_loss(loss_name):
    ran = set(check_loss(loss_name))
    loss = lf.get(loss_name)
    optional = {"reference", "reductions"}
    if not testing._has_hessian(loss):
        optional.add("hessian")
    assert set(CHECKS) - optional <= ran  # cuda included: it is checkable
    option_sets = loss.spec.option_sets
    if loss.plugin in dict(DEFAULT_PLUGINS):  # (an installed example plugin may run too)
        assert option_sets, "every built-in loss declares option sets"
    for option_set in option_sets:
        label = testing._describe(option_set)
        assert {f"{c} [{label}]" for c in OPTION_CHECKS if c in ran} <= ran


def test_check_loss_reports_a_broken_loss(monkeypatch):
    loss = lf.get("mse_loss")
    reference = loss.spec.reference
    broken = type(loss.spec)(
        **{**loss.spec.__dict__, "reference": lambda x, y, **_: 2 * reference(x, y)}
    )
    monkeypatch.setattr(loss, "spec", broken)
    with pytest.raises(AssertionError, match=r"check_loss\('mse_loss'\): reference: float64 value"):
        check_loss("mse_loss", checks=["reference"])


def test_an_option_set_entry_named_after_an_argument_replaces_that_array():
    loss = lf.get("cross_entropy")
    probabilities = loss.spec.option_sets[2]
    arrays, options = testing._example(
        loss, np.random.default_rng(0), 64, np.float32, probabilities
    )
    assert arrays[1].dtype == np.float32 and arrays[1].shape == arrays[0].shape
    assert np.allclose(arrays[1].sum(axis=1), 1) and "target" not in options
    assert options["label_smoothing"] == 0.1  # the example's options stay


# -- planted bugs --------------------------------------------------------------------------
def registry_with(*plugins):
    """A registry of the regression family and ``plugins`` (as tests/test_plugins.py)."""
    import lossforge.plugins.regression

    registry = Registry(group=None, defaults=False)
    registry.register(lossforge.plugins.regression, "regression")
    for plugin in plugins:
        registry.register(plugin, type(plugin).__name__.lower())
    return registry


class WeightlessGradient:
    """mse_loss's own CPU kernel, except that its gradient forgets the weight: right with the
    default options, wrong with a weight."""

    @hookimpl(tryfirst=True)
    def lossforge_kernels(self):
        from lossforge.plugins.regression import KERNELS

        regression = KERNELS["mse_loss"][0].cpu

        def kernel(p, loss_out, grads, grad_output, scale):
            total = regression(p, loss_out, None, grad_output, scale)
            if grads is not None:
                x, y, _, a = p.arrays
                unweighted = dataclasses.replace(p, arrays=(x, y, None, a))  # no weight
                regression(unweighted, None, grads, grad_output, scale)
            return total

        yield KernelSpec("mse_loss", "cpu", kernel)


def test_kit_catches_a_gradient_wrong_under_an_option_only():
    loss = registry_with(WeightlessGradient()).get("mse_loss")
    x, y, w = np.array([1.0, 2.0]), np.zeros(2), np.array([3.0, 0.5])
    assert np.array_equal(loss.grad(x, y, reduction="sum"), 2 * x)  # right without weight
    assert not np.allclose(loss.grad(x, y, weight=w, reduction="sum"), 2 * w * x)  # the bug
    assert "gradient" in check_loss(loss, checks=["gradient"], option_sets=())
    with pytest.raises(
        AssertionError, match=r"check_loss\('mse_loss'\): gradient \[_weight\]: gradient of input"
    ):
        check_loss(loss, checks=["reference", "gradient"])


@numba.njit(parallel=True)
def _prange_sum(x):
    # Numba's own prange reduction: each thread adds its share, so the order of the additions
    # (and the rounding) depends on the thread count
    s = 0.0
    for i in numba.prange(x.size):
        s += x[i]
    return s


def _magnitudes(rng, size, dtype):
    # differences from 1e-6 to 1e6: squared losses whose sum's rounding depends on its order
    shape = (size // 8, 8)
    x = rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 7, shape)
    return (x.astype(dtype), np.zeros(shape, dtype)), {}


class ThreadDependentSum:
    """A copy of mse_loss whose total is a plain prange sum of its per-element losses."""

    @hookimpl
    def lossforge_losses(self):
        mse = lf.get("mse_loss").spec
        yield LossSpec(
            **{**mse.__dict__, "name": "prange_mse", "example": _magnitudes, "option_sets": ()}
        )

    @hookimpl
    def lossforge_kernels(self):
        from lossforge.plugins.regression import KERNELS

        regression = KERNELS["mse_loss"][0].cpu

        def kernel(p, loss_out, grads, grad_output, scale):
            losses = np.empty(p.value_shape, np.float64) if loss_out is None else loss_out
            regression(p, losses, grads, grad_output, scale)
            return float(_prange_sum(losses.ravel().astype(np.float64)))

        yield KernelSpec("prange_mse", "cpu", kernel)


def test_kit_catches_a_sum_that_depends_on_the_thread_count():
    loss = registry_with(ThreadDependentSum()).get("prange_mse")
    (x, _), _ = _magnitudes(np.random.default_rng(0), testing.THREADS_SIZE, np.float64)
    sums = []
    for n in (1, 2):
        with threads(n):
            sums.append(_prange_sum((x * x).ravel()))
    assert sums[0] != sums[1]  # the planted bug is real on this machine
    assert {"reference", "reductions"} <= set(check_loss(loss, checks=["reference", "reductions"]))
    with pytest.raises(
        AssertionError,
        match=r"check_loss\('prange_mse'\): threads: float64 sum: value not bitwise equal",
    ):
        check_loss(loss, checks=["threads"])


class CudaOffByOnePercent:
    """mse_loss's own CUDA kernel, its sum scaled by 1.01."""

    @hookimpl(tryfirst=True)
    def lossforge_kernels(self):
        from lossforge.plugins.regression import KERNELS

        regression = KERNELS["mse_loss"][0].cuda
        yield KernelSpec("mse_loss", "cuda", lambda p, *args: 1.01 * regression(p, *args))


def test_kit_catches_a_cuda_kernel_that_disagrees_with_the_cpu():
    loss = registry_with(CudaOffByOnePercent()).get("mse_loss")
    with pytest.raises(
        AssertionError, match=r"check_loss\('mse_loss'\): cuda: float64 CUDA value vs CPU"
    ):
        check_loss(loss, checks=["cuda"])


def test_kit_fails_when_a_cuda_kernel_cannot_be_checked(monkeypatch):
    from numba import cuda

    assert "cuda" in check_loss("mse_loss", checks=["cuda"], option_sets=())
    monkeypatch.setattr(cuda, "is_available", lambda: False)  # no GPU, no simulator
    with pytest.raises(
        AssertionError,
        match=r"check_loss\('mse_loss'\): cuda: the loss has a CUDA kernel that could not be "
        r"checked: no usable GPU",
    ):
        check_loss("mse_loss", checks=["cuda"])
    assert check_loss("mse_loss", checks=["cuda"], require_cuda=False) == []
    cpu_only = registry_with(ThreadDependentSum()).get("prange_mse")  # nothing to check
    assert check_loss(cpu_only, checks=["cuda"]) == []


class HalfHessian:
    """mse_loss's own kernels, with a Hessian of 1 where it is 2."""

    @hookimpl(tryfirst=True)
    def lossforge_kernels(self):
        from lossforge.plugins.regression import mse

        from lossforge.kernels import Elementwise

        yield from Elementwise(mse, hessian=_unit).specs("mse_loss")


def _unit(x, y, a, p):
    return 1.0


def test_kit_catches_a_wrong_hessian_and_a_bound_that_is_not_one():
    loss = registry_with(HalfHessian()).get("mse_loss")
    with pytest.raises(
        AssertionError,
        match=r"check_loss\('mse_loss'\): hessian: Hessian diagonal vs finite differences",
    ):
        check_loss(loss, checks=["hessian"])
    # declared a bound (as l1_loss's is), 1 is still below mse's curvature of 2
    bound = dataclasses.replace(loss.spec, hessian_bound=True)
    object.__setattr__(loss, "spec", bound)
    with pytest.raises(AssertionError, match=r"hessian: Hessian below the second derivative"):
        check_loss(loss, checks=["hessian"])


def test_kit_skips_the_hessian_of_a_loss_without_one():
    assert "hessian" not in check_loss("hinge_embedding_loss", checks=["hessian"])


# -- a formula's helpers -------------------------------------------------------------------
def _magnitude(d):  # a helper's helper
    return d if d >= 0 else -d


def _tanh_terms(d):  # |d| and exp(-2 |d|), shared by the formula and its Hessian
    m = _magnitude(d)
    return m, mathfn.exp(-2.0 * m)


def _log_cosh(x, y, a, p):
    m, e = _tanh_terms(x - y)
    t = (1.0 - e) / (1.0 + e)  # tanh(|d|)
    return m + mathfn.log1p(e) - LN2, t if x >= y else -t


def _log_cosh_hessian(x, y, a, p):
    _, e = _tanh_terms(x - y)
    t = (1.0 - e) / (1.0 + e)
    return 1.0 - t * t


LN2 = 0.6931471805599453


class LogCoshFromHelpers:
    """log_cosh_loss's kernels from a formula that calls helpers of its module."""

    @hookimpl(tryfirst=True)
    def lossforge_kernels(self):
        from lossforge.kernels import Elementwise

        yield from Elementwise(_log_cosh, hessian=_log_cosh_hessian).specs("log_cosh_loss")


def test_a_formula_calls_the_helpers_of_its_module_on_the_cpu_and_the_gpu():
    from numba import cuda

    loss = registry_with(LogCoshFromHelpers()).get("log_cosh_loss")
    assert loss.suppliers == {"cpu": "logcoshfromhelpers", "cuda": "logcoshfromhelpers"}
    x = np.random.default_rng(3).normal(scale=3.0, size=64)
    y = np.zeros(64)
    value, grad, hess = loss.value_grad_hess(x, y, reduction="none")
    np.testing.assert_allclose(value, np.log(np.cosh(x)), rtol=1e-13)
    np.testing.assert_allclose(grad, np.tanh(x), rtol=1e-13)
    np.testing.assert_allclose(hess, 1 - np.tanh(x) ** 2, rtol=1e-12, atol=1e-15)
    if not cuda.is_available():
        pytest.skip("no GPU and no simulator")
    on_device = loss.value_grad_hess(cuda.to_device(x), cuda.to_device(y), reduction="none")
    for device, host in zip(on_device, (value, grad, hess)):
        np.testing.assert_allclose(device.copy_to_host(), host, rtol=1e-14, atol=1e-15)
