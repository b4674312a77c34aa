"""The benchmark tooling: lossforge.inputs, the bench command, warmup, and the asv suite.

Small sizes only: the point is that every piece runs and produces what it promises (valid
inputs, agreeing implementations, the documented JSON, compiled variants), not timings.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lossforge as lf
from lossforge import bench, inputs

ROOT = Path(__file__).resolve().parents[1]
# the built-in losses (an installed plugin's loss, e.g. lossforge-focal's, has no NumPy peer)
LOSSES = [name for name in lf.list_losses() if name in inputs.KNOWN]


# -- inputs -----------------------------------------------------------------------------------
def test_every_registered_loss_has_an_input_factory():
    import lossforge as lf

    builtin = {"regression", "binary", "multiclass", "similarity"}
    for name in LOSSES:
        loss = lf.get(name)
        assert name in inputs.KNOWN or (loss.plugin not in builtin and loss.spec.example)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("name", LOSSES)
def test_make_inputs_gives_valid_inputs(name, dtype):
    arrays, options = inputs.make_inputs(name, 3000, dtype, np.random.default_rng(5))
    loss = lf.get(name)
    assert len(arrays) == len(loss.arguments)
    for i, a in enumerate(arrays):
        assert a.flags.c_contiguous and a.flags.writeable
        if i < len(loss.differentiable):
            assert a.dtype == np.dtype(dtype)
    assert 2000 <= arrays[0].size <= 3000  # "about size": rows of the default width
    value, grads = loss.value_and_grad(*arrays, **options)
    assert np.all(np.isfinite(np.asarray(value, np.float64)))
    grads = grads if isinstance(grads, tuple) else (grads,)
    for g, a in zip(grads, arrays, strict=False):
        assert g.shape == a.shape
        assert np.all(np.isfinite(g.astype(np.float64)))


def test_make_inputs_is_seeded_and_realistic():
    a1, _ = inputs.make_inputs("mse_loss", 10_000, "float64", 7)
    a2, _ = inputs.make_inputs("mse_loss", 10_000, "float64", np.random.default_rng(7))
    a3, _ = inputs.make_inputs("mse_loss", 10_000, "float64", 8)
    assert all(np.array_equal(x, y) for x, y in zip(a1, a2, strict=True))
    assert not np.array_equal(a1[0], a3[0])
    # Residuals N(0, 1): about a third outside beta = delta = 1, so both branches run.
    outside = np.mean(np.abs(a1[0] - a1[1]) >= 1)
    assert 0.25 < outside < 0.4

    (p, y), _ = inputs.make_inputs("binary_cross_entropy", 10_000, "float32", 0)
    assert 0 < p.min() and p.max() < 1
    assert set(np.unique(y)) == {0.0, 1.0}

    (z, t), _ = inputs.make_inputs("cross_entropy", (313, 32000), "float32", 0)
    assert z.shape == (313, 32000) and t.shape == (313,) and t.dtype == np.int64
    assert 0 <= t.min() and t.max() < 32000

    (logp, t), _ = inputs.make_inputs("nll_loss", (50, 10), "float64", 0)
    assert np.allclose(np.log(np.exp(logp).sum(axis=1)), 0.0)  # log-probabilities

    (x1, x2, t), _ = inputs.make_inputs("cosine_embedding_loss", (40, 16), "float32", 0)
    assert x1.shape == x2.shape == (40, 16) and set(np.unique(t)) == {-1.0, 1.0}


def test_make_inputs_shapes_and_bad_arguments():
    assert inputs.shape_of("mse_loss", 10**6) == (10**6,)
    assert inputs.shape_of("cross_entropy", 10**6) == (10**4, 100)
    assert inputs.shape_of("cross_entropy", 5) == (1, 100)
    assert inputs.shape_of("cosine_similarity", (3, 7)) == (3, 7)
    with pytest.raises(ValueError, match="rows, width"):
        inputs.shape_of("nll_loss", (3, 0))
    with pytest.raises(ValueError, match="element count"):
        inputs.shape_of("mse_loss", (3, 4))
    with pytest.raises(KeyError, match="no input factory"):
        inputs.make_inputs("no_such_loss", 10)
    with pytest.raises(TypeError, match="floating"):
        inputs.make_inputs("mse_loss", 10, "int32")


# -- bench --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
def test_numpy_peer_agrees_with_lossforge(name):
    """The bench's plain NumPy implementations are independent of the kernels: they must
    agree, or the table's ratios compare different computations."""
    arrays, options = inputs.make_inputs(name, 2000, "float64", 3)
    value, grads = lf.get(name).value_and_grad(*arrays, **options)
    grads = grads if isinstance(grads, tuple) else (grads,)
    check = bench._compare(value, grads, bench.NUMPY_VALUE_AND_GRAD[name](*arrays), "float64")
    assert check["ok"], check


