"""lossforge.torch: the autograd Function and the nn.Module drop-ins, against PyTorch's own
losses (values, gradients, training), torch.autograd.gradcheck (float64 finite differences),
and the bridge's contract: zero-copy, gradients only where required, out-of-place scaling,
no double backward, torch.no_grad, torch.compile."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lossforge as lf  # noqa: E402
import lossforge.torch as lft  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
F = torch.nn.functional
BUILTIN = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cosine_embedding_loss",
    "cosine_similarity",
    "cross_entropy",
    "hinge_embedding_loss",
    "huber_loss",
    "l1_loss",
    "mse_loss",
    "multilabel_soft_margin_loss",
    "nll_loss",
    "poisson_nll_loss",
    "smooth_l1_loss",
    "soft_margin_loss",
    "kl_div",
    "margin_ranking_loss",
    "gaussian_nll_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "triplet_margin_loss",
    "triplet_margin_with_distance_loss",
    "ctc_loss",
]
REDUCED = [n for n in BUILTIN if n != "cosine_similarity"]
MODULES = {
    "MSELoss": "mse_loss",
    "L1Loss": "l1_loss",
    "SmoothL1Loss": "smooth_l1_loss",
    "HuberLoss": "huber_loss",
    "PoissonNLLLoss": "poisson_nll_loss",
    "BCELoss": "binary_cross_entropy",
    "BCEWithLogitsLoss": "binary_cross_entropy_with_logits",
    "SoftMarginLoss": "soft_margin_loss",
    "HingeEmbeddingLoss": "hinge_embedding_loss",
    "CrossEntropyLoss": "cross_entropy",
    "NLLLoss": "nll_loss",
    "MultiLabelSoftMarginLoss": "multilabel_soft_margin_loss",
    "CosineSimilarity": "cosine_similarity",
    "CosineEmbeddingLoss": "cosine_embedding_loss",
    "KLDivLoss": "kl_div",
    "MarginRankingLoss": "margin_ranking_loss",
    "GaussianNLLLoss": "gaussian_nll_loss",
    "MultiMarginLoss": "multi_margin_loss",
    "MultiLabelMarginLoss": "multilabel_margin_loss",
    "TripletMarginLoss": "triplet_margin_loss",
    "TripletMarginWithDistanceLoss": "triplet_margin_with_distance_loss",
    "CTCLoss": "ctc_loss",
}


def example(name, seed=0, size=24):
    """The loss's own example arrays (float64) as tensors, and the positions of the
    differentiable arguments. Tests use the default options (each option set compiles
    kernels of its own, seconds each on a cold cache); the adapter passes options through to
    lossforge, whose own tests check them: the tests of options here are about the bridge."""
    loss = lf.get(name)
    arrays, _ = loss.spec.example(np.random.default_rng(seed), size, np.dtype("float64"))
    tensors = [torch.from_numpy(np.array(a)) for a in arrays]
    return tensors, {}, [loss.arguments.index(d) for d in loss.differentiable]


def with_grad(tensors, positions):
    return [t.clone().requires_grad_(True) if i in positions else t for i, t in enumerate(tensors)]


def test_every_builtin_loss_is_covered():
    assert set(BUILTIN) <= set(lf.list_losses())
    assert set(MODULES.values()) == set(BUILTIN)


# -- values and gradients against PyTorch --------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN)
def test_value_and_gradients_match_pytorch(name):
    tensors, options, positions = example(name)
    ours, theirs = with_grad(tensors, positions), with_grad(tensors, positions)
    value = lft.apply(name, *ours, **options)
    expected = getattr(F, name)(*theirs, **options)
    torch.testing.assert_close(value, expected.detach())
    assert value.requires_grad and value.dtype == torch.float64
    upstream = torch.linspace(0.5, 2.0, expected.numel(), dtype=torch.float64).reshape(
        expected.shape
    )
    value.backward(upstream)
    expected.backward(upstream)
    for i in positions:
        torch.testing.assert_close(ours[i].grad, theirs[i].grad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_pytorchs(module):
    name = MODULES[module]
    tensors, options, positions = example(name, seed=1)
    ours, theirs = with_grad(tensors, positions), with_grad(tensors, positions)
    mine = getattr(lft, module)(**options)
    reference = getattr(torch.nn, module)(**options)
    value, expected = mine(*ours), reference(*theirs)
    torch.testing.assert_close(value, expected.detach())
    value.sum().backward()
    expected.sum().backward()
    for i in positions:
        torch.testing.assert_close(ours[i].grad, theirs[i].grad)
    assert type(mine).__name__ == module and module in repr(mine)


@pytest.mark.parametrize("name", BUILTIN)
def test_gradcheck(name):
    tensors, options, positions = example(name, seed=2, size=12)
    leaves = [tensors[i].clone().requires_grad_(True) for i in positions]
    # "none" computes its gradient in backward, from grad_output, by other kernels (seconds
    # each to compile): checked on an element-wise loss and on cosine_similarity, which is
    # not reduced (lossforge's own tests check "none" for every loss)
    reductions = ("mean", "sum") if lf.get(name).reduced else (None,)
    if name == "mse_loss":
        reductions += ("none",)
    for reduction in reductions:
        opts = options if reduction is None else {**options, "reduction": reduction}

        def f(*xs, opts=opts):
            args = list(tensors)
            for i, x in zip(positions, xs):
                # ctc_loss's gradient is PyTorch's, through log_softmax (not the derivative
                # with respect to free log-probabilities): checked through log_softmax
                args[i] = torch.log_softmax(x, -1) if name == "ctc_loss" else x
            return lft.apply(name, *args, **opts)

        assert torch.autograd.gradcheck(f, leaves), reduction


# -- training -------------------------------------------------------------------------------
def _head(name, i):
    """The link from the linear model to argument ``i``, and its inverse for the base:
    binary_cross_entropy takes probabilities (a sigmoid), gaussian_nll_loss's var is
    positive (an exponential)."""
    if name == "binary_cross_entropy":
        return torch.sigmoid, lambda t: torch.logit(t.clamp(0.05, 0.95))
    if name == "gaussian_nll_loss" and i == 2:
        return torch.exp, torch.log
    return (lambda z: z), (lambda t: t)


def _train(name, criterion, tensors, positions, steps=6):
    """A linear model per differentiable argument (prediction = base + features @ W), trained
    with SGD and momentum; returns the final weights."""
    torch.manual_seed(0)
    bases, features, weights = [], [], []
    for i in positions:
        t = tensors[i]
        base = _head(name, i)[1](t)
        rows = t.shape[0] if t.ndim else 1
        bases.append(base)
        features.append(torch.randn(rows, 4, dtype=torch.float64))
        weights.append(
            (0.1 * torch.randn(4, t.numel() // rows, dtype=torch.float64)).requires_grad_(True)
        )
    optimizer = torch.optim.SGD(weights, lr=0.5, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        args = list(tensors)
        for i, base, x, w in zip(positions, bases, features, weights):
            args[i] = _head(name, i)[0](base + (x @ w).reshape(base.shape))
        criterion(*args).backward()
        optimizer.step()
    return [w.detach() for w in weights]


@pytest.mark.parametrize("name", REDUCED)
def test_training_gives_pytorchs_parameters(name):
    tensors, options, positions = example(name, seed=3)
    ours = _train(name, lambda *a: lft.apply(name, *a, **options), tensors, positions)
    theirs = _train(name, lambda *a: getattr(F, name)(*a, **options), tensors, positions)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_mlp_trained_with_cross_entropy_loss_matches_pytorch():
    def train(criterion):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)
        ).double()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        x = torch.randn(32, 6, dtype=torch.float64)
        y = torch.randint(0, 5, (32,))
        y[::7] = -1  # ignored
        for _ in range(10):
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        return list(model.parameters())

    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    options = {"weight": weight, "ignore_index": -1, "label_smoothing": 0.1}
    criterion = lft.CrossEntropyLoss(**options)
    ours = train(criterion)
    theirs = train(torch.nn.CrossEntropyLoss(**options))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # weight is a buffer, as in PyTorch: .to() and state_dict carry it
    assert torch.equal(criterion.state_dict()["weight"], weight)
    assert criterion.to(torch.float32).weight.dtype == torch.float32


# -- the bridge ------------------------------------------------------------------------------
class Spy:
    """Wraps a Loss's methods, recording what they receive and return."""

    def __init__(self, monkeypatch, name):
        self.loss = lf.get(name)
        self.calls = []
        for method in ("value_and_grad", "grad"):
            monkeypatch.setattr(self.loss, method, self._wrap(method, getattr(self.loss, method)))
        # loss(...) looks __call__ up on the class
        monkeypatch.setattr(lf.Loss, "__call__", self._wrap("__call__", lf.Loss.__call__))

    def _wrap(self, method, real):
        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            self.calls.append((method, args, kwargs, result))
            return result

        return wrapped

    def methods(self):
        return [c[0] for c in self.calls]


