"""``python -m lossforge bench``: lossforge beside its peers, and beside the memory floor.

For every registered loss (or ``--loss NAME``, repeatable), at each size (``--sizes``,
default 10^6 and 10^7 elements; ``cross_entropy`` also at the ``(rows, classes)`` shapes of
``--shapes``, default (10^6, 10), (10^4, 1000), (313, 32000), (64, 10)) and each thread count
(``--threads``, default: all of Numba's threads), it times one value-and-gradient step:

- **lossforge**: ``loss.value_and_grad(*arrays, out=grad)``, a preallocated gradient;
- **numpy**: a plain NumPy implementation of the value and its gradient (one thread);
- **torch**: PyTorch forward + ``torch.autograd.grad``, ``torch.set_num_threads`` = the row's
  thread count (when PyTorch is installed);
- **jax**: ``jax.jit(jax.value_and_grad(f))`` on device-resident arrays (when JAX is
  installed; it runs on XLA's own thread pool, which cannot be resized in a process).

Each figure is the median over repeats of one call (calls shorter than a millisecond are
timed in batches). ``GB/s`` is what the fused pass must move, each input read once and the
gradient written once, divided by lossforge's median; ``floor`` is that bandwidth as a share of
the machine's streaming bandwidth, measured in the same run by a parallel Numba triad
``a = b + s * c`` (3 x 80 MB, float64) at the same thread count. Shares above 100% mean the
arrays (partly) fit in the caches. ``Nx`` after a peer's time is the peer's time over
lossforge's: how many times faster lossforge is.

Before timing, every implementation's value and gradient is compared with lossforge's; a
disagreement is reported (``!`` in the table, and on stderr). Progress goes to stderr, the
table to stdout, raw figures to ``--json PATH``. ``--quick`` runs one small size with few
repeats. ``--backend cuda`` hands the arguments (without ``--backend``) to
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
DEFAULT_SHAPES = ((10**6, 10), (10**4, 1000), (313, 32000), (64, 10))
QUICK_SIZES = (10**5,)
QUICK_SHAPES = ((64, 10),)
#: Losses that get the extra ``--shapes`` (rows, classes).
SHAPED_LOSSES = ("cross_entropy",)
PEERS = ("numpy", "torch", "jax")

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


def _shape(text: str) -> tuple[int, int]:
    """``ROWSxCLASSES``, e.g. ``1e6x10`` or ``313x32000``."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"not a ROWSxCLASSES shape: {text!r}")
    return (_count(parts[0]), _count(parts[1]))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lossforge bench",
        description="lossforge value_and_grad beside NumPy, PyTorch and JAX, and beside the "
        "machine's memory bandwidth.",
        epilog="Columns: time = median of one call; GB/s = bytes a fused pass moves (inputs "
        "read once, gradient written once) / lossforge's time; floor = that bandwidth / the "
        "triad's; 'Nx' = the peer's time / lossforge's.",
    )
    p.add_argument("--loss", action="append", metavar="NAME", help="a loss (repeatable)")
    p.add_argument(
        "--sizes", nargs="+", type=_count, metavar="N", help="element counts (default 1e6 1e7)"
    )
    p.add_argument(
        "--shapes",
        nargs="*",
        type=_shape,
        metavar="RxC",
        help="extra (rows, classes) shapes for cross_entropy (default 1e6x10 1e4x1000 "
        "313x32000 64x10; give none to skip)",
    )
    p.add_argument("--threads", nargs="+", type=int, metavar="T", help="thread counts")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--min-time", type=float, help="seconds of calls per figure (default 0.5)")
    p.add_argument("--repeat", type=int, help="at least this many timed repeats (default 5)")
    p.add_argument("--skip", action="append", choices=PEERS, default=[], help="leave out a peer")
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
    skipped = [n for n in names if n not in inputs.KNOWN]
    if skipped:
        _stderr(f"(no input factory for {', '.join(skipped)}: left out)")
    names = [n for n in names if n in inputs.KNOWN]
    most = numba.config.NUMBA_NUM_THREADS
    threads = args.threads or [most]
    for t in threads:
        if not 1 <= t <= most:
            raise ValueError(f"--threads must be in [1, {most}] (NUMBA_NUM_THREADS), got {t}")
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    shapes = args.shapes
    if shapes is None:
        shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    cases = []
    for name in names:
        for size in sizes:
            cases.append((name, int(size)))
        if name in SHAPED_LOSSES:
            cases.extend((name, tuple(s)) for s in shapes)
    return {
        "cases": cases,
        "threads": list(threads),
        "dtype": args.dtype,
        "min_time": args.min_time if args.min_time is not None else (0.05 if args.quick else 0.5),
        "repeat": args.repeat if args.repeat is not None else (3 if args.quick else 5),
        "max_repeat": 20 if args.quick else 200,
        "peers": [p for p in PEERS if p not in args.skip],
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
    jax = _optional("jax") if "jax" in plan["peers"] else None
    if jax is not None and plan["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    report: dict[str, Any] = {
        "machine": _machine(numba, torch, jax),
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
        for i, (name, size) in enumerate(plan["cases"], 1):
            loss = lf.get(name)
            rng = np.random.default_rng(plan["seed"])
            arrays, options = inputs.make_inputs(name, size, plan["dtype"], rng)
            ndiff = len(loss.differentiable)
            label = _shape_label(name, arrays[0].shape)
            out = tuple(np.empty_like(arrays[k]) for k in range(ndiff))
            out_arg = out[0] if ndiff == 1 else out
            progress(f"[{i}/{total}] {name} {label}: compiling / checking ...")
            value, grad = loss.value_and_grad(*arrays, out=out_arg, **options)
            grads = (grad,) if ndiff == 1 else tuple(grad)
            impls = _peers(plan["peers"], name, arrays, options, ndiff, torch, jax)
            checks = {p: _compare(value, grads, impl(), plan["dtype"]) for p, impl in impls.items()}
            for peer, check in checks.items():
                if not check["ok"]:
                    progress(
                        f"  ! {peer} disagrees with lossforge: value rel {check['value_rel']:.2g}"
                        f", gradient rel {check['grad_rel']:.2g}"
                    )
            once = {}  # peers that do not depend on the thread count: timed once
            for peer in ("numpy", "jax"):
                if peer in impls:
                    progress(f"  {peer} ...")
                    once[peer] = measure(impls[peer], **timing)
            nbytes = inputs.nbytes_fused(arrays, ndiff)
            for t in plan["threads"]:
                progress(f"  {t} thread(s): lossforge ...")
                with numba_threads(t):
                    call = functools.partial(loss.value_and_grad, *arrays, out=out_arg, **options)
                    call()
                    ours = measure(call, **timing)
                row: dict[str, Any] = {
                    "loss": name,
                    "shape": list(arrays[0].shape),
                    "label": label,
                    "elements": int(arrays[0].size),
                    "dtype": plan["dtype"],
                    "threads": t,
                    "bytes": nbytes,
                    "lossforge": ours,
                    "gbps": nbytes / ours["median_s"] / 1e9,
                }
                row["floor_fraction"] = row["gbps"] / report["floor"][str(t)]["gbps"]
                for peer in PEERS:
                    if peer in once:
                        row[peer] = {**once[peer], **checks[peer]}
                    elif peer == "torch" and "torch" in impls:
                        progress(f"  {t} thread(s): torch ...")
                        torch.set_num_threads(t)
                        row[peer] = {**measure(impls["torch"], **timing), **checks["torch"]}
                    else:
                        row[peer] = None
                    if row[peer] is not None:
                        row[peer]["ratio"] = row[peer]["median_s"] / ours["median_s"]
                report["results"].append(row)
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)
    return report


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _machine(numba: Any, torch: Any, jax: Any) -> dict[str, Any]:
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
        "jax": None if jax is None else jax.__version__,
    }


