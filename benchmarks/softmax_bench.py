"""The softmax losses of ``lossforge.kernels.Softmax`` beside the same losses written in
PyTorch (forward + autograd backward, as training code writes them; PyTorch has no
functional form of them), and beside ``cross_entropy`` (the same template, the plain
formula), on float32 logits of 10^6 elements at a few class counts. One thread each by
default (``--threads``).

    python benchmarks/softmax_bench.py [--threads 1] [--classes 10 100 1000 32000]
"""

from __future__ import annotations

import argparse
import functools
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

import lossforge as lf


def _median_time(fn, repeat=7, min_time=0.3):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _torch_peers(x, t):
    z = torch.from_numpy(x).requires_grad_(True)
    tt = torch.from_numpy(t)

    def focal():
        lp = torch.log_softmax(z, 1).gather(1, tt[:, None])[:, 0]
        return (-((1 - lp.exp()) ** 2.0) * lp).mean()

    def poly1():
        lp = torch.log_softmax(z, 1).gather(1, tt[:, None])[:, 0]
        return (-lp + 1.0 * (1 - lp.exp())).mean()

    def z_loss():
        capped = 30.0 * torch.tanh(z / 30.0)
        return F.cross_entropy(capped, tt) + 1e-4 * (torch.logsumexp(capped, 1) ** 2).mean()

    def cross_entropy():
        return F.cross_entropy(z, tt)

    def step(f):
        return lambda: torch.autograd.grad(f(), z)

    return {
        "cross_entropy": step(cross_entropy),
        "softmax_focal_loss": step(focal),
        "poly1_cross_entropy": step(poly1),
        "softmax_cross_entropy (z_loss, softcap)": step(z_loss),
    }


def _ours(x, t, out):
    def call(name, **options):
        return functools.partial(lf.get(name).value_and_grad, x, t, out=out, **options)

    return {
        "cross_entropy": call("cross_entropy"),
        "softmax_cross_entropy (defaults)": call("softmax_cross_entropy"),
        "softmax_focal_loss": call("softmax_focal_loss"),
        "poly1_cross_entropy": call("poly1_cross_entropy"),
        "softmax_cross_entropy (z_loss, softcap)": call(
            "softmax_cross_entropy", z_loss=1e-4, softcap=30.0
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000, 32000])
    parser.add_argument("--size", type=float, default=1e6)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{'loss':42} {'shape':>12} {'lossforge':>10} {'torch':>10} {'torch/lf':>8}")
    for classes in args.classes:
        rows = int(args.size) // classes
        x = rng.standard_normal((rows, classes)).astype(np.float32)
        t = rng.integers(0, classes, rows)
        ours = _ours(x, t, np.empty_like(x))
        peers = _torch_peers(x, t)
        for name, fn in ours.items():
            mine = _median_time(fn)
            peer = peers.get(name)
            theirs = _median_time(peer) if peer is not None else None
            ratio = f"{theirs / mine:7.1f}x" if theirs else ""
            shown = f"{theirs * 1e3:8.2f}ms" if theirs else ""
            print(f"{name:42} {rows:>6}x{classes:<5} {mine * 1e3:8.2f}ms {shown:>10} {ratio:>8}")


if __name__ == "__main__":
    main()
