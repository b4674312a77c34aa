"""The framework adapters: ``cross_entropy`` forward + backward through ``lossforge.torch``
(``CrossEntropyLoss``) and ``lossforge.jax`` (``jax.jit(jax.value_and_grad(...))``), beside
the framework's own loss and the bare ``value_and_grad`` (a new gradient per call, as an
autograd step makes): the bridge's overhead is the adapter's time over the bare one. The same
as ``python -m lossforge bench --loss cross_entropy --adapter torch --adapter jax``.

A missing PyTorch, JAX or adapter module skips (asv's ``NotImplementedError`` from setup).
Under ``LOSSFORGE_ASV_QUICK=1``: one class count and one size (asv starts a process per
benchmark and parameter set, and each imports its framework).
"""

from typing import ClassVar

from .common import CASE_INPUTS, CASES, QUICK, SIZES, THREADS, case_inputs, set_threads, skip

CROSS_ENTROPY = [c for c in CASES if CASE_INPUTS[c][0] == "cross_entropy"]
if QUICK:
    CROSS_ENTROPY, SIZES = CROSS_ENTROPY[:1], SIZES[-1:]


def _module(name):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip(f"{name} cannot be imported: {exc}")


class TorchCrossEntropy:
    """``time_lossforge_torch``: ``lossforge.torch.CrossEntropyLoss`` then
    ``torch.autograd.grad``; ``time_torch``: the same with ``torch.nn.CrossEntropyLoss``;
    ``time_value_and_grad``: lossforge's ``value_and_grad`` on the same arrays."""

    params: ClassVar[list] = [CROSS_ENTROPY, SIZES, THREADS]
    param_names: ClassVar[list] = ["case", "size", "threads"]
    timeout = 600

    def setup(self, case, size, threads):
        torch = _module("torch")
        lft = _module("lossforge.torch")
        self.loss, self.arrays, _ = case_inputs(case, size, "float32")
        self.before = set_threads(threads)
        self.torch_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.x = torch.from_numpy(self.arrays[0]).requires_grad_(True)
        self.t = torch.from_numpy(self.arrays[1]).long()
        self.ours, self.theirs = lft.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
        self.grad = torch.autograd.grad
        self.time_lossforge_torch(case, size, threads)  # compiles, or loads from the cache
        self.time_value_and_grad(case, size, threads)

    def teardown(self, case, size, threads):
        if getattr(self, "before", None) is not None:
            import numba
            import torch

            numba.set_num_threads(self.before)
            torch.set_num_threads(self.torch_before)

    def time_lossforge_torch(self, case, size, threads):
        self.grad(self.ours(self.x, self.t), [self.x])

    def time_torch(self, case, size, threads):
        self.grad(self.theirs(self.x, self.t), [self.x])

    def time_value_and_grad(self, case, size, threads):
        self.loss.value_and_grad(*self.arrays)


class JaxCrossEntropy:
    """``time_lossforge_jax``: ``jax.jit(jax.value_and_grad(lossforge.jax.cross_entropy))``;
    ``time_jax``: the same with cross entropy written with ``jax.nn.log_softmax`` (JAX's
    threads are XLA's, whatever ``threads`` says; it sets lossforge's kernel's)."""

    params: ClassVar[list] = [CROSS_ENTROPY, SIZES, THREADS]
    param_names: ClassVar[list] = ["case", "size", "threads"]
    timeout = 600

    def setup(self, case, size, threads):
        jax = _module("jax")
        lfj = _module("lossforge.jax")
        from lossforge.bench import _jax_own_cross_entropy

        _, arrays, _ = case_inputs(case, size, "float32")
        self.before = set_threads(threads)
        self.z, self.y = jax.numpy.asarray(arrays[0]), jax.numpy.asarray(arrays[1])
        self.ours = jax.jit(jax.value_and_grad(lfj.cross_entropy))
        self.theirs = jax.jit(jax.value_and_grad(_jax_own_cross_entropy))
        self.block = jax.block_until_ready
        self.time_lossforge_jax(case, size, threads)  # traces and compiles both
        self.time_jax(case, size, threads)

    def teardown(self, case, size, threads):
        if getattr(self, "before", None) is not None:
            import numba

            numba.set_num_threads(self.before)

    def time_lossforge_jax(self, case, size, threads):
        self.block(self.ours(self.z, self.y))

    def time_jax(self, case, size, threads):
        self.block(self.theirs(self.z, self.y))
