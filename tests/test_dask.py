"""lossforge.dask on a real dask.distributed cluster of worker processes on loopback, started
and stopped here (one for the module), against the in-memory losses; float64 NumPy references
where the in-memory loss is not already the reference (the mean of chunk means)."""

from __future__ import annotations

import math
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
import dask  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lossforge as lf  # noqa: E402
import lossforge.dask as lfd  # noqa: E402

# Dask's memory limit is below the example's data; the process-memory thresholds are off
# because a worker process (Python, NumPy, Numba) is larger than that limit by itself: what
# is capped is the data a worker holds, which Dask spills to disk above `target`.
MEMORY = {
    "distributed.worker.memory.target": 0.6,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.worker.memory.terminate": False,
}
LIMIT = "4MiB"


def _cluster(**kwargs):
    return distributed.LocalCluster(
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        **kwargs,
    )


@pytest.fixture(scope="module")
def client():
    with dask.config.set(MEMORY), _cluster(n_workers=2, memory_limit=LIMIT) as cluster:
        with distributed.Client(cluster) as c:
            c.register_plugin(lfd.NumbaThreads())
            yield c


def _chunks_of(a, dx):
    """``a`` cut where the Dask array ``dx`` has its chunk boundaries along axis 0."""
    return np.split(a, np.cumsum(dx.chunks[0])[:-1])


def _close(got, want):
    """Equal within float64 rounding (a weighted denominator, summed exactly here, is NumPy's
    pairwise sum in memory)."""
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


# -- values and gradients against the in-memory losses -----------------------------------------
def _cases(rng):
    x = rng.standard_normal(3000)
    y = rng.standard_normal(3000)
    w = rng.uniform(0.5, 2.0, 3000)
    logits = rng.standard_normal((300, 7))
    labels = rng.integers(0, 7, 300)
    labels[::11] = -1
    class_weight = rng.uniform(0.5, 2.0, 7)
    a, b = rng.standard_normal((2, 200, 6))
    sign = np.where(rng.random(200) < 0.5, -1.0, 1.0)
    bits = (rng.random((300, 7)) < 0.5).astype(np.float64)
    return [
        ("mse_loss", (x, y), {}, ((700, 1300, 1000),)),
        ("mse_loss", (x, y), {"weight": w}, (500,)),
        ("binary_cross_entropy_with_logits", (logits, bits), {"pos_weight": class_weight}, (64, 7)),
        ("cross_entropy", (logits, labels), {"weight": class_weight, "ignore_index": -1}, (37, 7)),
        ("cosine_embedding_loss", (a, b, sign), {"margin": 0.2}, (33, 6)),
    ]


CASES = _cases(np.random.default_rng(7))
IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(CASES)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mean_and_sum_match_in_memory(client, case):
    name, arrays, options, chunks = case
    loss, dloss = lf.get(name), lfd.get(name)
    x = da.from_array(arrays[0], chunks=chunks)
    expected_pair = loss.partial(*arrays, **options)
    ev, eg = loss.value_and_grad(*arrays, **options)
    ev_sum, eg_sum = loss.value_and_grad(*arrays, reduction="sum", grad_output=0.5, **options)
    before = [a.copy() for a in arrays]

    pair = dloss.partial(x, *arrays[1:], **options)
    value, grad = dloss.value_and_grad(x, *arrays[1:], **options)
    vsum, gsum = dloss.value_and_grad(x, *arrays[1:], reduction="sum", grad_output=0.5, **options)
    pair, value, grad, vsum, gsum = dask.compute(pair, value, grad, vsum, gsum)

    np.testing.assert_allclose(pair, expected_pair, rtol=1e-13)  # float64 rounding
    np.testing.assert_allclose(value, ev, rtol=1e-13)
    np.testing.assert_allclose(vsum, ev_sum, rtol=1e-13)
    assert value.dtype == ev.dtype and vsum.dtype == ev_sum.dtype
    # a chunk's "sum" gradient scaled by the global grad_output / denominator, as in memory
    for got, want in zip(*(g if isinstance(g, tuple) else (g,) for g in (grad, eg))):
        _close(got, want)
    for got, want in zip(*(g if isinstance(g, tuple) else (g,) for g in (gsum, eg_sum))):
        _close(got, want)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


def test_sum_is_bitwise_fsum_of_the_chunks_partials(client):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((2, 5000)) * 1e3
    chunks = (1, 999, 2000, 2000)
    dx, dy = da.from_array(x, chunks=(chunks,)), da.from_array(y, chunks=(chunks,))
    parts = [lf.mse_loss.partial(a, b) for a, b in zip(_chunks_of(x, dx), _chunks_of(y, dx))]
    value = lfd.mse_loss(dx, dy, reduction="sum", split_every=2).compute()
    assert value == math.fsum(p[0] for p in parts)
    # the tree's shape does not matter: its nodes keep exact sums
    assert value == lfd.mse_loss(dx, dy, reduction="sum", split_every=3).compute()
    one = lfd.mse_loss(da.from_array(x, chunks=-1), y, reduction="sum").compute()
    assert one == lf.mse_loss(x, y, reduction="sum")  # one chunk: the in-memory call itself