def test_bench_quick_writes_the_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--quick", "--loss", "mse_loss", "--loss", "cross_entropy", "--sizes", "2000"]
    argv += ["--shapes", "64x10", "--threads", "1", "--min-time", "0", "--repeat", "2"]
    argv += ["--skip", "jax", "--json", str(path)]
    assert bench.main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads(path.read_text())
    assert set(report) == {"machine", "dtype", "threads", "floor", "results"}
    assert report["dtype"] == "float32" and report["threads"] == [1]
    assert report["machine"]["numba_threads"] >= 1
    floor = report["floor"]["1"]
    assert floor["gbps"] > 0.1 and floor["bytes"] == 3 * 8 * bench.TRIAD_N
    rows = report["results"]
    assert [(r["loss"], r["shape"]) for r in rows] == [
        ("mse_loss", [2000]),
        ("cross_entropy", [20, 100]),
        ("cross_entropy", [64, 10]),
    ]
    for r in rows:
        assert r["threads"] == 1 and r["dtype"] == "float32"
        assert r["lossforge"]["median_s"] > 0 and r["lossforge"]["repeats"] >= 2
        assert math.isclose(r["gbps"], r["bytes"] / r["lossforge"]["median_s"] / 1e9)
        assert math.isclose(r["floor_fraction"], r["gbps"] / floor["gbps"])
        assert r["numpy"]["ok"] is True
        assert math.isclose(
            r["numpy"]["ratio"], r["numpy"]["median_s"] / r["lossforge"]["median_s"]
        )
        assert r["jax"] is None  # skipped
        if report["machine"]["torch"] is not None:
            assert r["torch"]["ok"] is True
    # mse_loss, 2000 float32: input and target read, gradient written.
    assert rows[0]["bytes"] == 3 * 2000 * 4
    # cross_entropy (64, 10): logits and int64 targets read, gradient written.
    assert rows[2]["bytes"] == 64 * 10 * 4 * 2 + 64 * 8
    assert "cross_entropy" in out and "64x10" in out and "GB/s" in out and "floor" in out
    assert "[3/3] cross_entropy 64x10" in err  # progress goes to stderr


def test_bench_through_the_cli(tmp_path, capsys):
    from lossforge.__main__ import main

    path = tmp_path / "b.json"
    argv = ["bench", "--quick", "--loss", "l1_loss", "--sizes", "500", "--threads", "1"]
    argv += ["--min-time", "0", "--repeat", "1", "--skip", "torch", "--skip", "jax"]
    assert main([*argv, "--json", str(path)]) == 0
    assert json.loads(path.read_text())["results"][0]["loss"] == "l1_loss"


def test_bench_usage_errors(capsys):
    assert bench.main(["--loss", "mse_los"]) == 2
    assert "unknown loss 'mse_los'" in capsys.readouterr().err
    assert bench.main(["--threads", "10000"]) == 2
    assert "--threads must be in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "1.5"])


def test_size_and_shape_parsing():
    assert [bench._count(s) for s in ("1000", "1_000", "1e6", "10**7", "10^4")] == [
        1000,
        1000,
        10**6,
        10**7,
        10**4,
    ]
    assert bench._shape("313x32000") == (313, 32000)
    assert bench._shape("1e6x10") == (10**6, 10)


def test_backend_cuda_without_the_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lossforge.bench_cuda", None)  # import fails
    assert bench.main(["--backend", "cuda", "--quick"]) == 2
    assert "lossforge.bench_cuda" in capsys.readouterr().err


def test_backend_cuda_delegates(monkeypatch):
    seen = []
    fake = type(sys)("lossforge.bench_cuda")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lossforge.bench_cuda", fake)
    assert bench.main(["--quick", "--backend", "cuda", "--sizes", "10"]) == 0
    assert seen == [["--quick", "--sizes", "10"]]


def test_measure_times_the_call():
    m = bench.measure(lambda: time.sleep(0.002), min_time=0.0, repeat=3)
    assert m["repeats"] == 3 and m["inner"] == 1
    assert 0.002 <= m["median_s"] < 0.05
    fast = bench.measure(lambda: None, min_time=0.0, repeat=2)
    assert fast["inner"] > 1 and fast["median_s"] < 1e-4  # batched: sub-millisecond calls


# -- warmup -----------------------------------------------------------------------------------
def test_warmup_import_compiles_nothing():
    code = "import sys, lossforge.warmup; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_warmup_one_loss():
    from lossforge.runtime.cpu import KernelPair
    from lossforge.warmup import warmup

    lines = []
    done = warmup(["mse_loss"], dtypes=("float32",), progress=lines.append)
    assert [(w.loss, w.dtype, w.variant, w.call) for w in done] == [
        ("mse_loss", "float32", v, c)
        for v in ("serial", "parallel")
        for c in ("value", "value_and_grad", "value_and_grad (defaults)")
    ]
    assert lines == [str(w) for w in done] and all(w.seconds >= 0 for w in done)
    # Both variants of mse_loss's kernel now hold a float32 signature.
    kernel, _ = importlib.import_module("lossforge.plugins.regression").KERNELS["mse_loss"]
    pairs = [kernel.kernel]
    assert isinstance(pairs[0], KernelPair)
    for variant in ("serial", "parallel"):
        sigs = [s for k in pairs for s in getattr(k, variant).signatures]
        assert any("float32" in str(s) for s in sigs), (variant, sigs)


