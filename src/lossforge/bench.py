"""``python -m lossforge bench``: lossforge beside PyTorch, and beside the memory floor.

For every registered loss that declares a ``LossSpec.example`` (or ``--loss NAME``,
repeatable), for each of its ``LossSpec.example_variants`` (e.g. rows of 10, 100, 1000 and
32000 classes; none declared: the plain ``example(rng, size, dtype)``), at each size
(``--sizes``, default 10^6 and 10^7 elements) and each thread count (``--threads``, default:
all of Numba's threads), it times one value-and-gradient step on the example's arrays with
every option at its default (``lossforge.inputs.draw``):

- **lossforge**: ``loss.value_and_grad(*arrays, out=grad)``, a preallocated gradient;
- **torch**: ``torch.nn.functional.<name>`` on the same arrays (as tensors; integer arrays,
  class indices, as int64), forward + ``torch.autograd.grad`` w.r.t. the loss's
  ``differentiable`` arguments (with a ``grad_outputs`` of ones for an unreduced value),
  ``torch.set_num_threads`` = the row's thread count; when PyTorch is installed and has a
  function of that name.

There is no NumPy or JAX column any more: both needed a copy of every loss's math in this
module, which the core must not hold (a third-party loss would have had none). The float64
``LossSpec.reference`` is not timed in their place: it computes the value alone, in float64,
so its time beside a fused float32 value-and-gradient would compare different work; it is
the conformance kit's yardstick for correctness, not a peer.

``--adapter torch`` / ``--adapter jax`` (repeatable) adds a second table: each case's
forward + backward through the framework adapter (``lossforge.torch``: ``apply`` then
``torch.autograd.grad``; ``lossforge.jax``: ``jax.jit(jax.value_and_grad(...))``) beside the
bare ``value_and_grad`` *without* ``out=`` (an autograd step gets a new gradient each time,
so that is what the bridge is measured against: ``bridge`` is its overhead) and the
framework's own loss (``torch.nn.functional.<name>``; for JAX, ``_JAX_OWN``: cross entropy
with ``jax.nn.log_softmax``, the one loss it has here). JAX's own runs on XLA's thread pool,
whatever the row's thread count. ``python -m lossforge bench --loss cross_entropy --adapter
torch --adapter jax`` gives the cross-entropy rows at the bench shapes.

``--example KEY=VALUE`` (repeatable) replaces the declared variants with one keyword set for
every selected loss, e.g. ``--loss cross_entropy --sizes 640 --example classes=10`` for
(64, 10) logits; a loss whose ``example`` does not take it is left out with a message.

Each figure is the median over repeats of one call (calls shorter than a millisecond are
timed in batches). ``GB/s`` is what the fused pass must move, each input read once and each
gradient written once, divided by lossforge's median; ``floor`` is that bandwidth as a share
of the machine's streaming bandwidth, measured in the same run by a parallel Numba triad
``a = b + s * c`` (3 x 80 MB, float64) at the same thread count. Shares above 100% mean the
arrays (partly) fit in the caches. ``Nx`` after the peer's time is the peer's time over
lossforge's: how many times faster lossforge is.

Before timing, PyTorch's value and gradients are compared with lossforge's; a disagreement
is reported (``!`` in the table, and on stderr). Progress goes to stderr, the table to
stdout, raw figures to ``--json PATH``. ``--quick`` runs one small size with few repeats.
``--backend cuda`` hands the arguments (without ``--backend``) to
``lossforge.bench_cuda.main``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import lossforge as lf
from lossforge import inputs

DEFAULT_SIZES = (10**6, 10**7)
QUICK_SIZES = (10**5,)
PEERS = ("torch",)
ADAPTERS = ("torch", "jax")

TRIAD_N = 10**7  # float64 elements per triad array: 80 MB, far beyond any cache


# -- the command line ---------------------------------------------------------------------
def _count(text: str) -> int:
    """An element count: ``1000000``, ``1_000_000``, ``1e6`` or ``10**6``."""
    t = text.strip().replace("_", "")
    try:
        if "**" in t:
            base, exp = t.split("**")
            value = int(base) ** int(exp)
        elif "^" in t:
            base, exp = t.split("^")
            value = int(base) ** int(exp)
        else:
            f = float(t)
            if f != int(f):
                raise ValueError
            value = int(f)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an element count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return value


def _keyword(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for ``example``: the value an int, else a float, else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"not a KEY=VALUE keyword: {text!r}")
    for kind in (int, float):
        try:
            return key.strip(), kind(value)
        except ValueError:
            pass
    return key.strip(), value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lossforge bench",
        description="lossforge value_and_grad beside PyTorch, and beside the machine's memory "
        "bandwidth, on inputs from each loss's LossSpec.example.",
        epilog="Columns: time = median of one call; GB/s = bytes a fused pass moves (inputs "
        "read once, gradient written once) / lossforge's time; floor = that bandwidth / the "
        "triad's; 'Nx' = the peer's time / lossforge's.",
    )
    p.add_argument("--loss", action="append", metavar="NAME", help="a loss (repeatable)")
    p.add_argument(
        "--sizes", nargs="+", type=_count, metavar="N", help="element counts (default 1e6 1e7)"
    )
    p.add_argument(
        "--example",
        action="append",
        type=_keyword,
        metavar="KEY=VALUE",
        help="a keyword for each loss's example, instead of its declared variants (repeatable)",
    )
    p.add_argument("--threads", nargs="+", type=int, metavar="T", help="thread counts")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--min-time", type=float, help="seconds of calls per figure (default 0.5)")
    p.add_argument("--repeat", type=int, help="at least this many timed repeats (default 5)")
    p.add_argument("--skip", action="append", choices=PEERS, default=[], help="leave out a peer")
    p.add_argument(
        "--adapter",
        action="append",
        choices=ADAPTERS,
        default=[],
        help="also time lossforge.torch / lossforge.jax forward + backward (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help="one small size, few repeats")
    p.add_argument("--json", metavar="PATH", help="write the raw figures here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit code (0, or 2 for a usage error or no CUDA bench)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", default="cpu")
    known, rest = pre.parse_known_args(argv)
    if known.backend == "cuda":
        return _cuda(rest)
    args = _parser().parse_args(argv)
    try:
        plan = _plan(args)
    except ValueError as exc:
        print(f"lossforge bench: error: {exc}", file=sys.stderr)
        return 2
    report = run(plan, progress=_stderr)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        _stderr(f"raw figures written to {args.json}")
    return 0


def _cuda(argv: list[str]) -> int:
    try:
        module = importlib.import_module("lossforge.bench_cuda")
    except ModuleNotFoundError as exc:
        if exc.name not in ("lossforge.bench_cuda", "lossforge"):
            raise
        print(
            "lossforge bench: error: --backend cuda needs lossforge.bench_cuda, which this "
            "installation does not have",
            file=sys.stderr,
        )
        return 2
    return int(module.main(argv) or 0)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- what to run ----------------------------------------------------------------------------
def _plan(args: argparse.Namespace) -> dict[str, Any]:
    import numba

    registered = lf.list_losses()
    names = args.loss or registered
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise ValueError(f"unknown loss {unknown[0]!r}; registered: {', '.join(registered)}")
    skipped = [n for n in names if not inputs.variants(lf.get(n))]
    if skipped:
        _stderr(f"(no LossSpec.example for {', '.join(skipped)}: left out)")
    most = numba.config.NUMBA_NUM_THREADS
    threads = args.threads or [most]
    for t in threads:
        if not 1 <= t <= most:
            raise ValueError(f"--threads must be in [1, {most}] (NUMBA_NUM_THREADS), got {t}")
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    cases: list[Any] = []
    for name in names:
        declared = inputs.variants(lf.get(name))
        if not declared:
            continue
        for variant in [dict(args.example)] if args.example else declared:
            cases.extend((name, variant, int(size)) for size in sizes)
    return {
        "cases": cases,
        "threads": list(threads),
        "dtype": args.dtype,
        "min_time": args.min_time if args.min_time is not None else (0.05 if args.quick else 0.5),
        "repeat": args.repeat if args.repeat is not None else (3 if args.quick else 5),
        "max_repeat": 20 if args.quick else 200,
        "peers": [p for p in PEERS if p not in args.skip],
        "adapters": list(dict.fromkeys(args.adapter)),
        "seed": args.seed,
    }


# -- timing ---------------------------------------------------------------------------------
def measure(
    f: Callable[[], Any], min_time: float = 0.5, repeat: int = 5, max_repeat: int = 200
) -> dict[str, Any]:
    """Median seconds per call of ``f`` (already warm): at least ``repeat`` timed repeats and
    ``min_time`` seconds in all, at most ``max_repeat`` repeats; calls under a millisecond
    are timed in batches of about a millisecond."""
    t = time.perf_counter()
    f()
    once = time.perf_counter() - t
    inner = 1 if once >= 1e-3 else min(1000, max(1, int(1e-3 / max(once, 1e-7))))
    times: list[float] = []
    spent = 0.0
    while len(times) < repeat or (spent < min_time and len(times) < max_repeat):
        t = time.perf_counter()
        for _ in range(inner):
            f()
        elapsed = time.perf_counter() - t
        spent += elapsed
        times.append(elapsed / inner)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": len(times),
        "inner": inner,
    }


def _triad_kernel() -> Any:
    import numba

    @numba.njit(parallel=True, cache=True, error_model="numpy")
    def triad(a, b, c, s):  # pragma: no cover - compiled
        for i in numba.prange(a.size):
            a[i] = b[i] + s * c[i]

    return triad


_TRIAD: Any = None


def bandwidth_floor(threads: int, min_time: float = 0.3, repeat: int = 10) -> dict[str, Any]:
    """Streaming bandwidth (bytes read + written per second) of a parallel Numba triad on
    three float64 arrays of ``TRIAD_N`` elements, at ``threads`` Numba threads."""
    global _TRIAD
    from lossforge.runtime.cpu import threads as numba_threads

    if _TRIAD is None:
        _TRIAD = _triad_kernel()
    a = np.zeros(TRIAD_N)
    b = np.ones(TRIAD_N)
    c = np.full(TRIAD_N, 2.0)
    with numba_threads(threads):
        _TRIAD(a, b, c, 0.5)
        m = measure(lambda: _TRIAD(a, b, c, 0.5), min_time, repeat)
    moved = a.nbytes + b.nbytes + c.nbytes
    return {"threads": threads, "bytes": moved, **m, "gbps": moved / m["median_s"] / 1e9}


# -- the run ----------------------------------------------------------------------------------
def run(plan: dict[str, Any], progress: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Run a plan made by the command line: every case at every thread count. Returns the
    raw figures (what ``--json`` writes)."""
    import numba

    from lossforge.runtime.cpu import threads as numba_threads

    torch = _optional("torch") if "torch" in plan["peers"] else None
    report: dict[str, Any] = {
        "machine": _machine(numba, torch),
        "dtype": plan["dtype"],
        "threads": plan["threads"],
        "floor": {},
        "results": [],
    }
    for t in plan["threads"]:
        progress(f"bandwidth floor, {t} thread(s): Numba triad ...")
        floor = bandwidth_floor(t)
        report["floor"][str(t)] = floor
        progress(f"  {floor['gbps']:.1f} GB/s")
    timing = {k: plan[k] for k in ("min_time", "repeat", "max_repeat")}
    torch_threads = torch.get_num_threads() if torch is not None else None
    total = len(plan["cases"])
    try:
        for i, (name, variant, size) in enumerate(plan["cases"], 1):
            loss = lf.get(name)
            rng = np.random.default_rng(plan["seed"])
            try:
                arrays = inputs.draw(loss, size, plan["dtype"], rng, variant)
            except Exception as exc:  # a third party's example, or a keyword it does not take
                why = f"example({inputs.label(variant)}): {exc!r}"
                progress(f"[{i}/{total}] ! {name} {why}; left out")
                continue
            label = _shape_label(arrays[0].shape)
            out = tuple(np.empty_like(arrays[k]) for k in inputs.positions(loss))
            out_arg = out[0] if len(out) == 1 else out
            progress(f"[{i}/{total}] {name} {label}: compiling / checking ...")
            value, grad = loss.value_and_grad(*arrays, out=out_arg)
            grads = (grad,) if len(out) == 1 else tuple(grad)
            peer = _torch_impl(torch, loss, arrays, progress) if torch is not None else None
            check = _compare(value, grads, peer(), plan["dtype"]) if peer else None
            if check is not None and not check["ok"]:
                progress(
                    f"  ! torch disagrees with lossforge: value rel {check['value_rel']:.2g}"
                    f", gradient rel {check['grad_rel']:.2g}"
                )
            nbytes = inputs.nbytes_fused(loss, arrays)
            for t in plan["threads"]:
                progress(f"  {t} thread(s): lossforge ...")
                with numba_threads(t):
                    call = functools.partial(loss.value_and_grad, *arrays, out=out_arg)
                    call()
                    ours = measure(call, **timing)
                row: dict[str, Any] = {
                    "loss": name,
                    "variant": variant,
                    "shape": list(arrays[0].shape),
                    "label": label,
                    "elements": int(arrays[0].size),
                    "dtype": plan["dtype"],
                    "threads": t,
                    "bytes": nbytes,
                    "lossforge": ours,
                    "gbps": nbytes / ours["median_s"] / 1e9,
                    "torch": None,
                }
                row["floor_fraction"] = row["gbps"] / report["floor"][str(t)]["gbps"]
                if peer is not None and torch is not None and check is not None:
                    progress(f"  {t} thread(s): torch ...")
                    torch.set_num_threads(t)
                    theirs = measure(peer, **timing)
                    ratio = theirs["median_s"] / ours["median_s"]
                    row["torch"] = {**theirs, **check, "ratio": ratio}
                report["results"].append(row)
            for adapter in plan.get("adapters", ()):
                report.setdefault("adapters", []).extend(
                    _adapter_rows(adapter, loss, arrays, label, plan, timing, progress)
                )
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)
    return report


