"""The face of the library: lookups, Loss attributes, import cost, the command line."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

import lossforge as lf


def run(*code_or_args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *code_or_args], capture_output=True, text=True, check=True, timeout=300
    )


def test_functional_names_are_the_registered_losses():
    assert lf.mse_loss is lf.get("mse_loss")
    assert {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"} <= set(lf.list_losses())
    assert lf.list_losses() == sorted(lf.list_losses())
    assert "mse_loss" in dir(lf)


def test_unknown_name_suggests_close_names():
    with pytest.raises(KeyError, match=r"no loss named 'mse_los'; did you mean 'mse_loss'"):
        lf.get("mse_los")
    with pytest.raises(AttributeError):
        lf.no_such_loss  # noqa: B018


def test_loss_attributes():
    loss = lf.get("huber_loss")
    assert loss.name == "huber_loss"
    assert loss.family == "regression"
    assert loss.plugin == "regression"
    assert loss.backends[0] == "cpu"
    assert loss.differentiable == ("input",)
    assert dict(loss.options) == {"reduction": "mean", "delta": 1.0, "weight": None}
    assert "Huber" in loss.__doc__
    assert str(inspect.signature(loss)) == (
        "(input, target, *, reduction='mean', delta=1.0, weight=None, backend=None)"
    )


def test_by_name_helpers_match_methods():
    x, y = np.linspace(-1, 1, 9), np.linspace(1, -1, 9)
    g = lf.grad("mse_loss", x, y)
    np.testing.assert_array_equal(g, lf.mse_loss.grad(x, y))
    v, g2 = lf.value_and_grad("mse_loss", x, y)
    assert v == lf.mse_loss(x, y)
    np.testing.assert_array_equal(g, g2)


def test_partial_pairs_combine_to_the_mean():
    rng = np.random.default_rng(0)
    x, y, w = rng.random(1000), rng.random(1000), rng.random(1000)
    pairs = [
        lf.mse_loss.partial(x[i : i + 300], y[i : i + 300], weight=w[i : i + 300])
        for i in range(0, 1000, 300)
    ]
    total = sum(p[0] for p in pairs)
    denominator = sum(p[1] for p in pairs)
    np.testing.assert_allclose(total / denominator, lf.mse_loss(x, y, weight=w), rtol=1e-13)
    assert isinstance(total, float) and isinstance(denominator, float)


def test_backend_argument():
    x = np.ones(3)
    assert lf.mse_loss(x, x, backend="cpu") == 0
    with pytest.raises(ValueError, match="backend must be one of 'cpu', 'cuda'"):
        lf.mse_loss(x, x, backend="tpu")


def test_import_compiles_nothing_and_imports_no_numba():
    code = (
        "import sys, time; t = time.perf_counter(); import lossforge; "
        "print(time.perf_counter() - t); "
        "assert 'numba' not in sys.modules, 'numba imported'; "
        "assert not lossforge.registry._loaded, 'plugins loaded at import'"
    )
    elapsed = float(run("-c", code).stdout)
    assert elapsed < 0.5


def test_cli_list_and_plugins():
    listing = run("-m", "lossforge", "list").stdout
    for name in ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"]:
        assert any(
            line.split()[:3] == [name, "regression", "regression"] for line in listing.splitlines()
        )
    plugins = run("-m", "lossforge", "plugins").stdout
    assert "regression  [ok]  module 'lossforge.plugins.regression' (built-in)" in plugins
    assert "    mse_loss: cpu" in plugins


def test_console_script_matches_module():
    import shutil

    script = shutil.which("lossforge", path=str(__import__("pathlib").Path(sys.executable).parent))
    if script is None:
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([script, "list"], capture_output=True, text=True, check=True).stdout
    assert out == run("-m", "lossforge", "list").stdout


def test_wide_vectors_marks_the_function_it_is_called_in():
    """runtime.cpu.wide_vectors adds its attribute to the function it is compiled into (in a
    kernel, the function Numba makes of the prange body). The intrinsic swallows a refusal by
    llvmlite: this test is what notices one."""
    import numba

    from lossforge.runtime.cpu import wide_vectors

    @numba.njit
    def doubled(x):
        out = np.empty_like(x)
        for i in range(x.size):
            wide_vectors()
            out[i] = 2 * x[i]
        return out

    x = np.arange(5.0)
    np.testing.assert_array_equal(doubled(x), 2 * x)
    llvm = "".join(doubled.inspect_llvm().values())
    assert '"prefer-vector-width"="512"' in llvm


def test_kernel_pair_runs_serial_below_its_threshold():
    from lossforge.runtime.cpu import PARALLEL_MIN, parallel_kernel

    def total(x):
        return x.sum()

    default = parallel_kernel(total)
    own = parallel_kernel(parallel_min=100)(total)
    assert default.parallel_min == PARALLEL_MIN and own.parallel_min == 100
    x = np.arange(4.0)
    assert own(99, x) == 6.0 and own.serial.signatures and not own.parallel.signatures
    assert own(100, x) == 6.0 and own.parallel.signatures


# -- out= that overlaps an input (API.md section 2: ValueError, as PyTorch refuses it) ----------
def _overlap_cases(name):
    """(arrays, out, where) of ``name``'s example, with ``out`` sharing memory with an input:
    partly (a buffer shifted by one element), wholly (the input itself), or a target."""
    loss = lf.get(name)
    arrays, _ = loss.spec.example(np.random.default_rng(5), 64, np.float64)
    x = arrays[0]
    n = len(loss.differentiable)

    def outs(first):
        rest = tuple(np.empty_like(a) for a in arrays[1:n])
        return first if n == 1 else (first, *rest)

    buf = np.empty(x.size + 1, x.dtype)
    shifted = buf[:-1].reshape(x.shape)
    shifted[...] = x
    yield (shifted, *arrays[1:]), outs(buf[1:].reshape(x.shape)), "partly"
    yield arrays, outs(x), "wholly"
    y = arrays[1]
    if y.shape == x.shape and y.dtype == x.dtype:
        yield arrays, outs(y), "a target"


@pytest.mark.parametrize("name", lf.list_losses())
@pytest.mark.parametrize("general", [False, True])
def test_out_overlapping_an_input_is_refused(name, general):
    loss = lf.get(name)
    options = {}
    if general:  # a default option named: not the fast path
        options = {"reduction": "mean"} if loss.reduced else {k: v for k, v in loss.options.items()}
    for arrays, out, where in _overlap_cases(name):
        before = [np.array(a, copy=True) for a in arrays]
        with pytest.raises(ValueError, match=r"out .*overlaps"):
            loss.value_and_grad(*arrays, out=out, **options)
        with pytest.raises(ValueError, match=r"out .*overlaps"):
            loss.grad(*arrays, out=out, **options)
        for b, a in zip(before, arrays):
            np.testing.assert_array_equal(a, b, err_msg=where)


def test_out_overlapping_an_option_array_is_refused(rng):
    x, y = rng.random(8), rng.random(8)
    weight = np.ones(8)
    with pytest.raises(ValueError, match=r"out .*overlaps weight"):
        lf.mse_loss.value_and_grad(x, y, weight=weight, out=weight)
    go = np.ones(8)
    with pytest.raises(ValueError, match=r"out .*overlaps grad_output"):
        lf.mse_loss.grad(x, y, reduction="none", grad_output=go, out=go)


def test_out_beside_an_input_in_one_buffer_is_taken(rng):
    # the same buffer, no element shared: not an overlap
    buf = np.empty(16)
    x, out = buf[:8], buf[8:]
    x[...] = rng.random(8)
    y = rng.random(8)
    expected = lf.mse_loss.value_and_grad(x.copy(), y)
    value, grad = lf.mse_loss.value_and_grad(x, y, out=out)
    assert grad is out and value == expected[0]
    np.testing.assert_array_equal(out, expected[1])
    # rows of one buffer: out (row 1) lies within the bounds of the input (the second halves
    # of rows 0 and 2) and shares no element with it
    big = np.zeros((3, 8))
    x3, out3 = big[::2, 4:], big[1].reshape(2, 4)
    x3[...] = rng.random((2, 4))
    y3 = rng.random((2, 4))
    assert np.may_share_memory(x3, out3) and not np.shares_memory(x3, out3)
    expected = lf.mse_loss.value_and_grad(x3.copy(), y3)
    for options in [{}, {"reduction": "mean"}]:
        value, grad = lf.mse_loss.value_and_grad(x3, y3, out=out3, **options)
        assert grad is out3 and value == expected[0]
        np.testing.assert_array_equal(out3, expected[1])
