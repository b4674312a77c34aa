"""lossforge.jax: every built-in loss against JAX's own formulas (optax's where it has the loss)
for values and jax.grad, under jax.jit; the custom VJP's contract (no forward mode, no gradient
for targets, vmap, dtypes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import lossforge as lf  # noqa: E402
import lossforge.jax as lfj  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def x64():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def _cos(a, b):
    return optax.cosine_similarity(a, b, epsilon=1e-8)


def _ignoring(per_row):
    """A mean over the targets that are not ignore_index (-100), as PyTorch's."""

    def mean(z, y):
        kept = y != -100
        return jnp.where(kept, per_row(z, jnp.where(kept, y, 0)), 0.0).sum() / kept.sum()

    return mean


def _nll(z, y):
    return -jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]


# JAX's own formulas (PyTorch's semantics, default options, "mean"), independent of lossforge
REFERENCES = {
    "mse_loss": lambda x, y: optax.squared_error(x, y).mean(),
    "l1_loss": lambda x, y: jnp.abs(x - y).mean(),
    "smooth_l1_loss": lambda x, y: optax.huber_loss(x, y, delta=1.0).mean(),  # beta = 1
    "huber_loss": lambda x, y: optax.huber_loss(x, y, delta=1.0).mean(),
    "poisson_nll_loss": lambda x, y: (jnp.exp(x) - y * x).mean(),
    "binary_cross_entropy": lambda p, y: -(y * jnp.log(p) + (1 - y) * jnp.log1p(-p)).mean(),
    "binary_cross_entropy_with_logits": lambda z, y: optax.sigmoid_binary_cross_entropy(
        z, y
    ).mean(),
    "soft_margin_loss": lambda x, y: jax.nn.softplus(-y * x).mean(),
    "hinge_embedding_loss": lambda x, y: jnp.where(y == 1, x, jnp.maximum(0.0, 1.0 - x)).mean(),
    "cross_entropy": _ignoring(optax.softmax_cross_entropy_with_integer_labels),
    "nll_loss": _ignoring(_nll),
    "multilabel_soft_margin_loss": lambda z, y: (
        -(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z)).mean(axis=-1).mean()
    ),
    "cosine_similarity": lambda a, b: _cos(a, b),  # not reduced: per row (dim=1)
    "cosine_embedding_loss": lambda a, b, t: jnp.where(
        t == 1, 1 - _cos(a, b), jnp.maximum(0.0, _cos(a, b))
    ).mean(),
}


def example(name, seed=0, size=24, dtype="float64"):
    loss = lf.get(name)
    arrays, _ = loss.spec.example(np.random.default_rng(seed), size, np.dtype(dtype))
    return [jnp.asarray(a) for a in arrays], [loss.arguments.index(d) for d in loss.differentiable]


def test_every_builtin_loss_has_a_reference():
    assert set(REFERENCES) <= set(lf.list_losses())


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_value_and_grad_under_jit_match_jax(name):
    arrays, positions = example(name)
    reference = REFERENCES[name]
    reduced = lf.get(name).reduced

    def scalar(f):
        # a reduced loss as it is; cosine_similarity weighted per row
        if reduced:
            return f
        return lambda *a: (f(*a) * jnp.linspace(0.5, 2.0, a[0].shape[0])).sum()

    ours = jax.jit(jax.value_and_grad(scalar(getattr(lfj, name)), argnums=tuple(positions)))
    theirs = jax.jit(jax.value_and_grad(scalar(reference), argnums=tuple(positions)))
    (value, grads), (expected, expected_grads) = ours(*arrays), theirs(*arrays)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    assert value.dtype == jnp.float64
    for g, h in zip(grads, expected_grads):
        np.testing.assert_allclose(g, h, rtol=1e-9, atol=1e-12)


def test_options_and_array_options_under_jit():
    (z, y), _ = example("cross_entropy", size=60)
    kept = y != -100  # the example ignores some targets
    label = jnp.where(kept, y, 0)
    w = jnp.linspace(0.5, 1.5, z.shape[1])
    smooth = 0.1

    def reference(z, w):  # PyTorch's weighted, smoothed cross entropy, summed
        logp = jax.nn.log_softmax(z, axis=1)
        picked = -jnp.take_along_axis(logp, label[:, None], axis=1)[:, 0] * w[label]
        spread = -(logp * w).sum(axis=1) / z.shape[1]
        return jnp.where(kept, (1 - smooth) * picked + smooth * spread, 0.0).sum()

    def ours(z, w):  # w: an array option, a traced argument of the jitted function
        return lfj.cross_entropy(z, y, weight=w, label_smoothing=smooth, reduction="sum")

    value, g = jax.jit(jax.value_and_grad(ours))(z, w)
    expected, h = jax.value_and_grad(reference)(z, w)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    np.testing.assert_allclose(g, h, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="with respect to weight"):
        jax.grad(ours, argnums=1)(z, w)