# -- the adapters ---------------------------------------------------------------------------
def _adapter_rows(
    adapter: str,
    loss: Any,
    arrays: tuple[np.ndarray, ...],
    label: str,
    plan: dict[str, Any],
    timing: dict[str, Any],
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Rows of the adapters' table for one case: the bare ``value_and_grad`` (a new gradient
    each call), the step through ``lossforge.<adapter>``, and the framework's own step."""
    from lossforge.runtime.cpu import threads as numba_threads

    try:
        ours, own = _ADAPTER_STEPS[adapter](loss, arrays, progress)
    except ImportError as exc:
        progress(f"  (lossforge.{adapter} cannot run: {exc}; its rows are left out)")
        return []
    torch = _optional("torch")
    rows = []
    for t in plan["threads"]:
        progress(f"  {t} thread(s): lossforge.{adapter} ...")
        with numba_threads(t):
            bare = functools.partial(loss.value_and_grad, *arrays)
            bare()
            ours()
            row: dict[str, Any] = {
                "loss": loss.name,
                "adapter": adapter,
                "label": label,
                "shape": list(arrays[0].shape),
                "threads": t,
                "bare": measure(bare, **timing),
                "adapter_step": measure(ours, **timing),
                "own": None,
            }
            if own is not None:
                if adapter == "torch" and torch is not None:
                    before = torch.get_num_threads()
                    torch.set_num_threads(t)
                try:
                    row["own"] = measure(own, **timing)
                finally:
                    if adapter == "torch" and torch is not None:
                        torch.set_num_threads(before)
        row["bridge"] = row["adapter_step"]["median_s"] / row["bare"]["median_s"] - 1
        if row["own"] is not None:
            row["own"]["ratio"] = row["own"]["median_s"] / row["adapter_step"]["median_s"]
        rows.append(row)
    return rows


