"""Start-up costs, each in a fresh interpreter (asv's ``timeraw_``): ``import lossforge``
beside ``import numba`` (lossforge's import must not import Numba nor compile), and the first
call of a loss in a process whose Numba cache is warm (registry, Numba and thread pool start,
kernel loaded from the cache)."""

from typing import ClassVar

from .common import lossforge_loss, skip

FIRST_CALL_LOSSES = ["mse_loss", "binary_cross_entropy_with_logits", "cross_entropy"]


class Import:
    def timeraw_import_lossforge(self):
        return "import lossforge"

    def timeraw_import_numba(self):
        return "import numba"


class FirstCall:
    """``value_and_grad`` on 1000 elements (the serial kernel), after ``import lossforge``."""

    params: ClassVar[list] = [FIRST_CALL_LOSSES]
    param_names: ClassVar[list] = ["loss"]
    timeout = 600

    def setup(self, loss):
        lossforge_loss(loss)
        try:
            from lossforge.warmup import warmup
        except ImportError:
            skip("this lossforge has no lossforge.warmup")
        warmup([loss], dtypes=("float32",))  # the cache the timed process will find

    def timeraw_first_call(self, loss):
        setup = (
            "import numpy as np, lossforge as lf\n"
            "from lossforge.inputs import make_inputs\n"
            f"arrays, options = make_inputs({loss!r}, 1000, 'float32', np.random.default_rng(0))\n"
            f"fn = lf.get({loss!r})"
        )
        return "fn.value_and_grad(*arrays, **options)", setup
