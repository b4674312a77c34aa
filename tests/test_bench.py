"""The benchmark tooling: lossforge.inputs, the bench command, warmup, and the asv suite.

Small sizes only: the point is that every piece runs and produces what it promises (valid
inputs from each loss's example, agreeing peers, the documented JSON, compiled variants),
not timings.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lossforge as lf
from lossforge import LossSpec, bench, inputs

ROOT = Path(__file__).resolve().parents[1]
LOSSES = lf.list_losses()


# -- inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("name", LOSSES)
def test_draw_gives_valid_inputs_for_the_default_options(name, dtype):
    loss = lf.get(name)
    assert inputs.variants(loss), f"{name} declares no example"
    for variant in inputs.variants(loss):
        arrays = inputs.draw(loss, 3000, dtype, np.random.default_rng(5), variant)
        assert len(arrays) == len(loss.arguments)
        for i, a in enumerate(arrays):
            assert a.flags.c_contiguous
            if i in inputs.positions(loss):
                assert a.dtype == np.dtype(dtype)
        value, grads = loss.value_and_grad(*arrays)
        assert np.all(np.isfinite(np.asarray(value, np.float64)))
        grads = grads if isinstance(grads, tuple) else (grads,)
        for g, k in zip(grads, inputs.positions(loss), strict=True):
            assert g.shape == arrays[k].shape
            assert np.all(np.isfinite(g.astype(np.float64)))


def test_draw_is_seeded_and_takes_the_variant():
    ce = lf.get("cross_entropy")
    a1 = inputs.draw(ce, 10_000, "float64", 7, {"classes": 100})
    a2 = inputs.draw(ce, 10_000, "float64", np.random.default_rng(7), {"classes": 100})
    a3 = inputs.draw(ce, 10_000, "float64", 8, {"classes": 100})
    assert all(np.array_equal(x, y) for x, y in zip(a1, a2, strict=True))
    assert not np.array_equal(a1[0], a3[0])
    assert a1[0].shape == (100, 100) and a1[1].dtype == np.int64
    assert inputs.draw(ce, 10**6, "float32", 0, {"classes": 32000})[0].shape == (31, 32000)
    assert inputs.label({"classes": 10}) == "classes=10" and inputs.label({}) == ""
    with pytest.raises(TypeError, match="floating"):
        inputs.draw(lf.get("mse_loss"), 10, "int32")
    # mse_loss (input, target, gradient) and cross_entropy (logits, int64 targets, gradient)
    mse = inputs.draw(lf.get("mse_loss"), 2000, "float32")
    assert inputs.nbytes_fused(lf.get("mse_loss"), mse) == 3 * 2000 * 4
    z, t = inputs.draw(ce, 640, "float32", 0, {"classes": 10})
    assert inputs.nbytes_fused(ce, (z, t)) == 64 * 10 * 4 * 2 + 64 * 8


def test_variants_of_a_loss_without_example():
    class Bare:
        name = "bare"
        spec = LossSpec(name, "x", ("input",), ("input",), {}, prepare=None)

    assert inputs.variants(Bare()) == []
    with pytest.raises(ValueError, match="bare declares no LossSpec"):
        inputs.draw(Bare(), 10)


# -- a third-party loss -----------------------------------------------------------------------
class _ThirdParty:
    """An in-process plugin: ``third_party_loss`` is mse under another name, with an example
    that declares two variants (rows of 4 and of 16)."""

    @staticmethod
    def example(rng, size, dtype, width=8):
        shape = (max(size // width, 1), width)
        x = rng.standard_normal(shape).astype(dtype)
        return (x, rng.standard_normal(shape).astype(dtype)), {"reduction": "sum"}

    def __init__(self):
        self.mse = lf.get("mse_loss").spec  # borrowed: prepare and kernel

    @lf.hookimpl
    def lossforge_losses(self):
        mse = self.mse
        yield LossSpec(
            name="third_party_loss",
            family="test",
            arguments=mse.arguments,
            differentiable=mse.differentiable,
            options=dict(mse.options),
            prepare=mse.prepare,
            example=self.example,
            example_variants=({"width": 4}, {"width": 16}),
        )

    @lf.hookimpl
    def lossforge_kernels(self):
        from lossforge.plugins.regression import KERNELS

        kernel, _ = KERNELS["mse_loss"]
        yield lf.KernelSpec("third_party_loss", "cpu", kernel.cpu)


@pytest.fixture
def third_party():
    from lossforge.registry import registry

    plugin = _ThirdParty()
    registry.register(plugin, "third-party-test")
    try:
        assert "third_party_loss" in lf.list_losses()
        yield "third_party_loss"
    finally:
        registry.unregister("third-party-test")
    assert "third_party_loss" not in lf.list_losses()


def test_a_third_party_loss_is_benched_and_warmed(third_party, tmp_path, capsys):
    from lossforge.warmup import warmup

    done = warmup([third_party], dtypes=("float32",))
    assert {w.variant for w in done} == {
        f"{v} (width={w})" for v in ("serial", "parallel") for w in (4, 16)
    }
    path = tmp_path / "bench.json"
    argv = ["--quick", "--sizes", "1000", "--threads", "1", "--min-time", "0", "--repeat", "1"]
    assert bench.main([*argv, "--skip", "torch", "--json", str(path)]) == 0
    rows = [r for r in json.loads(path.read_text())["results"] if r["loss"] == third_party]
    assert [(r["variant"], r["shape"]) for r in rows] == [
        ({"width": 4}, [250, 4]),
        ({"width": 16}, [62, 16]),
    ]
    assert rows[0]["torch"] is None  # torch.nn.functional has no such function
    assert third_party in capsys.readouterr().out


def test_bench_quick_writes_the_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--quick", "--loss", "mse_loss", "--loss", "cross_entropy", "--sizes", "2000"]
    argv += ["--threads", "1", "--min-time", "0", "--repeat", "2", "--json", str(path)]
    assert bench.main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads(path.read_text())
    assert set(report) == {"machine", "dtype", "threads", "floor", "results"}
    assert report["dtype"] == "float32" and report["threads"] == [1]
    assert report["machine"]["numba_threads"] >= 1
    floor = report["floor"]["1"]
    assert floor["gbps"] > 0.1 and floor["bytes"] == 3 * 8 * bench.TRIAD_N
    rows = report["results"]
    # mse_loss declares no variants; cross_entropy its class counts, in order
    assert [(r["loss"], r["variant"], r["shape"]) for r in rows] == [
        ("mse_loss", {}, [250, 8]),
        ("cross_entropy", {"classes": 10}, [200, 10]),
        ("cross_entropy", {"classes": 100}, [20, 100]),
        ("cross_entropy", {"classes": 1000}, [2, 1000]),
        ("cross_entropy", {"classes": 32000}, [1, 32000]),
    ]
    for r in rows:
        assert r["threads"] == 1 and r["dtype"] == "float32"
        assert r["lossforge"]["median_s"] > 0 and r["lossforge"]["repeats"] >= 2
        assert math.isclose(r["gbps"], r["bytes"] / r["lossforge"]["median_s"] / 1e9)
        assert math.isclose(r["floor_fraction"], r["gbps"] / floor["gbps"])
        if report["machine"]["torch"] is not None:
            assert r["torch"]["ok"] is True, r["torch"]
            assert math.isclose(
                r["torch"]["ratio"], r["torch"]["median_s"] / r["lossforge"]["median_s"]
            )
    # mse_loss, 2000 float32: input and target read, gradient written.
    assert rows[0]["bytes"] == 3 * 2000 * 4
    assert "cross_entropy" in out and "200x10" in out and "GB/s" in out and "floor" in out
    assert "[5/5] cross_entropy 1x32000" in err  # progress goes to stderr


def test_bench_example_keywords_replace_the_variants(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--loss", "cross_entropy", "--loss", "mse_loss", "--sizes", "640", "--threads", "1"]
    argv += ["--example", "classes=10", "--min-time", "0", "--repeat", "1", "--skip", "torch"]
    assert bench.main([*argv, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["loss"], r["shape"]) for r in rows] == [("cross_entropy", [64, 10])]
    assert "mse_loss example(classes=10)" in capsys.readouterr().err  # left out, said why
    assert bench._keyword("classes=10") == ("classes", 10)
    assert bench._keyword("scale=0.5") == ("scale", 0.5)
    assert bench._keyword("kind=long") == ("kind", "long")


def test_bench_through_the_cli(tmp_path, capsys):
    from lossforge.__main__ import main

    path = tmp_path / "b.json"
    argv = ["bench", "--quick", "--loss", "l1_loss", "--sizes", "500", "--threads", "1"]
    argv += ["--min-time", "0", "--repeat", "1", "--skip", "torch"]
    assert main([*argv, "--json", str(path)]) == 0
    assert json.loads(path.read_text())["results"][0]["loss"] == "l1_loss"


def test_bench_usage_errors(capsys):
    assert bench.main(["--loss", "mse_los"]) == 2
    assert "unknown loss 'mse_los'" in capsys.readouterr().err
    assert bench.main(["--threads", "10000"]) == 2
    assert "--threads must be in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "1.5"])


def test_size_parsing():
    assert [bench._count(s) for s in ("1000", "1_000", "1e6", "10**7", "10^4")] == [
        1000,
        1000,
        10**6,
        10**7,
        10**4,
    ]


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
def test_table_marks_a_median_far_above_the_fastest_repeat():
    def row(loss, median, fastest):
        timing = {"median_s": median, "min_s": fastest, "repeats": 9, "inner": 1}
        return {
            "loss": loss,
            "label": "1000",
            "threads": 2,
            "lossforge": timing,
            "gbps": 1.0,
            "floor_fraction": 0.5,
            "torch": None,
        }

    machine = {"lossforge": "x", "numba": "x", "numpy": "x", "torch": None, "cpu_count": 2}
    report = {
        "machine": machine,
        "dtype": "float32",
        "floor": {"2": {"gbps": 2.0}},
        "results": [row("waited", 8e-3, 2e-4), row("steady", 3e-4, 2e-4)],
    }
    lines = bench.format_table(report).splitlines()
    waited = next(line for line in lines if line.startswith("waited"))
    steady = next(line for line in lines if line.startswith("steady"))
    assert "8.00 ms ~" in waited
    assert "~" not in steady and "300.0 us" in steady


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
        f"{v} (classes={c})" for v in ("serial", "parallel") for c in (10, 100, 1000, 32000)
    }
    from numba import types

    module = importlib.import_module("lossforge.plugins.multiclass")
    few_kernel, index_kernel = module.CROSS_ENTROPY.kernels[:2]
    for variant in ("serial", "parallel"):
        few = getattr(few_kernel, variant).signatures
        assert any(sig[0].dtype == types.float32 for sig in few)
        # argument 6, long_rows: None for rows of up to 256 classes, True for longer ones
        rows = getattr(index_kernel, variant).signatures
        kinds = {sig[6] for sig in rows if sig[0].dtype == types.float32}
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
        yield {n: importlib.import_module(f"benchmarks.bench_{n}") for n in ("losses", "startup")}
    finally:
        sys.path.remove(str(ROOT / "asv_bench"))


def test_asv_covers_every_registered_loss_and_variant(asv_modules):
    common = sys.modules["benchmarks.common"]
    cases = asv_modules["losses"].Losses.params[0]
    assert cases == common.CASES
    assert {common.CASE_INPUTS[c][0] for c in cases} == set(LOSSES)
    assert "mse_loss" in cases and "cross_entropy[classes=32000]" in cases
    config = (ROOT / "asv_bench" / "asv.conf.json").read_text()
    assert '"environment_type": "virtualenv"' in config and '"repo": ".."' in config


@pytest.mark.parametrize(
    "case", ["mse_loss", "cross_entropy[classes=10]", "cosine_similarity[features=128]"]
)
def test_asv_setup_and_benchmarks_run(asv_modules, case):
    import numba

    cls = asv_modules["losses"].Losses
    assert 10**3 in cls.params[1]
    params = (case, 10**3, "float32", 1)
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


def test_asv_skips_an_unknown_case(asv_modules):
    b = asv_modules["losses"].Losses()
    with pytest.raises(NotImplementedError):  # asv's "skipped"
        b.setup("not_a_loss", 10**3, "float32", 1)
    b.teardown("not_a_loss", 10**3, "float32", 1)  # asv tears down after a skip too


def test_asv_startup_benchmarks(asv_modules):
    startup = asv_modules["startup"]
    assert startup.Import().timeraw_import_lossforge() == "import lossforge"
    first = startup.FirstCall()
    first.setup("cross_entropy[classes=10]")
    stmt, setup = first.timeraw_first_call("cross_entropy[classes=10]")
    namespace: dict = {}
    exec(setup, namespace)  # what the timed fresh interpreter runs
    exec(stmt, namespace)
    assert namespace["arrays"][0].shape == (100, 10)