def _torch_steps(loss: Any, arrays: tuple[np.ndarray, ...], progress: Callable[[str], None]):
    import torch

    import lossforge.torch as lft

    ours = _torch_impl(torch, loss, arrays, progress, functools.partial(lft.apply, loss))
    own = _torch_impl(torch, loss, arrays, progress)
    assert ours is not None
    return ours, own


# JAX's own version of a loss, for the adapters' table (JAX itself has no loss functions).
_JAX_OWN: dict[str, Callable[..., Any]] = {}


def _jax_own_cross_entropy(z: Any, y: Any) -> Any:
    import jax
    import jax.numpy as jnp

    kept = y != -100  # ignore_index
    logp = jax.nn.log_softmax(z, axis=1)
    picked = jnp.take_along_axis(logp, jnp.where(kept, y, 0)[:, None], axis=1)[:, 0]
    return -jnp.where(kept, picked, 0.0).sum() / kept.sum()


_JAX_OWN["cross_entropy"] = _jax_own_cross_entropy


def _jax_steps(loss: Any, arrays: tuple[np.ndarray, ...], progress: Callable[[str], None]):
    import jax
    import jax.numpy as jnp

    import lossforge.jax as lfj

    args = [jnp.asarray(a) for a in arrays]
    argnums = tuple(inputs.positions(loss))

    def scalar(f: Callable[..., Any]) -> Callable[..., Any]:
        return f if loss.reduced else (lambda *a: f(*a).sum())

    def step(f: Callable[..., Any]) -> Callable[[], Any]:
        compiled = jax.jit(jax.value_and_grad(scalar(f), argnums=argnums))
        return lambda: jax.block_until_ready(compiled(*args))

    ours = step(functools.partial(lfj.apply, loss))
    own = _JAX_OWN.get(loss.name)
    if own is not None and arrays[0].ndim != 2:
        own = None
    return ours, None if own is None else step(own)