def _shape_label(name: str, shape: tuple[int, ...]) -> str:
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
        scale = max(float(np.max(np.abs(a), initial=0.0)), 1e-30)
        return float(np.max(np.abs(a - b), initial=0.0)) / scale

    value_rel = rel(value, their_value)
    grad_rel = max(rel(g, h) for g, h in zip(grads, their_grads, strict=True))
    return {
        "value_rel": value_rel,
        "grad_rel": grad_rel,
        "ok": bool(value_rel <= tol and grad_rel <= tol),
    }


# -- the peers ---------------------------------------------------------------------------------
def _peers(
    peers: Sequence[str],
    name: str,
    arrays: tuple[np.ndarray, ...],
    options: dict[str, Any],
    ndiff: int,
    torch: Any,
    jax: Any,
) -> dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]]:
    """Callables returning ``(value, gradients)`` as NumPy-convertible objects."""
    impls = {}
    if "numpy" in peers:
        f = NUMPY_VALUE_AND_GRAD[name]
        impls["numpy"] = lambda: f(*arrays, **options)
    if torch is not None:
        impls["torch"] = _torch_impl(torch, name, arrays, options, ndiff)
    if jax is not None:
        impls["jax"] = _jax_impl(jax, name, arrays, options, ndiff)
    return impls


