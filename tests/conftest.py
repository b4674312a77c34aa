import os

# Without a GPU the CUDA kernels run under Numba's simulator, read when numba is imported: set
# it before anything imports numba (NUMBA_ENABLE_CUDASIM=0 in the environment tests a real GPU).
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np
import pytest
from hypothesis import settings

# Kernels compile on first use (1-3 s each, cached on disk afterwards); property tests must
# not count that against their deadline.
settings.register_profile("lossforge", deadline=None, max_examples=40)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lossforge"))


def pytest_configure(config):
    # The pedantic SSA self-check that runtime.mathfn silences at import (see its comment);
    # here, not in pyproject.toml, where naming the category would import numba before the
    # simulator is switched on above.
    config.addinivalue_line("filterwarnings", "ignore::numba.core.errors.NumbaIRAssumptionWarning")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