_ADAPTER_STEPS = {"torch": _torch_steps, "jax": _jax_steps}


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _machine(numba: Any, torch: Any) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "lossforge": lf.__version__,
        "torch": None if torch is None else torch.__version__,
    }


def _shape_label(shape: tuple[int, ...]) -> str:
    return "x".join(_compact(s) for s in shape)


def _compact(n: int) -> str:
    if n >= 1000:
        e = round(math.log10(n))
        if 10**e == n:
            return f"1e{e}"
    return str(n)


def _compare(value: Any, grads: tuple[np.ndarray, ...], theirs: Any, dtype: str) -> dict:
    """Relative differences (max abs difference / max abs value) of value and gradients."""
    their_value, their_grads = theirs
    tol = 1e-4 if dtype == "float32" else 1e-9

    def rel(a: Any, b: Any) -> float:
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            return math.inf
        both_nan = np.isnan(a) & np.isnan(b)  # e.g. the "mean" over targets all ignored
        a, b = np.where(both_nan, 0.0, a), np.where(both_nan, 0.0, b)
        scale = max(float(np.max(np.abs(a), initial=0.0)), 1e-30)
        return float(np.max(np.abs(a - b), initial=0.0)) / scale

    value_rel = rel(value, their_value)
    grad_rel = max(rel(g, h) for g, h in zip(grads, their_grads, strict=True))
    return {
        "value_rel": value_rel,
        "grad_rel": grad_rel,
        "ok": bool(value_rel <= tol and grad_rel <= tol),
    }


