"""Start-up costs, each in a fresh interpreter (asv's ``timeraw_``): ``import lossforge``
beside ``import numba`` (lossforge's import must not import Numba nor compile), and the first
call of a loss in a process whose Numba cache is warm (registry, Numba and thread pool start,
kernel loaded from the cache)."""

from typing import ClassVar

from .common import CASE_INPUTS, CASES, case_inputs, skip


class Import:
    def timeraw_import_lossforge(self):
        return "import lossforge"

    def timeraw_import_numba(self):
        return "import numba"


class FirstCall:
    """``value_and_grad`` on 1000 elements (the serial kernel), after ``import lossforge``,
    for every case of ``bench_losses.Losses``."""

    params: ClassVar[list] = [CASES]
    param_names: ClassVar[list] = ["case"]
    timeout = 600

    def setup(self, case):
        loss, _, _ = case_inputs(case, 1000, "float32")
        try:
            from lossforge.warmup import warmup
        except ImportError:
            skip("this lossforge has no lossforge.warmup")
        warmup([loss.name], dtypes=("float32",))  # the cache the timed process will find

    def timeraw_first_call(self, case):
        name, variant = CASE_INPUTS[case]
        setup = (
            "import lossforge as lf\n"
            "from lossforge.inputs import draw\n"
            f"fn = lf.get({name!r})\n"
            f"arrays = draw(fn, 1000, 'float32', 0, {variant!r})"
        )
        return "fn.value_and_grad(*arrays)", setup
