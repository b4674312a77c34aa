"""Throughput of lossforge.dask on a local cluster of 2 worker processes (one thread each)
against the in-memory call (one process, 2 Numba threads) on the same data, and the cost of
the number of chunks. ``python benchmarks/dask_bench.py --help``; figures in docs/dask.md."""

from __future__ import annotations

import argparse
import statistics
import time

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster

import lossforge as lf
import lossforge.dask as lfd

REREAD = False  # persisted inputs: held, not read again


def _median(f, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=10**7)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 8, 32, 128, 512])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(args.size, np.float32)
    y = rng.standard_normal(args.size, np.float32)
    gb = 3 * x.nbytes / 1e9  # read input and target, write the gradient
    lf.mse_loss.value_and_grad(x, y)
    memory = _median(lambda: lf.mse_loss.value_and_grad(x, y), args.repeat)
    print(f"mse_loss value_and_grad, {args.size} float32")
    print(f"in memory, 2 Numba threads: {memory * 1e3:8.1f} ms  {gb / memory:5.1f} GB/s")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(lfd.NumbaThreads())
        for n in args.chunks:
            dx, dy = (da.from_array(a, chunks=-(-args.size // n)).persist() for a in (x, y))

            def run(dx=dx, dy=dy):
                value, grad = lfd.mse_loss.value_and_grad(dx, dy, reread=REREAD)
                return dask.compute(value, grad.sum())  # the gradient stays on the workers

            run()
            t = _median(run, args.repeat)
            print(
                f"dask, 2 workers, {n:4d} chunks: {t * 1e3:8.1f} ms  {gb / t:5.1f} GB/s"
                f"  ({t / memory:4.1f}x in memory)"
            )


if __name__ == "__main__":
    main()