def test_float32_training_step_and_bfloat16():
    (z, y), _ = example("cross_entropy", size=200, dtype="float32")
    value, g = jax.jit(jax.value_and_grad(lambda z: lfj.cross_entropy(z, y)))(z)
    assert value.dtype == jnp.float32 and g.dtype == jnp.float32
    h = jax.grad(REFERENCES["cross_entropy"])(z, y)
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)
    zb = z.astype(jnp.bfloat16)
    value, g = jax.value_and_grad(lambda z: lfj.cross_entropy(z, y))(zb)
    assert value.dtype == jnp.bfloat16 and g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), h, atol=2e-2)


def test_vmap_runs_the_kernel_per_element():
    (z, y), _ = example("cross_entropy", size=60)
    batch = jnp.stack([z, 2 * z, -z])
    step = jax.value_and_grad(lambda z: lfj.cross_entropy(z, y))
    values, grads = jax.jit(jax.vmap(step))(batch)
    for b, v, g in zip(batch, values, grads):
        expected, h = jax.value_and_grad(REFERENCES["cross_entropy"])(b, y)
        np.testing.assert_allclose(v, expected, rtol=1e-10)
        np.testing.assert_allclose(g, h, rtol=1e-9, atol=1e-12)


def test_forward_mode_and_target_gradients_are_errors():
    (x, t), _ = example("mse_loss")
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: lfj.mse_loss(x, t), (x,), (x,))
    with pytest.raises(ValueError, match=r"with respect to target.*input only"):
        jax.grad(lambda t: lfj.mse_loss(x, t))(t)
    with pytest.raises(ValueError, match="with respect to target"):
        jax.grad(lambda x: lfj.mse_loss(x, x))(x)  # the same array as input and target
    g = jax.grad(lambda x: lfj.mse_loss(x, jax.lax.stop_gradient(2 * x)))(x)
    np.testing.assert_allclose(g, -2 * x / x.size, rtol=1e-12)


def test_bad_input_is_lossforges_error():
    (x, t), _ = example("mse_loss")
    with pytest.raises(ValueError, match="shape"):
        lfj.mse_loss(x, t[:, :2])
    with pytest.raises(TypeError, match="unexpected keyword argument 'size_average'"):
        lfj.mse_loss(x, t, size_average=True)
    with pytest.raises(AttributeError):
        lfj.not_a_loss  # noqa: B018