def _address(a):
    return a.__array_interface__["data"][0]


def test_cpu_tensors_are_passed_and_returned_without_a_copy(monkeypatch):
    spy = Spy(monkeypatch, "mse_loss")
    x = torch.randn(300, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(300, 7, dtype=torch.float64)
    value = lft.mse_loss(x, y)
    ((_, args, _, (_, grad)),) = spy.calls
    assert _address(args[0]) == x.data_ptr() and _address(args[1]) == y.data_ptr()
    value.backward()
    assert x.grad.data_ptr() == _address(grad)  # lossforge's gradient, handed over
    none = lft.mse_loss(x, y, reduction="none")
    assert none.data_ptr() == _address(spy.calls[-1][3])


def test_no_gradient_is_computed_when_nothing_requires_grad(monkeypatch):
    spy = Spy(monkeypatch, "mse_loss")
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(8, 5, dtype=torch.float64)
    with torch.no_grad():
        v = lft.mse_loss(x, t)
    assert not v.requires_grad
    v = lft.mse_loss(x.detach(), t)
    assert not v.requires_grad
    assert spy.methods() == ["__call__", "__call__"]
    lft.mse_loss(x, t).backward()
    assert spy.methods()[-1] == "value_and_grad"
    torch.testing.assert_close(v, F.mse_loss(x, t).detach())


def test_gradients_only_for_arguments_that_require_them():
    tensors, options, _ = example("cosine_embedding_loss")
    a, b, target = tensors
    a = a.clone().requires_grad_(True)
    lft.cosine_embedding_loss(a, b, target, **options).backward()
    assert a.grad is not None and b.grad is None
    expected = a.detach().clone().requires_grad_(True)
    F.cosine_embedding_loss(expected, b, target, **options).backward()
    torch.testing.assert_close(a.grad, expected.grad)
    with pytest.raises(ValueError, match=r"target requires grad.*input1, input2"):
        lft.cosine_embedding_loss(a, b, target.clone().requires_grad_(True))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="weight requires grad"):
        lft.mse_loss(x, torch.randn(4, 3), weight=torch.ones(4, 3, requires_grad=True))
    with torch.no_grad():  # nothing is differentiated: no error
        lft.mse_loss(x, torch.randn(4, 3, dtype=torch.float64, requires_grad=True))