def test_mean_is_exact_where_the_mean_of_chunk_means_is_not(client):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((400, 5))
    labels = rng.integers(0, 5, 400)
    labels[:120] = -100  # ignored targets, most in the first chunks
    dx = da.from_array(logits, chunks=((50, 100, 250), 5))
    per_row = np.log(np.exp(logits).sum(1)) - logits[np.arange(400), np.maximum(labels, 0)]
    reference = per_row[labels != -100].mean()  # float64 NumPy
    chunk_means = [
        lf.cross_entropy(b, t)
        for b, t in zip(_chunks_of(logits, dx), _chunks_of(labels, dx))
        if (t != -100).any()
    ]
    value = lfd.cross_entropy(dx, labels).compute()
    np.testing.assert_allclose(value, reference, rtol=1e-12)
    assert abs(np.mean(chunk_means) - reference) > 1e-3  # the wrong way, measurably wrong


@given(
    cuts=st.lists(st.integers(1, 199), max_size=6, unique=True),
    split_every=st.integers(2, 5),
)
def test_any_chunking_gives_the_in_memory_mean(cuts, split_every):
    rng = np.random.default_rng(len(cuts))
    x, y = rng.standard_normal((2, 200))
    w = rng.uniform(0.5, 2.0, 200)
    sizes = tuple(np.diff([0, *sorted(cuts), 200]))
    dx = da.from_array(x, chunks=(sizes,))
    with dask.config.set(scheduler="sync"):  # the graph alone; the cluster is tested above
        value, grad = lfd.mse_loss.value_and_grad(dx, y, weight=w, split_every=split_every)
        value, grad = dask.compute(value, grad)
    ev, eg = lf.mse_loss.value_and_grad(x, y, weight=w)
    np.testing.assert_allclose(value, ev, rtol=1e-13)
    _close(grad, eg)


def test_rows_are_never_split(client):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((120, 10, 3))  # (N, C, d): the class axis is axis 1
    labels = rng.integers(0, 10, (120, 3))
    dx = da.from_array(logits, chunks=(40, 4, 3))  # classes split: rechunked
    value, grad = lfd.cross_entropy.value_and_grad(dx, labels)
    assert grad.chunks[1] == (10,)
    assert grad.chunks[0] == (16,) * 7 + (8,)  # rows that fit in a 40 x 4 x 3 chunk
    ev, eg = lf.cross_entropy.value_and_grad(logits, labels)
    value, grad = dask.compute(value, grad)
    np.testing.assert_allclose(value, ev, rtol=1e-13)
    _close(grad, eg)
    a, b = rng.standard_normal((2, 30, 8))
    sims = lfd.cosine_similarity(da.from_array(a, chunks=(7, 3)), b).compute()
    np.testing.assert_allclose(sims, (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1)))


def test_none_maps_chunk_by_chunk(client):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((90, 7))
    labels = rng.integers(0, 7, 90)
    go = rng.standard_normal(90)
    dx = da.from_array(logits, chunks=(25, 7))
    opts = {"reduction": "none", "weight": np.linspace(0.5, 2, 7)}
    value, grad = lfd.cross_entropy.value_and_grad(dx, labels, grad_output=go, **opts)
    assert value.chunks == ((25, 25, 25, 15),) and grad.chunks == dx.chunks
    ev, eg = lf.cross_entropy.value_and_grad(logits, labels, grad_output=go, **opts)
    value, grad = dask.compute(value, grad)
    np.testing.assert_array_equal(value, ev)
    np.testing.assert_array_equal(grad, eg)


def test_lazy_grad_output(client):
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((2, 1000))
    dx = da.from_array(x, chunks=300)
    g = lfd.mse_loss(dx, y) * 3.0  # a lazy upstream gradient
    grad = lfd.mse_loss.grad(dx, y, grad_output=g).compute()
    _close(grad, lf.mse_loss.grad(x, y, grad_output=3.0 * lf.mse_loss(x, y)))


# -- errors -------------------------------------------------------------------------------------
def test_bad_input_in_one_chunk_raises_the_in_memory_error(client):
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((100, 4))
    labels = rng.integers(0, 4, 100)
    labels[77] = 4
    dx = da.from_array(logits, chunks=(20, 4))
    with pytest.raises(IndexError) as memory:
        lf.cross_entropy(logits, labels)
    with pytest.raises(IndexError) as lazy:
        lfd.cross_entropy(dx, labels).compute()
    assert str(lazy.value) == str(memory.value)
    big = (labels % 4).astype(np.uint64)
    big[33] = 2**63  # wraps to a negative int64: refused, never taken for ignore_index
    with pytest.raises(ValueError) as memory:
        lf.cross_entropy(logits, big)
    with pytest.raises(ValueError) as lazy:
        lfd.cross_entropy.grad(dx, big).compute()
    assert str(lazy.value) == str(memory.value)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda x, y: lfd.mse_loss(x, y, reduction="avg"), ValueError),
        (lambda x, y: lfd.mse_loss(x, y[:5]), ValueError),
        (lambda x, y: lfd.mse_loss(x.astype(np.int32), y), TypeError),
        (lambda x, y: lfd.huber_loss(x, y, delta=-1.0), ValueError),
        (lambda x, y: lfd.mse_loss(x, y, weight=y[:3]), ValueError),
        (lambda x, y: lfd.mse_loss(x, y, beta=1.0), TypeError),
        (lambda x, y: lfd.mse_loss.grad(x, y, grad_output=np.ones(2)), ValueError),
        (lambda x, y: lfd.cosine_similarity.partial(x, y), TypeError),
    ],
)
def test_errors_when_the_graph_is_built(call, error):
    x = da.zeros(10, chunks=4)
    y = np.zeros(10)
    with pytest.raises(error):
        call(x, y)