def test_missing_jax_says_what_to_install():
    code = (
        "import sys\n"
        "import lossforge\n"
        "lossforge.mse_loss\n"
        "assert 'jax' not in sys.modules\n"
        "sys.modules['jax'] = None\n"
        "try:\n    import lossforge.jax\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "lossforge[jax]"' in out.stdout


def test_readme_jax_example_runs_as_written():
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n#{1,3} ", text.split("### JAX\n", 1)[1], maxsplit=1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {}
    exec(compile(code, "README.md (JAX)", "exec"), namespace)
    assert namespace["losses"][-1] < namespace["losses"][0]


def test_bench_adapter_rows_and_asv_benchmark():
    from lossforge import bench, inputs

    loss = lf.get("cross_entropy")
    arrays = inputs.draw(loss, 640, "float32", 0, {"classes": 10})
    timing = {"min_time": 0, "repeat": 1, "max_repeat": 1}
    (row,) = bench._adapter_rows("jax", loss, arrays, "64x10", {"threads": [1]}, timing, print)
    assert (row["adapter"], row["shape"]) == ("jax", [64, 10]) and row["own"]["median_s"] > 0
    # JAX's own cross entropy in the bench is the reference's
    z, y = jnp.asarray(arrays[0]), jnp.asarray(arrays[1])
    np.testing.assert_allclose(
        bench._jax_own_cross_entropy(z, y), REFERENCES["cross_entropy"](z, y), rtol=1e-6
    )
    sys.path.insert(0, str(ROOT / "asv_bench"))
    try:
        from benchmarks.bench_adapters import JaxCrossEntropy
    finally:
        sys.path.remove(str(ROOT / "asv_bench"))
    b = JaxCrossEntropy()
    params = ("cross_entropy[classes=10]", 1000, 1)
    b.setup(*params)
    try:
        b.time_lossforge_jax(*params)
        b.time_jax(*params)
    finally:
        b.teardown(*params)


def test_cpu_calls_are_xla_ffi_calls_and_runtime_errors_come_back():
    (x, t), _ = example("cross_entropy")
    f = jax.jit(jax.value_and_grad(lambda x, t: lfj.cross_entropy(x, t)))
    text = f.lower(x, t).as_text()
    assert "lossforge_cross_entropy_value_and_grad" in text and "callback" not in text
    bad = np.array(t).copy()
    bad[0] = x.shape[1]  # a class index out of range, found by the kernel at run time
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"INVALID_ARGUMENT: IndexError.*"):
        jax.block_until_ready(f(x, bad))
    v, g = f(x, t)  # the handler still works after an error
    expected, h = lf.cross_entropy.value_and_grad(np.asarray(x), np.asarray(t))
    np.testing.assert_allclose(v, expected, rtol=1e-12)
    np.testing.assert_allclose(g, h, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("scale", [1.0, -2.5, 0.0])
def test_backward_scales_the_saved_gradient_by_the_cotangent(scale, dtype):
    # the fused forward's gradient times the cotangent, in the gradient's dtype
    (x, t), _ = example("huber_loss", dtype=dtype)
    unscaled = lf.huber_loss.grad(np.asarray(x), np.asarray(t))
    expected = scale * unscaled

    def twice(x):  # the saved gradient used by two consumers: XLA must not scale it in place
        loss = lfj.huber_loss(x, t)
        return scale * loss, loss

    rtol = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3}[dtype]
    g = jax.jit(jax.grad(lambda x: scale * lfj.huber_loss(x, t)))(x)
    assert g.dtype == x.dtype
    np.testing.assert_allclose(g, expected, rtol=rtol, atol=0)
    jac = jax.jit(jax.jacrev(twice))(x)
    np.testing.assert_allclose(jac[0], expected, rtol=rtol, atol=0)
    np.testing.assert_allclose(jac[1], unscaled, rtol=rtol, atol=0)


def test_value_and_grad_compiles_to_one_host_call():
    # jax.grad's cotangent of 1: XLA folds the backward multiply away, leaving the fused
    # forward call alone; no second call, no pass over the gradient
    (z, y), _ = example("cross_entropy", dtype="float32")
    for f in [jax.value_and_grad, jax.grad]:
        text = jax.jit(f(lambda z: lfj.cross_entropy(z, y))).lower(z).compile().as_text()
        assert text.count("custom-call(") == 1 and "multiply" not in text


def test_ffi_handler_sees_xla_buffers_as_arrays_of_every_dtype_and_shape():
    # runtime.xla_ffi on its own: a handler copying each argument into its result, through
    # XLA's buffers, for every FFI dtype it maps and scalar, empty and 3-d shapes
    from lossforge.runtime import xla_ffi

    seen = []

    def copy(args, rets):
        for a, r in zip(args, rets, strict=True):
            seen.append((a.dtype, a.shape, a.flags.writeable, r.flags.writeable))
            r[...] = a

    target = xla_ffi.register(copy, "test_copy")
    rng = np.random.default_rng(1)
    dtypes = "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64"
    for dtype in dtypes.split():
        arrays = [(rng.standard_normal(s) * 100).astype(dtype) for s in [(), (0, 3), (2, 3, 4)]]
        seen.clear()
        call = jax.ffi.ffi_call(target, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays])
        out = jax.jit(call)(*arrays)
        assert seen == [(np.dtype(dtype), a.shape, False, True) for a in arrays]
        for o, a in zip(out, arrays, strict=True):
            assert o.dtype == a.dtype and o.shape == a.shape
            np.testing.assert_array_equal(o, a)

    def write_input(args, rets):
        args[0][...] = 0  # an input is XLA's, maybe another computation's: read-only

    result = jax.ShapeDtypeStruct((3,), np.float64)  # a call without results is dead code
    bad = jax.ffi.ffi_call(xla_ffi.register(write_input, "test_write"), result)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"INVALID_ARGUMENT: ValueError.*only"):
        jax.block_until_ready(jax.jit(bad)(np.ones(3)))
