"""Every loss works in a child of ``fork()`` made after the parent ran parallel kernels, and
gives the parent's bits: what PyTorch's DataLoader, fork-based ``multiprocessing`` pools and
pre-forking servers do. With GNU OpenMP (Numba's ``omp`` layer on Linux) such a child used
to be killed at its first parallel kernel, and a pool's ``map`` never returned."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

import lossforge as lf
from lossforge.testing import _example

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

#: Elements per input: above every kernel's ``parallel_min`` (nll_loss's is 2^17), so each
#: call in the parent runs the parallel variant.
SIZE = 1 << 18

#: Seconds a child may take: it inherits the compiled kernels, so it needs well under one;
#: a child killed at its first parallel call makes a pool hang, and this turns that into a
#: failure.
TIMEOUT = 120

# Filled in the parent before forking; children read them from the memory they inherit.
INPUTS: dict[str, tuple[tuple, dict]] = {}


def compute(name: str) -> list[bytes]:
    arrays, options = INPUTS[name]
    value, grad = lf.get(name).value_and_grad(*arrays, **options)
    grads = grad if isinstance(grad, tuple) else (grad,)
    return [np.asarray(value).tobytes()] + [g.tobytes() for g in grads]


@pytest.fixture(scope="module")
def parent_results():
    """Each loss's value and gradients computed in this process, the parallel variants
    having run; the serial variants are compiled here too, so children compile nothing."""
    results = {}
    for i, name in enumerate(lf.list_losses()):
        loss = lf.get(name)
        small, small_options = _example(loss, np.random.default_rng(i), 64, np.float32)
        loss.value_and_grad(*small, **small_options)
        INPUTS[name] = _example(loss, np.random.default_rng(i), SIZE, np.float32)
        results[name] = compute(name)
    return results


def test_fork_pool_computes_every_loss_as_the_parent(parent_results):
    names = list(parent_results)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(compute, names, chunksize=1).get(timeout=TIMEOUT)
    for name, result in zip(names, got):
        assert result == parent_results[name], f"{name}: the child's result differs"


def _check_in_child(parent_results: dict) -> bool:
    return all(compute(name) == expected for name, expected in parent_results.items())


def _wait(pid: int) -> int:
    """The exit status of child ``pid``; killed and a failure after ``TIMEOUT`` seconds."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} did not finish in {TIMEOUT} s")


def test_plain_fork_child_and_grandchild(parent_results):
    pid = os.fork()
    if pid == 0:  # the child: exits with a code, never returns into pytest
        code = 1
        try:
            if _check_in_child(parent_results):
                grandchild = os.fork()  # a fork of a fork inherits the same thread state
                if grandchild == 0:
                    os._exit(0 if _check_in_child(parent_results) else 1)
                _, status = os.waitpid(grandchild, 0)
                code = 0 if status == 0 else 2
        finally:
            os._exit(code)
    status = _wait(pid)
    assert os.WIFEXITED(status), f"the child was killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0, {1: "the child's results differ", 2: "the grandchild"}[
        os.WEXITSTATUS(status)
    ]
