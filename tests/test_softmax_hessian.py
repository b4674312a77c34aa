"""``grad_hess`` of the softmax losses made by ``kernels.Softmax`` from a row formula and its
``row_hessian``: cross_entropy, softmax_focal_loss, poly1_cross_entropy and
softmax_cross_entropy (z-loss, soft-capping), in float64 against the diagonal of
``torch.autograd.functional.hessian`` of the loss written in PyTorch from its papers'
definitions, for every option set; against finite differences of ``grad``; and the CUDA
kernel (Numba's simulator without a GPU) against the CPU's."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import cuda
from support import SOFTMAX_CASES, class_indices, class_probabilities, needs_torch, softmax_case

# the simulator's fixes and speed-up, applied to this module too (see tests/test_cuda.py)
from test_cuda import _faithful_simulator, _fast_simulator, dev, host  # noqa: F401

import lossforge as lf

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None

#: (loss, parameters): each extra at a non-trivial value, the focal loss below gamma = 1
#: too (its second derivative in log p is unbounded there), the z-loss with and without
#: soft-capping (the transform's chain rule)
LOSSES = {
    "cross_entropy": ("cross_entropy", {}),
    "focal": ("softmax_focal_loss", {"gamma": 2.0}),
    "focal_half": ("softmax_focal_loss", {"gamma": 0.5}),
    "poly1": ("poly1_cross_entropy", {"epsilon": 1.5}),
    "z_loss": ("softmax_cross_entropy", {"z_loss": 0.05}),
    "softcap": ("softmax_cross_entropy", {"z_loss": 0.05, "softcap": 2.5}),
}


def upstream(rng, x, reduction):
    if reduction != "none":
        return 0.7
    return rng.normal(size=(x.shape[0], *x.shape[2:]) if x.ndim > 1 else ())


def torch_loss(name, z, t, *, weight=None, ignore_index=-100, label_smoothing=0.0, **params):
    """Per-row losses (``"none"``) and the "mean" denominator, in PyTorch: each row
    ``sum_c q_c w_c l(log p_c, lse)`` over the smoothed target distribution ``q``."""
    if params.get("softcap") is not None:
        z = params["softcap"] * torch.tanh(z / params["softcap"])
    axis = 1 if z.ndim > 1 else 0
    classes = z.shape[axis]
    lp = torch.log_softmax(z, axis)
    lse = torch.logsumexp(z, axis, keepdim=True)
    if name == "softmax_focal_loss":
        per_class = -((1 - lp.exp()) ** params["gamma"]) * lp
    elif name == "poly1_cross_entropy":
        per_class = -lp + params["epsilon"] * (1 - lp.exp())
    else:
        per_class = -lp + params.get("z_loss", 0.0) * lse**2
    shape = [1] * z.ndim
    shape[axis] = classes
    w = torch.ones(classes, dtype=z.dtype) if weight is None else torch.from_numpy(weight)
    t = np.asarray(t)
    if t.dtype.kind == "f":
        q = torch.from_numpy(t)
        keep = torch.ones(q.sum(axis).shape, dtype=torch.bool)
        denominator = torch.tensor(float(keep.numel()), dtype=z.dtype)
    else:
        tt = torch.from_numpy(t.astype(np.int64))
        keep = tt != ignore_index
        safe = torch.where(keep, tt, torch.zeros_like(tt))
        q = torch.movedim(F.one_hot(safe, classes).to(z.dtype), -1, axis)
        denominator = (w[safe] * keep).sum()
    q = (1 - label_smoothing) * q + label_smoothing / classes
    return (q * w.reshape(shape) * per_class).sum(axis) * keep, denominator


def torch_grad_hess(name, x, t, grad_output, reduction, options):
    """The gradient and the Hessian's diagonal of ``sum(grad_output * loss)`` by autograd."""
    go = torch.as_tensor(grad_output, dtype=torch.float64)

    def f(z):
        rows, denominator = torch_loss(name, z, t, **options)
        value = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / denominator}[reduction]
        return (value * go).sum()

    z = torch.from_numpy(x)
    h = torch.autograd.functional.hessian(f, z).reshape(x.size, x.size)
    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(zg), [zg])
    return g.numpy(), torch.diagonal(h).reshape(x.shape).numpy()


