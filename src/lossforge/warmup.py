"""Compile lossforge's CPU kernels ahead of time: ``python -m lossforge warmup`` or
:func:`warmup`.

Every CPU kernel is a Numba function compiled on first use (1-3 s for each variant) and then
cached on disk (``cache=True``), so that later processes load it in milliseconds. A variant is
one combination of argument types: dtype, serial or parallel (inputs below or above a
kernel's ``parallel_min`` elements, ``lossforge.runtime.cpu.PARALLEL_MIN`` by default), and
which outputs are wanted (the value alone, or the value and the gradient). :func:`warmup`
calls each loss once per variant on the arrays of its own ``LossSpec.example`` (through
:func:`lossforge.inputs.draw`), which compiles the kernel, or loads it from the cache if it
is there already, and fills the cache for the next process: run it once after installing (a
Docker image build step, a job's setup) so that no training step pays for compilation.

It covers the losses' default options (and ``reduction="mean"``; no weights), on each of the
input kinds a loss declares in ``LossSpec.example_variants`` (e.g. ``cross_entropy``'s rows
of few classes, of up to 256 and of more: a kernel each); a loss that declares no
``example`` is skipped, with a line to ``progress``. ``reductions=("mean", "none")`` adds the
per-element-value variants. Other combinations (weights, probability targets, a
``grad_output`` array) are further variants, compiled on their first use.

Where the cache lives
---------------------
In a per-user directory keyed by lossforge's version, never inside the installed package
(``lossforge.runtime.cache``): ``$XDG_CACHE_HOME/lossforge/<version>/`` (``~/.cache/...`` by
default), or ``$LOSSFORGE_CACHE_DIR/<version>/``; ``NUMBA_CACHE_DIR=/some/dir`` overrides it
(Numba's own setting, for every module), e.g. to ship a warmed cache in an image or to share
one between users; the directory must be writable by whoever compiles first. An entry is
keyed on its source file's contents, the Numba version and the CPU: an upgrade or another CPU
model recompiles once. Run the warmup as the user (and with the environment) that will run
the code. A read-only install works: nothing is written beside the sources
(``tests/test_packaging.py`` checks an installed wheel's files before and after a call).

Importing this module compiles nothing and does not import Numba.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: Elements of the small (serial) inputs, and of the large (parallel) ones: above every
#: built-in kernel's ``parallel_min`` (nll_loss's is the highest, 131072).
SERIAL_SIZE = 1024
PARALLEL_SIZE = 1 << 18


@dataclass(frozen=True)
class Warmed:
    """One kernel variant compiled (or loaded from the cache)."""

    loss: str
    dtype: str
    # "serial" or "parallel", then the example's variant if the loss declares some:
    # "serial (classes=10)"
    variant: str
    # "value", "value_and_grad", "value_and_grad (defaults)" (no option named: the fast
    # path of KernelSpec.fast), "value (none)", "value_and_grad (none)"
    call: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.loss} {self.dtype} {self.variant} {self.call}: {self.seconds:.2f} s"


def warmup(
    names: Iterable[str] | None = None,
    dtypes: Sequence[str] = ("float32", "float64"),
    progress: Callable[[str], object] | None = None,
    *,
    reductions: Sequence[str] = ("mean",),
) -> list[Warmed]:
    """Compile (or load from Numba's cache) the CPU kernels of the losses ``names`` (default:
    every registered loss) for each dtype: serial and parallel variants, value and
    value-and-gradient, for each reduction in ``reductions`` (``"mean"`` stands for
    ``"sum"`` too: one kernel). Returns what was run, with the seconds each took (a few
    milliseconds when it came from the cache); ``progress`` gets a line for each.

    A loss without a ``LossSpec.example``, or whose ``example`` fails, is skipped with a line
    to ``progress``. An unknown name raises ``KeyError``.
    """
    import numpy as np

    import lossforge as lf
    from lossforge import inputs

    names = list(lf.list_losses() if names is None else names)
    for name in names:
        lf.get(name)  # KeyError with suggestions for a misspelt name
    done: list[Warmed] = []
    rng = np.random.default_rng(0)
    for name in names:
        loss = lf.get(name)
        if not inputs.variants(loss):
            if progress is not None:
                progress(f"{name}: no LossSpec.example, skipped")
            continue
        sizes = [
            (f"{kind} ({inputs.label(v)})" if v else kind, size, v)
            for kind, size in (("serial", SERIAL_SIZE), ("parallel", PARALLEL_SIZE))
            for v in inputs.variants(loss)
        ]
        for dtype in dtypes:
            dtype = np.dtype(dtype).name
            for variant, size, keywords in sizes:
                try:
                    arrays = inputs.draw(loss, size, dtype, rng, keywords)
                except Exception as exc:  # a third party's example
                    if progress is not None:
                        progress(f"{name} {dtype} {variant}: example failed: {exc!r}, skipped")
                    continue
                calls: list[tuple[str, Callable[..., Any], dict[str, str]]] = []
                for reduction in reductions if loss.reduced else reductions[:1]:
                    opts = {"reduction": reduction} if loss.reduced else {}
                    plain = not loss.reduced or reduction in ("mean", "sum")
                    suffix = "" if plain else f" ({reduction})"
                    calls.append(("value" + suffix, loss, opts))
                    calls.append(("value_and_grad" + suffix, loss.value_and_grad, opts))
                if loss.reduced:  # no option named: the kernel's fast path (KernelSpec.fast)
                    calls.append(("value_and_grad (defaults)", loss.value_and_grad, {}))
                for call, function, opts in calls:
                    start = time.perf_counter()
                    function(*arrays, **opts)
                    item = Warmed(name, dtype, variant, call, time.perf_counter() - start)
                    done.append(item)
                    if progress is not None:
                        progress(str(item))
    return done