def _torch_impl(torch: Any, name: str, arrays: Any, options: dict, ndiff: int) -> Callable:
    import torch.nn.functional as F

    fn = getattr(F, name)
    tensors = [torch.from_numpy(a) for a in arrays]
    leaves = [tensors[k].detach().requires_grad_(True) for k in range(ndiff)]
    args = [*leaves, *tensors[ndiff:]]
    ones = None
    if name == "cosine_similarity":  # not reduced: the gradient of the rows' sum
        ones = torch.ones(arrays[0].shape[0], dtype=tensors[0].dtype)

    def step() -> tuple[Any, tuple[Any, ...]]:
        value = fn(*args, **options)
        grads = torch.autograd.grad(value, leaves, grad_outputs=ones)
        return value.detach(), grads

    return step


def _jax_impl(jax: Any, name: str, arrays: Any, options: dict, ndiff: int) -> Callable:
    import jax.numpy as jnp

    value = VALUES[name]
    # A non-reduced value (cosine_similarity) is differentiated through its sum: the same
    # vector-Jacobian product as a grad_output of ones.
    reduced = name != "cosine_similarity"

    def scalar(*a: Any) -> Any:
        v = value(jnp, *a, **options)
        return v if reduced else jnp.sum(v)

    if reduced:
        f = jax.jit(jax.value_and_grad(scalar, argnums=tuple(range(ndiff))))
    else:
        g = jax.grad(scalar, argnums=tuple(range(ndiff)))
        f = jax.jit(lambda *a: (value(jnp, *a, **options), g(*a)))
    device = [jax.device_put(a) for a in arrays]

    def step() -> tuple[Any, tuple[Any, ...]]:
        return jax.block_until_ready(f(*device))

    return step


# Loss values written once for NumPy and jax.numpy (``xp``), reduction "mean" (a similarity
# for cosine_similarity); the options are the defaults unless given.
def _v_mse(xp, x, y):
    d = x - y
    return xp.mean(d * d)


def _v_l1(xp, x, y):
    return xp.mean(xp.abs(x - y))


def _v_smooth_l1(xp, x, y, beta=1.0):
    d = x - y
    a = xp.abs(d)
    return xp.mean(xp.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta))


def _v_huber(xp, x, y, delta=1.0):
    d = x - y
    a = xp.abs(d)
    return xp.mean(xp.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta)))


def _v_bce(xp, x, y):
    lx = xp.maximum(xp.log(x), -100.0)
    l1x = xp.maximum(xp.log(1 - x), -100.0)
    return -xp.mean(y * lx + (1 - y) * l1x)


def _v_bce_logits(xp, x, y):
    return xp.mean(xp.logaddexp(0.0, x) - y * x)


def _v_multilabel(xp, x, y):
    return xp.mean(xp.mean(xp.logaddexp(0.0, x) - y * x, axis=-1))