def test_backward_scales_out_of_place_with_a_retained_graph():
    x = torch.randn(50, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(50, 4, dtype=torch.float64)
    value = lft.huber_loss(x, t, delta=0.5)
    expected = F.huber_loss(x, t, delta=0.5)
    for scale in (3.0, 1.0, -2.0, 1.0):  # each backward through the same retained graph
        (g,) = torch.autograd.grad(value * scale, x, retain_graph=True)
        (h,) = torch.autograd.grad(expected * scale, x, retain_graph=True)
        torch.testing.assert_close(g, h)
    x.grad = None
    value.backward(retain_graph=True)
    value.backward()  # accumulates into the gradient handed over by the first backward
    (h,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(x.grad, 2 * h)


def test_double_backward_is_a_clear_error():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    value = lft.mse_loss(x, torch.zeros_like(x))
    with pytest.raises(RuntimeError, match=r"first derivatives only.*create_graph=True"):
        torch.autograd.grad(value, x, create_graph=True)


def test_inputs_are_not_modified_and_dtypes_are_kept():
    # float32 cross_entropy with label smoothing, as in the README's example
    y = torch.randint(0, 6, (40,))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(40, 6).to(dtype).requires_grad_(True)
        before = (x.detach().clone(), y.clone())
        value = lft.CrossEntropyLoss(label_smoothing=0.1)(x, y)
        value.backward()
        assert value.dtype == dtype and x.grad.dtype == dtype
        assert torch.equal(x.detach(), before[0]) and torch.equal(y, before[1])
        x32 = x.detach().float().requires_grad_(True)
        F.cross_entropy(x32, y, label_smoothing=0.1).backward()
        torch.testing.assert_close(x.grad.float(), x32.grad, rtol=2e-2, atol=1e-3)


def test_strided_tensors():
    x = torch.randn(10, 6, dtype=torch.float64).t().requires_grad_(True)  # not contiguous
    t = torch.randn(12, 10, dtype=torch.float64)[::2]
    value = lft.smooth_l1_loss(x, t)
    x2 = x.detach().clone().requires_grad_(True)
    expected = F.smooth_l1_loss(x2, t)
    value.backward()
    expected.backward()
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(x.grad, x2.grad)
    # a NumPy target beside a tensor input, with the gradient computed in backward
    x.grad = x2.grad = None
    lft.mse_loss(x, t.numpy(), reduction="none").sum().backward()
    F.mse_loss(x2, t, reduction="none").sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_errors_are_lossforges():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)|\(4, 2\).*\(4, 3\)"):
        lft.mse_loss(x, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(IndexError):
        lft.cross_entropy(x, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(TypeError, match="size_average"):
        lft.MSELoss(size_average=True)
    with pytest.raises(TypeError, match="keyword"):
        lft.CrossEntropyLoss(torch.ones(3))
    with pytest.raises(AttributeError):
        lft.not_a_loss  # noqa: B018
    with pytest.raises(TypeError, match="meta"):
        lft.mse_loss(torch.empty(3, device="meta"), torch.empty(3, device="meta"))
    assert lft.LossModule("huber_loss", delta=0.5)(x, x.detach() + 1).requires_grad


def test_cuda_tensors_go_to_the_cuda_backend():
    # The CPU build of PyTorch has no CUDA tensors: this checks the decision on an object that
    # looks like one (a detach()-able tensor on a "cuda" device exposing the interface).
    from lossforge import dispatch

    class FakeCudaTensor(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

        def detach(self):
            return self

        @property
        def __cuda_array_interface__(self):
            return {"shape": (3,), "typestr": "<f4", "data": (0, False), "version": 3}

    fake = torch.zeros(3).as_subclass(FakeCudaTensor)
    array = lft._array(fake)
    assert array is fake  # not .numpy(): lossforge reads __cuda_array_interface__
    assert dispatch.on_device(array)
    assert isinstance(lft._array(torch.zeros(3)), np.ndarray)


# -- torch.compile ---------------------------------------------------------------------------
def test_torch_compile_graph_breaks_at_the_loss_and_runs():
    model = torch.nn.Linear(5, 3).double()
    criterion = lft.CrossEntropyLoss()
    x = torch.randn(16, 5, dtype=torch.float64)
    t = torch.randint(0, 3, (16,))

    def step(x, t):
        return criterion(model(x) * 2, t) + 1

    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    graphs = CompileCounter()  # a backend that counts the graphs Dynamo hands it
    compiled = torch.compile(step, backend=graphs)
    value = compiled(x, t)
    assert graphs.frame_count == 2  # model(x) * 2 | the loss, run eagerly | + 1
    value.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = F.cross_entropy(model(x) * 2, t) + 1
    expected.backward()
    torch.testing.assert_close(value, expected)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)


# -- packaging -------------------------------------------------------------------------------
def test_missing_pytorch_says_what_to_install():
    code = (
        "import sys\n"
        "import lossforge\n"
        "lossforge.mse_loss  # plugins loaded: still no torch\n"
        "assert 'torch' not in sys.modules\n"
        "sys.modules['torch'] = None  # as if PyTorch were not installed\n"
        "try:\n    import lossforge.torch\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "lossforge[torch]"' in out.stdout


def _readme_blocks(heading):
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n#{1,3} ", text.split(heading + "\n", 1)[1], maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_pytorch_example_runs_as_written():
    (code,) = _readme_blocks("### PyTorch")
    namespace: dict = {}
    exec(compile(code, "README.md (PyTorch)", "exec"), namespace)
    assert namespace["losses"][-1] < namespace["losses"][0]


# -- the bench rows and the asv benchmark ------------------------------------------------------
def test_bench_adapter_rows():
    from lossforge import bench, inputs

    args = bench._parser().parse_args(["--loss", "cross_entropy", "--adapter", "torch"])
    assert bench._plan(args)["adapters"] == ["torch"]
    loss = lf.get("cross_entropy")
    arrays = inputs.draw(loss, 640, "float32", 0, {"classes": 10})
    plan = {"threads": [1]}
    timing = {"min_time": 0, "repeat": 1, "max_repeat": 1}
    (row,) = bench._adapter_rows("torch", loss, arrays, "64x10", plan, timing, print)
    assert (row["adapter"], row["shape"], row["threads"]) == ("torch", [64, 10], 1)
    ours, bare, own = row["adapter_step"], row["bare"], row["own"]
    assert row["bridge"] == pytest.approx(ours["median_s"] / bare["median_s"] - 1)
    assert own["ratio"] == pytest.approx(own["median_s"] / ours["median_s"])
    table = bench._adapter_table([row])
    assert "lossforge.torch" in table[2] and "torch " in table[2]


def test_asv_torch_adapter_benchmark():
    sys.path.insert(0, str(ROOT / "asv_bench"))
    try:
        from benchmarks.bench_adapters import CROSS_ENTROPY, TorchCrossEntropy
    finally:
        sys.path.remove(str(ROOT / "asv_bench"))
    assert "cross_entropy[classes=10]" in CROSS_ENTROPY
    b = TorchCrossEntropy()
    params = ("cross_entropy[classes=10]", 1000, 1)
    b.setup(*params)
    try:
        b.time_lossforge_torch(*params)
        b.time_torch(*params)
        b.time_value_and_grad(*params)
    finally:
        b.teardown(*params)