# -- the peer ---------------------------------------------------------------------------------
def _torch_impl(
    torch: Any,
    loss: Any,
    arrays: tuple[np.ndarray, ...],
    progress: Callable[[str], None],
    fn: Callable[..., Any] | None = None,
    device: str = "cpu",
) -> Callable[[], tuple[Any, tuple[Any, ...]]] | None:
    """``torch.nn.functional.<name>`` (or ``fn``) forward + ``torch.autograd.grad`` on the
    same arrays (default options) as tensors on ``device``, as a callable returning
    ``(value, gradients)``; ``None`` when PyTorch has no such function or cannot run it on
    these arrays (said through ``progress``)."""
    import torch.nn.functional as F

    if fn is None:
        fn = getattr(F, loss.name, None)
    if fn is None:
        return None
    tensors = [
        torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a).to(device)
        for a in arrays
    ]
    leaves = []
    for k in inputs.positions(loss):
        tensors[k] = tensors[k].detach().requires_grad_(True)
        leaves.append(tensors[k])
    try:
        probe = fn(*tensors)
    except Exception as exc:
        progress(f"  (torch.nn.functional.{loss.name} cannot run these inputs: {exc!r})")
        return None
    # An unreduced value is differentiated with ones, as lossforge's default grad_output.
    ones = None if probe.ndim == 0 else torch.ones_like(probe)

    def step() -> tuple[Any, tuple[Any, ...]]:
        value = fn(*tensors)
        grads = torch.autograd.grad(value, leaves, grad_outputs=ones)
        return value.detach(), grads

    return step