@needs_torch
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", SOFTMAX_CASES)
@pytest.mark.parametrize("loss", LOSSES)
def test_hessian_diagonal_is_torchs(loss, case, reduction):
    name, params = LOSSES[loss]
    x, t, options, rng = softmax_case(case)
    options = dict(options, **params)
    go = upstream(rng, x, reduction)
    grad, hess = lf.get(name).grad_hess(x, t, grad_output=go, reduction=reduction, **options)
    expected_grad, expected_hess = torch_grad_hess(name, x, t, go, reduction, options)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(hess, expected_hess, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss", ["focal_half", "poly1", "softcap"])
@pytest.mark.parametrize("case", ["smoothing", "k_dims", "probabilities_options"])
def test_hessian_diagonal_is_the_derivative_of_grad(loss, case):
    name, params = LOSSES[loss]
    x, t, options, _ = softmax_case(case, seed=1)
    options = dict(options, **params)
    value, grad, hess = lf.get(name).value_grad_hess(x, t, **options)
    expected_value, expected_grad = lf.get(name).value_and_grad(x, t, **options)
    np.testing.assert_allclose(value, expected_value, rtol=1e-13)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-15)
    numeric = np.empty(x.size)
    eps = 1e-5
    for i in range(x.size):  # d grad_i / d x_i by central differences, element by element
        up, down = x.copy(), x.copy()
        up.reshape(-1)[i] += eps
        down.reshape(-1)[i] -= eps
        g_up = lf.get(name).grad(up, t, **options).reshape(-1)[i]
        g_down = lf.get(name).grad(down, t, **options).reshape(-1)[i]
        numeric[i] = (g_up - g_down) / (2 * eps)
    np.testing.assert_allclose(hess.reshape(-1), numeric, rtol=1e-6, atol=1e-9)


def test_focal_at_a_certain_class():
    # p_t rounds to 1 (q = 0): the focal terms are taken as 0, finite everywhere
    x = np.array([[40.0, 0.0, -3.0], [0.5, -1.0, 2.0]])
    t = np.array([0, 2])
    for gamma in (0.5, 1.0, 2.0):
        grad, hess = lf.softmax_focal_loss.grad_hess(x, t, gamma=gamma, label_smoothing=0.1)
        assert np.isfinite(grad).all() and np.isfinite(hess).all()


def test_float32_and_out():
    x, t, options, _ = softmax_case("smoothing", dtype=np.float32)
    g, h = np.empty_like(x), np.empty_like(x)
    grad, hess = lf.softmax_focal_loss.grad_hess(x, t, out=(g, h), **options)
    assert grad is g and hess is h and h.dtype == np.float32
    x64 = x.astype(np.float64)
    options64 = dict(options, weight=options["weight"].astype(np.float64))
    expected = lf.softmax_focal_loss.grad_hess(x64, t, **options64)
    np.testing.assert_allclose(h, expected[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("probabilities", [False, True])
def test_bitwise_identical_for_any_thread_count(probabilities):
    from lossforge.runtime.cpu import threads

    rng = np.random.default_rng(4)  # 2 * 10^5 logits: over the parallel threshold
    x, t = class_probabilities(rng, (40000, 5)) if probabilities else class_indices(rng, (40000, 5))
    options = {"weight": rng.random(5) + 0.5, "label_smoothing": 0.1, "gamma": 1.5}
    results = []
    for n in (1, numba.config.NUMBA_NUM_THREADS):
        with threads(n):
            results.append(lf.softmax_focal_loss.value_grad_hess(x, t, **options))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


# -- CUDA (the simulator without a GPU) ---------------------------------------------------
needs_cuda = pytest.mark.skipif(
    not (numba.config.ENABLE_CUDASIM or cuda.is_available()),
    reason="no CUDA GPU, and Numba was imported before NUMBA_ENABLE_CUDASIM=1 was set",
)


@needs_cuda
@pytest.mark.parametrize(
    ("loss", "case", "reduction"),
    [
        ("cross_entropy", "smoothing", "mean"),
        ("focal", "weight", "none"),
        ("focal_half", "smoothing", "mean"),
        ("poly1", "ignore_index", "none"),
        ("poly1", "one_row", "mean"),
        ("z_loss", "probabilities_options", "none"),
        ("softcap", "k_dims", "mean"),
        ("softcap", "probabilities_k_dims", "none"),
        ("focal", "many_classes", "sum"),  # rows longer than a block of threads
    ],
)
def test_cuda_is_the_cpu(loss, case, reduction):
    name, params = LOSSES[loss]
    x, t, options, rng = softmax_case(case, seed=5)
    options = dict(options, **params)
    go = upstream(rng, x, reduction)
    on_device = {k: dev(v) for k, v in options.items()}
    dgo = dev(go) if reduction == "none" else go
    fn = lf.get(name)
    value, grad, hess = fn.value_grad_hess(
        dev(x), dev(t), grad_output=dgo, reduction=reduction, **on_device
    )
    expected = fn.value_grad_hess(x, t, grad_output=go, reduction=reduction, **options)
    for got, want in zip((value, grad, hess), expected, strict=True):
        np.testing.assert_allclose(host(got), want, rtol=1e-12, atol=1e-15)


def test_a_transform_without_its_curvature_refuses_grad_hess():
    from types import SimpleNamespace

    from lossforge.plugins.multiclass import formulas

    from lossforge.kernels import Softmax

    partial = Softmax(
        formulas.softmax_losses,
        transform=formulas.softcap,
        row_hessian=formulas.softmax_losses_hessian,
    )
    with pytest.raises(NotImplementedError, match="softcap"):
        partial.cpu_hessian(SimpleNamespace(params={"transform": True}), None, (), (), None, 1.0)
    assert partial._transformed(SimpleNamespace(params={"transform": False})) is False
