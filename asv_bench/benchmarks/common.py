"""What every loss's benchmarks share: the parameters and the base class.

Inputs come from :mod:`lossforge.inputs` (seeded, realistic, the same as
``python -m lossforge bench`` uses). Kernels are compiled, or loaded from Numba's cache, in
``setup``, so that no timing includes compilation. A loss that the installed lossforge does
not register (an older commit under ``asv continuous``), or a lossforge without
``lossforge.inputs``, makes ``setup`` raise ``NotImplementedError``: asv's "skipped".

``LOSSFORGE_ASV_QUICK=1`` (set by ``asv_bench/ci_quick.sh``) shrinks the parameters so that
a pass over every benchmark takes a few minutes (asv starts a process for each parameter
combination): 10^3 and 3 * 10^5 elements (above ``PARALLEL_MIN``, so both the serial and the
parallel kernels run), for ``cross_entropy`` the shapes (64, 10) and (2000, 1000), float32
only, 2 threads only.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np

QUICK = os.environ.get("LOSSFORGE_ASV_QUICK", "") not in ("", "0")

SIZES = [10**3, 3 * 10**5] if QUICK else [10**3, 10**5, 10**7]
#: Extra (rows, classes) shapes of cross_entropy.
SHAPES = [(64, 10), (2000, 1000)] if QUICK else [(10**6, 10), (10**4, 1000), (313, 32000)]
DTYPES = ["float32"] if QUICK else ["float32", "float64"]
THREADS = [2] if QUICK else [1, 2]


def skip(reason: str) -> None:
    """asv's way to skip a parameter combination from ``setup``."""
    raise NotImplementedError(reason)


def lossforge_loss(name: str):
    """The registered loss ``name``, or skip."""
    import lossforge as lf

    if name not in lf.list_losses():
        skip(f"{name} is not registered in this lossforge")
    return lf.get(name)


def make_inputs(name, size, dtype):
    """``lossforge.inputs.make_inputs`` with seed 0, or skip if this lossforge lacks it."""
    try:
        from lossforge.inputs import make_inputs as factory
    except ImportError:
        skip("this lossforge has no lossforge.inputs")
    return factory(name, size, dtype, np.random.default_rng(0))


def set_threads(threads: int) -> int:
    """Set Numba's thread count (skip when the pool is smaller); returns the previous one."""
    import numba

    if threads > numba.config.NUMBA_NUM_THREADS:
        skip(f"{threads} threads asked for, NUMBA_NUM_THREADS is {numba.config.NUMBA_NUM_THREADS}")
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    return before


class _LossBenchmark:
    """A loss's benchmarks; subclasses set ``loss`` (and may replace ``params``).

    ``time_value``: the value alone (``loss(*arrays)``). ``time_value_and_grad``: value and
    gradient into a preallocated ``out=``. ``peakmem_value_and_grad``: the process's peak
    memory over a value-and-gradient call that allocates its gradient (inputs included).
    """

    loss = ""
    params: ClassVar[list] = [SIZES, DTYPES, THREADS]
    param_names: ClassVar[list] = ["size", "dtype", "threads"]
    timeout = 600  # a cold Numba cache compiles for seconds in setup

    def setup(self, size, dtype, threads):
        self.fn = lossforge_loss(self.loss)
        self.arrays, self.options = make_inputs(self.loss, size, dtype)
        self.before = set_threads(threads)
        n = len(self.fn.differentiable)
        out = tuple(np.empty_like(a) for a in self.arrays[:n])
        self.out = out[0] if n == 1 else out
        # Compile (or load from Numba's cache) every variant that the timings call.
        self.fn(*self.arrays, **self.options)
        self.fn.value_and_grad(*self.arrays, out=self.out, **self.options)

    def teardown(self, size, dtype, threads):
        before = getattr(self, "before", None)  # asv tears down after a skipped setup too
        if before is not None:
            import numba

            numba.set_num_threads(before)

    def time_value(self, size, dtype, threads):
        self.fn(*self.arrays, **self.options)

    def time_value_and_grad(self, size, dtype, threads):
        self.fn.value_and_grad(*self.arrays, out=self.out, **self.options)

    def peakmem_value_and_grad(self, size, dtype, threads):
        self.fn.value_and_grad(*self.arrays, **self.options)