# -- the cluster: threads, a dying worker, a cold start -----------------------------------------
def _numba_threads():
    import numba

    return numba.config.NUMBA_NUM_THREADS, lfd._per_task


def test_numba_threads_follow_the_worker(client):
    lfd.mse_loss(da.ones(10, chunks=5), np.ones(10)).compute()  # Numba started in the workers
    assert set(client.run(_numba_threads).values()) == {(1, 1)}  # threads_per_worker=1


def _slow(block):
    time.sleep(0.15)
    return block


def test_a_killed_worker_is_replaced_and_the_result_is_right(client):
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((2, 4000))
    dx = da.from_array(x, chunks=250).map_blocks(_slow, meta=np.empty(0))
    expected = lf.mse_loss.value_and_grad(x, y)
    value, grad = lfd.mse_loss.value_and_grad(dx, y)
    futures = client.compute([value, grad])
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 30
    while not any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # well into the computation (16 chunks x 0.15 s over 2 workers, twice)
    victim = next(w for w, tasks in client.processing().items() if tasks)
    os.kill(pids[victim], signal.SIGKILL)
    value, grad = client.gather(futures)
    np.testing.assert_allclose(value, expected[0], rtol=1e-13)
    np.testing.assert_array_equal(grad, expected[1])
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.run(os.getpid)  # a new worker took its place


def test_cold_start_of_several_workers(tmp_path):
    """Three worker processes, one empty kernel cache: they start compiling at once; the
    first compiles under the lock, the others load its kernels."""
    cache = tmp_path / "cache"
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((2, 600))
    env = {"LOSSFORGE_CACHE_DIR": str(cache), "NUMBA_CACHE_DIR": ""}  # "": unset
    with _cluster(n_workers=3, env=env) as cluster, distributed.Client(cluster) as c:
        c.register_plugin(lfd.NumbaThreads())
        dx = da.from_array(x, chunks=100)
        pair = lfd.mse_loss.partial(dx, y).compute()
        workers_used = len(c.run(os.getpid))
    np.testing.assert_allclose(pair, lf.mse_loss.partial(x, y), rtol=1e-13)
    assert workers_used == 3
    assert (cache / lf.__version__ / "dask-compile.lock").exists()
    assert list(cache.rglob("*.nbi")), "the workers wrote the kernel cache"


# -- the out-of-core example of docs/dask.md ----------------------------------------------------
def _example():
    text = (Path(__file__).parent.parent / "docs" / "dask.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def out_of_core" in b)
    namespace = {"__name__": "dask_example"}
    exec(compile(code, "docs/dask.md", "exec"), namespace)
    return namespace


def _spilled(dask_worker):
    return dask_worker.data.cumulative_metrics.get(("disk-write", "count"), 0)


def test_out_of_core_example(client, tmp_path, capsys):
    example = _example()
    rows = 300_000  # 2 x 4.8 MB of float32 inputs, above the 2 x 4 MiB the workers may hold
    logits_path, labels_path = example["make_data"](str(tmp_path), rows, columns=4)
    x, y = np.load(logits_path), np.load(labels_path)
    assert x.nbytes + y.nbytes > 2 * 4 * 2**20
    spilled = sum(client.run(_spilled).values())
    value = example["out_of_core"](client, str(tmp_path), chunk_rows=4096)
    x, y = x.astype(np.float64), y.astype(np.float64)  # a float64 NumPy reference
    np.testing.assert_allclose(value, np.mean(np.logaddexp(0, x) - y * x), rtol=1e-6)
    grad = (1 / (1 + np.exp(-x)) - y) / x.size
    np.testing.assert_allclose(np.load(tmp_path / "grad.npy"), grad, rtol=1e-5, atol=1e-12)
    assert sum(client.run(_spilled).values()) == spilled, "a worker spilled: chunks were held"
    assert "[" in capsys.readouterr().out  # the progress bar
    # holding the chunks between the passes instead needs more than the workers may hold
    dx = da.from_array(example["Npy"](logits_path), chunks=(4096, -1))
    dy = da.from_array(example["Npy"](labels_path), chunks=(4096, -1))
    held = lfd.binary_cross_entropy_with_logits.value_and_grad(dx, dy, reread=False)
    dask.compute(held[0], held[1].sum())
    assert sum(client.run(_spilled).values()) > spilled
