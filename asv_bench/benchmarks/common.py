"""What every benchmark shares: the parameters and the inputs.

Inputs come from each loss's own ``LossSpec.example`` through ``lossforge.inputs.draw``
(seed 0, default options: the same as ``python -m lossforge bench`` uses), so a third-party
loss that declares ``example=`` is benchmarked too. A *case* is a loss and one of the input
kinds it declares (``LossSpec.example_variants``): ``'mse_loss'``,
``'cross_entropy[classes=10]'``. Changing a loss's ``example`` changes its benchmark's
inputs: compare commits on either side of such a change with care.

Kernels are compiled, or loaded from Numba's cache, in ``setup``, so that no timing includes
compilation. A case that the installed lossforge does not register (an older commit under
``asv continuous``), or a lossforge without ``lossforge.inputs.draw``, makes ``setup`` raise
``NotImplementedError``: asv's "skipped".

``LOSSFORGE_ASV_QUICK=1`` (set by ``asv_bench/ci_quick.sh``) shrinks the parameters so that
a pass over every benchmark takes a minute or two (asv starts a process for each parameter
combination, a second or more each): one case a loss family (the test suite benches every
loss, ``tests/test_bench.py``), 3 * 10^5 elements
(above ``PARALLEL_MIN``: the parallel kernels; the test suite runs the serial ones), float32
only, 2 threads only.
"""

from __future__ import annotations

import os

import lossforge

QUICK = os.environ.get("LOSSFORGE_ASV_QUICK", "") not in ("", "0")

SIZES = [3 * 10**5] if QUICK else [10**3, 10**5, 10**7]
DTYPES = ["float32"] if QUICK else ["float32", "float64"]
THREADS = [2] if QUICK else [1, 2]


def _cases() -> dict[str, tuple[str, dict]]:
    """``{case: (loss name, example keywords)}`` for every registered loss."""
    try:
        from lossforge.inputs import label, variants
    except ImportError:  # an older lossforge: every case skips in setup
        return {name: (name, {}) for name in lossforge.list_losses()}
    cases = {}
    for name in lossforge.list_losses():
        for variant in variants(lossforge.get(name)):
            cases[f"{name}[{label(variant)}]" if variant else name] = (name, variant)
    return cases


CASE_INPUTS = _cases()
CASES = list(CASE_INPUTS)
if QUICK:  # the first case of the first three families (element-wise, row-wise and softmax
    # losses among them): every loss runs the same benchmark code, which is what the quick
    # pass checks, and asv starts a process per case and benchmark (a case a family, ten,
    # took CI over 3 minutes); the suite's bench test runs every loss
    _first: dict[str, str] = {}
    for _case, (_name, _) in CASE_INPUTS.items():
        _first.setdefault(lossforge.get(_name).spec.family, _case)
    CASES = list(_first.values())[:3]


def skip(reason: str) -> None:
    """asv's way to skip a parameter combination from ``setup``."""
    raise NotImplementedError(reason)


def lossforge_loss(name: str):
    """The registered loss ``name``, or skip."""
    import lossforge as lf

    if name not in lf.list_losses():
        skip(f"{name} is not registered in this lossforge")
    return lf.get(name)


def case_inputs(case: str, size: int, dtype: str):
    """``(loss, arrays, positions of the differentiable arrays)`` for ``case``, or skip."""
    try:
        from lossforge.inputs import draw, positions
    except ImportError:
        skip("this lossforge has no lossforge.inputs.draw")
    if case not in CASE_INPUTS:
        skip(f"{case} is not a case of this lossforge")
    name, variant = CASE_INPUTS[case]
    loss = lossforge_loss(name)
    return loss, draw(loss, size, dtype, 0, variant), positions(loss)


def set_threads(threads: int) -> int:
    """Set Numba's thread count (skip when the pool is smaller); returns the previous one."""
    import numba

    if threads > numba.config.NUMBA_NUM_THREADS:
        skip(f"{threads} threads asked for, NUMBA_NUM_THREADS is {numba.config.NUMBA_NUM_THREADS}")
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    return before