def _lse(xp, z):
    m = xp.max(z, axis=1, keepdims=True)
    return m[:, 0] + xp.log(xp.sum(xp.exp(z - m), axis=1))


def _picked(xp, z, t):
    return xp.take_along_axis(z, t[:, None], axis=1)[:, 0]


def _v_cross_entropy(xp, z, t):
    return xp.mean(_lse(xp, z) - _picked(xp, z, t))


def _v_nll(xp, x, t):
    return -xp.mean(_picked(xp, x, t))


def _v_cosine_similarity(xp, a, b, dim=1, eps=1e-8):
    n1 = xp.maximum(xp.sqrt(xp.sum(a * a, axis=1)), eps)
    n2 = xp.maximum(xp.sqrt(xp.sum(b * b, axis=1)), eps)
    return xp.sum(a * b, axis=1) / (n1 * n2)


def _v_cosine_embedding(xp, a, b, t, margin=0.0):
    cos = xp.sum(a * b, axis=-1) / xp.sqrt(
        (xp.sum(a * a, axis=-1) + 1e-12) * (xp.sum(b * b, axis=-1) + 1e-12)
    )
    return xp.mean(xp.where(t == 1, 1 - cos, xp.where(t == -1, xp.maximum(cos - margin, 0), 0)))


VALUES: dict[str, Callable[..., Any]] = {
    "mse_loss": _v_mse,
    "l1_loss": _v_l1,
    "smooth_l1_loss": _v_smooth_l1,
    "huber_loss": _v_huber,
    "binary_cross_entropy": _v_bce,
    "binary_cross_entropy_with_logits": _v_bce_logits,
    "multilabel_soft_margin_loss": _v_multilabel,
    "cross_entropy": _v_cross_entropy,
    "nll_loss": _v_nll,
    "cosine_similarity": _v_cosine_similarity,
    "cosine_embedding_loss": _v_cosine_embedding,
}


# Plain NumPy value and gradient, as a NumPy user would write them (reduction "mean").
def _np_mse(x, y):
    d = x - y
    return np.mean(d * d), ((2.0 / d.size) * d,)


def _np_l1(x, y):
    d = x - y
    return np.mean(np.abs(d)), (np.sign(d) / d.size,)


def _np_smooth_l1(x, y, beta=1.0):
    d = x - y
    a = np.abs(d)
    inside = a < beta
    value = np.mean(np.where(inside, 0.5 * d * d / beta, a - 0.5 * beta))
    return value, (np.where(inside, d / beta, np.sign(d)) / d.size,)


def _np_huber(x, y, delta=1.0):
    d = x - y
    a = np.abs(d)
    inside = a < delta
    value = np.mean(np.where(inside, 0.5 * d * d, delta * (a - 0.5 * delta)))
    return value, (np.where(inside, d, delta * np.sign(d)) / d.size,)


def _np_bce(x, y):
    with np.errstate(divide="ignore"):
        value = _v_bce(np, x, y)
    g = (x - y) / np.maximum(x * (1 - x), 1e-12) / x.size
    return value, (g,)


def _sigmoid(x):
    return 0.5 * (np.tanh(0.5 * x) + 1)


def _np_bce_logits(x, y):
    return _v_bce_logits(np, x, y), ((_sigmoid(x) - y) / x.size,)


def _np_multilabel(x, y):
    return _v_multilabel(np, x, y), ((_sigmoid(x) - y) / x.size,)


def _np_cross_entropy(z, t):
    m = np.max(z, axis=1, keepdims=True)
    e = np.exp(z - m)
    s = np.sum(e, axis=1, keepdims=True)
    rows = np.arange(z.shape[0])
    value = np.mean(m[:, 0] + np.log(s[:, 0]) - z[rows, t])
    g = e / s
    g[rows, t] -= 1
    g /= z.shape[0]
    return value, (g,)


def _np_nll(x, t):
    rows = np.arange(x.shape[0])
    g = np.zeros_like(x)
    g[rows, t] = -1.0 / x.shape[0]
    return -np.mean(x[rows, t]), (g,)