# -- the table -----------------------------------------------------------------------------
def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _adapter_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["loss", "shape", "thr", "value_and_grad", "adapter", "bridge", "framework's own"]
    cells = [header]
    for r in rows:
        own = r["own"]
        cells.append(
            [
                r["loss"],
                r["label"],
                str(r["threads"]),
                _time(r["bare"]["median_s"]),
                f"lossforge.{r['adapter']} {_time(r['adapter_step']['median_s'])}",
                f"{r['bridge']:+.0%}",
                "-"
                if own is None
                else f"{r['adapter']} {_time(own['median_s'])} {own['ratio']:.1f}x",
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "adapters: forward + backward through the framework's autograd (a new gradient per "
        "step), beside the bare value_and_grad without out= and the framework's own loss"
    ]
    for row in cells:
        lines.append(
            "  ".join(
                c.rjust(w) if 2 <= i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    lines.append(
        "bridge: the adapter's time / value_and_grad's - 1. Nx: the framework's own time / the "
        "adapter's (> 1: the adapter is faster)."
    )
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The side-by-side table of a report made by :func:`run`."""
    m = report["machine"]
    lines = [
        f"lossforge {m['lossforge']} value_and_grad (out=), {report['dtype']}, default "
        f"options; numba {m['numba']}, numpy {m['numpy']}, torch {m['torch'] or '-'}; "
        f"{m['cpu_count']} CPUs",
        "bandwidth floor (Numba triad a = b + s*c, 3 x 80 MB): "
        + ", ".join(
            f"{t} thread{'s' if int(t) > 1 else ''} {f['gbps']:.1f} GB/s"
            for t, f in report["floor"].items()
        ),
        "",
    ]
    header = ["loss", "shape", "thr", "lossforge", "GB/s", "floor", *PEERS]
    rows = [header]
    for r in report["results"]:
        ours = r["lossforge"]
        cells = [
            r["loss"],
            r["label"],
            str(r["threads"]),
            _time(ours["median_s"]) + (" ~" if _waited(ours) else ""),
            f"{r['gbps']:.1f}",
            f"{r['floor_fraction']:.0%}",
        ]
        for peer in PEERS:
            p = r.get(peer)
            if p is None:
                cells.append("-")
            else:
                flag = "" if p.get("ok", True) else " !"
                cells.append(f"{_time(p['median_s'])} {p['ratio']:.1f}x{flag}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = set(range(2, len(header)))
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    if report.get("adapters"):
        lines += ["", *_adapter_table(report["adapters"])]
    lines += [
        "",
        "time: median of one call. GB/s: bytes a fused pass moves (inputs read once, gradient "
        "written once) / lossforge's time;",
        "floor: that as a share of the triad's bandwidth at the same thread count (> 100%: "
        "the arrays fit in cache). Nx: the peer's time / lossforge's",
        "(> 1: lossforge is faster); torch runs at the row's thread count. '!': the peer's "
        "result disagrees with lossforge's (see stderr).",
        "'~': the median is over twice the fastest repeat: calls waited for a CPU that "
        "another process held (a two-thread region can wait a scheduler slice, ~4-8 ms), so "
        "that figure measures the machine's load, not the kernel.",
    ]
    return "\n".join(lines)


def _waited(timing: dict[str, Any]) -> bool:
    """A median over twice the fastest repeat. On the shared 2-core machines a 10^6-element
    pinball_loss (0.18 ms on two threads in a quiet moment) benched at 7.99 ms, mse_loss and
    huber_loss at 12 ms another time: each call had waited a scheduler slice, and the figure
    read as a slow kernel."""
    return timing["median_s"] > 2 * timing["min_s"]
