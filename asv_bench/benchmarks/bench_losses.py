"""Every registered loss that declares a ``LossSpec.example``, third parties' included: one
class, parametrized over (loss and input kind) x size x dtype x threads."""

from typing import ClassVar

from .common import CASES, DTYPES, SIZES, THREADS, case_inputs, set_threads


class Losses:
    """``time_value``: the value alone (``loss(*arrays)``). ``time_value_and_grad``: value and
    gradient into a preallocated ``out=``. ``peakmem_value_and_grad``: the process's peak
    memory over a value-and-gradient call that allocates its gradient (inputs included).
    """

    params: ClassVar[list] = [CASES, SIZES, DTYPES, THREADS]
    param_names: ClassVar[list] = ["case", "size", "dtype", "threads"]
    timeout = 600  # a cold Numba cache compiles for seconds in setup

    def setup(self, case, size, dtype, threads):
        self.fn, self.arrays, positions = case_inputs(case, size, dtype)
        self.before = set_threads(threads)
        out = tuple(self.arrays[k].copy() for k in positions)
        self.out = out[0] if len(out) == 1 else out
        # Compile (or load from Numba's cache) every variant that the timings call.
        self.fn(*self.arrays)
        self.fn.value_and_grad(*self.arrays, out=self.out)

    def teardown(self, case, size, dtype, threads):
        before = getattr(self, "before", None)  # asv tears down after a skipped setup too
        if before is not None:
            import numba

            numba.set_num_threads(before)

    def time_value(self, case, size, dtype, threads):
        self.fn(*self.arrays)

    def time_value_and_grad(self, case, size, dtype, threads):
        self.fn.value_and_grad(*self.arrays, out=self.out)

    def peakmem_value_and_grad(self, case, size, dtype, threads):
        self.fn.value_and_grad(*self.arrays)