def _np_cosine_similarity(a, b, dim=1, eps=1e-8):
    n1 = np.maximum(np.sqrt(np.sum(a * a, axis=1)), eps)[:, None]
    n2 = np.maximum(np.sqrt(np.sum(b * b, axis=1)), eps)[:, None]
    cos = np.sum(a * b, axis=1)[:, None] / (n1 * n2)
    # d cos / d a = b / (n1 n2) - cos a / n1^2 where the norm is above eps (else b / (eps n2)).
    g1 = b / (n1 * n2) - np.where(n1 > eps, cos * a / (n1 * n1), 0)
    g2 = a / (n1 * n2) - np.where(n2 > eps, cos * b / (n2 * n2), 0)
    return cos[:, 0], (g1, g2)


def _np_cosine_embedding(a, b, t, margin=0.0):
    s1 = np.sum(a * a, axis=1) + 1e-12
    s2 = np.sum(b * b, axis=1) + 1e-12
    root = np.sqrt(s1 * s2)
    cos = np.sum(a * b, axis=1) / root
    value = np.mean(np.where(t == 1, 1 - cos, np.where(t == -1, np.maximum(cos - margin, 0), 0)))
    dcos = np.where(t == 1, -1.0, np.where((t == -1) & (cos > margin), 1.0, 0.0)) / a.shape[0]
    dcos, cos, root = dcos[:, None], cos[:, None], root[:, None]
    g1 = dcos * (b / root - cos * a / s1[:, None])
    g2 = dcos * (a / root - cos * b / s2[:, None])
    return value, (g1.astype(a.dtype), g2.astype(b.dtype))


NUMPY_VALUE_AND_GRAD: dict[str, Callable[..., Any]] = {
    "mse_loss": _np_mse,
    "l1_loss": _np_l1,
    "smooth_l1_loss": _np_smooth_l1,
    "huber_loss": _np_huber,
    "binary_cross_entropy": _np_bce,
    "binary_cross_entropy_with_logits": _np_bce_logits,
    "multilabel_soft_margin_loss": _np_multilabel,
    "cross_entropy": _np_cross_entropy,
    "nll_loss": _np_nll,
    "cosine_similarity": _np_cosine_similarity,
    "cosine_embedding_loss": _np_cosine_embedding,
}


# -- the table -----------------------------------------------------------------------------
def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_table(report: dict[str, Any]) -> str:
    """The side-by-side table of a report made by :func:`run`."""
    m = report["machine"]
    lines = [
        f"lossforge {m['lossforge']} value_and_grad (out=), {report['dtype']}, reduction "
        f"'mean'; numba {m['numba']}, numpy {m['numpy']}, torch {m['torch'] or '-'}, "
        f"jax {m['jax'] or '-'}; {m['cpu_count']} CPUs",
        "bandwidth floor (Numba triad a = b + s*c, 3 x 80 MB): "
        + ", ".join(
            f"{t} thread{'s' if int(t) > 1 else ''} {f['gbps']:.1f} GB/s"
            for t, f in report["floor"].items()
        ),
        "",
    ]
    header = ["loss", "shape", "thr", "lossforge", "GB/s", "floor", "numpy", "torch", "jax"]
    rows = [header]
    for r in report["results"]:
        cells = [
            r["loss"],
            r["label"],
            str(r["threads"]),
            _time(r["lossforge"]["median_s"]),
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
    right = {2, 3, 4, 5, 6, 7, 8}
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    lines += [
        "",
        "time: median of one call. GB/s: bytes a fused pass moves (inputs read once, gradient "
        "written once) / lossforge's time;",
        "floor: that as a share of the triad's bandwidth at the same thread count (> 100%: "
        "the arrays fit in cache). Nx: the peer's time / lossforge's",
        "(> 1: lossforge is faster). numpy runs on one thread; torch at the row's thread "
        "count; jax on XLA's own pool. '!': the peer's result",
        "disagrees with lossforge's (see stderr).",
    ]
    return "\n".join(lines)