def test_warmup_compiles_every_cross_entropy_kernel():
    from lossforge.warmup import warmup

    done = warmup(["cross_entropy"], dtypes=("float32",))
    assert {w.variant for w in done} == {
        f"{v} ({c} classes)" for v in ("serial", "parallel") for c in (10, 100, 1000)
    }
    from numba import types

    module = importlib.import_module("lossforge.plugins.multiclass.cpu")
    for variant in ("serial", "parallel"):
        few = getattr(module._cross_entropy_few, variant).signatures
        assert any(sig[0].dtype == types.float32 for sig in few)
        # argument 5, long_rows: None for rows of up to 256 classes, True for longer ones
        rows = getattr(module._cross_entropy_index, variant).signatures
        kinds = {sig[5] for sig in rows if sig[0].dtype == types.float32}
        assert {types.none, types.boolean} <= kinds, rows


def test_warmup_reductions_and_bad_names():
    from lossforge.warmup import warmup

    done = warmup(["nll_loss"], dtypes=("float64",), reductions=("mean", "none"))
    assert {w.call for w in done} == {
        "value",
        "value_and_grad",
        "value_and_grad (defaults)",
        "value (none)",
        "value_and_grad (none)",
    }
    # the fast path's compiled check-and-kernel is among what was compiled
    fast = importlib.import_module("lossforge.plugins.multiclass.cpu")._checked_nll_loss
    assert any("float64" in str(s) for s in fast.signatures)
    similarity = warmup(["cosine_similarity"], dtypes=("float64",), reductions=("mean", "none"))
    assert len(similarity) == 4  # not reduced: one set of variants
    with pytest.raises(KeyError):
        warmup(["mse_los"])


# -- the asv suite -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asv_modules():
    sys.path.insert(0, str(ROOT / "asv_bench"))
    try:
        names = ["regression", "binary", "multiclass", "multilabel", "similarity", "startup"]
        yield {n: importlib.import_module(f"benchmarks.bench_{n}") for n in names}
    finally:
        sys.path.remove(str(ROOT / "asv_bench"))


def _loss_classes(modules):
    return {
        cls.loss: cls
        for m in modules.values()
        for _, cls in inspect.getmembers(m, inspect.isclass)
        if getattr(cls, "loss", "") and not cls.__name__.startswith("_")
    }


def test_asv_covers_every_registered_loss(asv_modules):
    classes = _loss_classes(asv_modules)
    assert set(LOSSES) <= set(classes)
    config = (ROOT / "asv_bench" / "asv.conf.json").read_text()
    assert '"environment_type": "virtualenv"' in config and '"repo": ".."' in config


@pytest.mark.parametrize("name", LOSSES)
def test_asv_setup_and_benchmarks_run(asv_modules, name):
    import numba

    cls = _loss_classes(asv_modules)[name]
    sizes = cls.params[0]
    assert 10**3 in sizes
    params = (10**3, "float32", 1)
    b = cls()
    before = numba.get_num_threads()
    b.setup(*params)
    try:
        assert numba.get_num_threads() == 1
        b.time_value(*params)
        b.time_value_and_grad(*params)
        b.peakmem_value_and_grad(*params)
        grads = b.out if isinstance(b.out, tuple) else (b.out,)
        assert all(np.all(np.isfinite(g)) for g in grads)
    finally:
        b.teardown(*params)
    assert numba.get_num_threads() == before


def test_asv_cross_entropy_shapes_and_skips(asv_modules):
    ce = asv_modules["multiclass"].CrossEntropy
    assert any(isinstance(p, tuple) for p in ce.params[0])
    b = ce()
    b.setup((64, 10), "float32", 1)
    b.time_value_and_grad((64, 10), "float32", 1)
    b.teardown((64, 10), "float32", 1)
    assert b.out.shape == (64, 10)

    class NotRegistered(asv_modules["regression"].MseLoss):
        loss = "not_a_loss"

    with pytest.raises(NotImplementedError):  # asv's "skipped"
        NotRegistered().setup(10**3, "float32", 1)
    NotRegistered().teardown(10**3, "float32", 1)  # asv tears down after a skip too


def test_asv_startup_benchmarks(asv_modules):
    startup = asv_modules["startup"]
    assert startup.Import().timeraw_import_lossforge() == "import lossforge"
    first = startup.FirstCall()
    first.setup("mse_loss")
    stmt, setup = first.timeraw_first_call("mse_loss")
    namespace: dict = {}
    exec(setup, namespace)  # what the timed fresh interpreter runs
    exec(stmt, namespace)
