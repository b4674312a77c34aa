"""CUDA benchmark: every registered loss with a CUDA kernel, its fused ``value_and_grad`` on
the GPU beside PyTorch's CUDA forward + backward, with the achieved bandwidth beside the
roofline, and each loss's per-call host overhead.

    python -m lossforge.bench_cuda [--sizes 2^20 2^26] [--dtypes float32 float64]
                                   [--loss NAME ...] [--bandwidth 3350]

The cases come from each loss's ``LossSpec.example`` with every option at its default, as
for the CPU bench (``lossforge.inputs``): every declared ``example_variants`` (or one
``--example KEY=VALUE`` set), at each size and dtype. A third-party loss that declares an
example and a CUDA kernel is benched like a built-in one.

- **bandwidth rows**: ``loss.value_and_grad(*device_arrays, out=grads)`` (preallocated
  gradients) and PyTorch's ``torch.nn.functional.<name>`` forward + ``torch.autograd.grad``
  on CUDA tensors of the same arrays, each the median of ``--repeat`` calls timed by CUDA
  events (a reduced lossforge call includes the one synchronization that reads its value
  back). A fused pass must read its inputs once and write its gradients once, so ``MB`` is
  those bytes (``lossforge.inputs.nbytes_fused``, from the arrays), ``GB/s`` is that over
  lossforge's time, ``roofline`` its share of ``--bandwidth``.
- **host-overhead rows**, at ``--overhead-size`` elements (default 2^10; the loss's first
  example variant, each dtype): the median wall time of a call followed by a device
  synchronization, lossforge's and PyTorch's. At that size the kernels take microseconds,
  so this is the fixed cost of a call: dispatch, validation, launches, the read-back.

Before timing, PyTorch's value and gradients are compared with lossforge's ('!' in the table
and a line on stderr when they disagree). Needs a real GPU (not the simulator); PyTorch with
CUDA is optional. Importing this module imports nothing from Numba or PyTorch.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SIZES = (1 << 20, 1 << 26)
DTYPES = ("float32", "float64")
OVERHEAD_SIZE = 1 << 10
BANDWIDTH_COLUMNS = (
    "loss",
    "example",
    "shape",
    "dtype",
    "MB",
    "lossforge ms",
    "GB/s",
    "roofline",
    "torch ms",
    "speed-up",
)
OVERHEAD_COLUMNS = ("loss", "shape", "dtype", "lossforge us", "torch us", "torch/lossforge")


@dataclass
class Case:
    """One row to run: a loss, an ``example`` keyword set, a size, a dtype, and whether it is
    a host-overhead row (wall time per call) or a bandwidth row (CUDA events)."""

    name: str
    size: int
    dtype: str
    variant: dict[str, Any] = field(default_factory=dict)
    overhead: bool = False


def cases(
    names: Iterable[str] | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    dtypes: Sequence[str] = DTYPES,
    overhead_size: int = OVERHEAD_SIZE,
    example: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Case]:
    """The rows for ``names`` (default: every registered loss with a CUDA kernel and an
    ``example``): each example variant (or ``example`` alone) at each size and dtype, then a
    host-overhead row per dtype at ``overhead_size`` (none when it is 0). ``ValueError`` for
    an unknown name; a named loss without a CUDA kernel or an example is left out (said
    through ``progress``)."""
    import lossforge as lf
    from lossforge import inputs

    registered = lf.list_losses()
    names = None if names is None else list(names)
    unknown = [n for n in names or () if n not in registered]
    if unknown:
        raise ValueError(f"unknown loss {unknown[0]!r}; registered: {', '.join(registered)}")
    out = []
    for name in names or registered:
        loss = lf.get(name)
        declared = inputs.variants(loss)
        if "cuda" not in loss.backends or not declared:
            if names and progress is not None:
                progress(f"({name} has no CUDA kernel or no LossSpec.example: left out)")
            continue
        variants = [dict(example)] if example else declared
        for dtype in dtypes:
            out += [Case(name, s, dtype, v) for v in variants for s in sizes]
            if overhead_size:
                out.append(Case(name, overhead_size, dtype, variants[0], overhead=True))
    return out


class _WallEvent:
    """A stand-in for a CUDA event timed by the host clock: for the simulator, whose events
    report -1, and for PyTorch on the CPU (how the tests run the PyTorch column)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, stop: _WallEvent) -> float:
        return (stop.t - self.t) * 1e3


def _median_ms(call: Callable[[], Any], event: Callable[[], Any], repeat: int) -> float:
    """Median time of ``call()`` in ms between two events (the caller made the warm-up call:
    compilation, the first allocations)."""
    times = []
    for _ in range(repeat):
        start, stop = event(), event()
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _host(a: Any) -> Any:
    """A device array, CUDA tensor or host value as NumPy, for the comparison."""
    import numpy as np

    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def run(
    selected: Sequence[Case],
    repeat: int = 20,
    min_time: float = 0.2,
    torch: Any = None,
    torch_device: str = "cuda",
    seed: int = 0,
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Run the cases on Numba's current device (or the simulator); ``torch`` (the module, or
    ``None`` for no PyTorch column) runs on ``torch_device``. Returns one dict a row."""
    import numpy as np

    import lossforge as lf
    from lossforge import inputs

    rows = []
    for i, case in enumerate(selected, 1):
        loss = lf.get(case.name)
        try:
            arrays = inputs.draw(
                loss, case.size, case.dtype, np.random.default_rng(seed), case.variant
            )
        except Exception as exc:  # a third party's example, or a keyword it does not take
            progress(f"[{i}/{len(selected)}] ! {case.name} example: {exc!r}; left out")
            continue
        progress(f"[{i}/{len(selected)}] {case.name} {arrays[0].shape} {case.dtype}")
        rows.append(_row(case, loss, arrays, repeat, min_time, torch, torch_device, progress))
        if torch is not None and torch_device.startswith("cuda"):
            torch.cuda.empty_cache()  # the device memory back for the next case's arrays
    return rows


def _row(
    case: Case,
    loss: Any,
    arrays: tuple[Any, ...],
    repeat: int,
    min_time: float,
    torch: Any,
    torch_device: str,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    import numba
    from numba import cuda

    from lossforge import bench, inputs

    device_arrays = [cuda.to_device(a) for a in arrays]
    grads = tuple(cuda.device_array_like(device_arrays[k]) for k in inputs.positions(loss))
    call = functools.partial(
        loss.value_and_grad, *device_arrays, out=grads[0] if len(grads) == 1 else grads
    )
    value, _ = call()  # compiles; the value and `grads` are compared with PyTorch's
    row: dict[str, Any] = {
        "loss": case.name,
        "variant": case.variant,
        "label": bench._shape_label(arrays[0].shape),
        "shape": list(arrays[0].shape),
        "dtype": case.dtype,
        "overhead": case.overhead,
        "bytes": inputs.nbytes_fused(loss, arrays),
    }
    peer = None
    if torch is not None:
        peer = bench._torch_impl(torch, loss, arrays, progress, device=torch_device)
    if peer is not None:
        their_value, their_grads = peer()
        row["torch"] = bench._compare(
            _host(value),
            tuple(_host(g) for g in grads),
            (_host(their_value), tuple(_host(g) for g in their_grads)),
            case.dtype,
        )
        if not row["torch"]["ok"]:
            progress(
                f"  ! torch disagrees with lossforge: value rel {row['torch']['value_rel']:.2g}"
                f", gradient rel {row['torch']['grad_rel']:.2g}"
            )
    on_gpu = torch_device.startswith("cuda")
    if case.overhead:
        # Wall time of a call and a synchronization after it, what a step that reads the loss
        # back pays: a reduced lossforge call synchronizes anyway, PyTorch's backward does not.
        def wall(f: Callable[[], Any]) -> float:
            return float(bench.measure(f, min_time, repeat)["median_s"])

        row["lossforge_s"] = wall(lambda: (call(), cuda.synchronize()))
        if peer is not None:
            sync = torch.cuda.synchronize if on_gpu else (lambda: None)
            step = peer
            row["torch"]["s"] = wall(lambda: (step(), sync()))
    else:
        # The simulator's events report -1 ms: the host clock stands in for them there.
        event = _WallEvent if numba.config.ENABLE_CUDASIM else cuda.event
        row["lossforge_s"] = _median_ms(call, event, repeat) / 1e3
        row["gbps"] = row["bytes"] / row["lossforge_s"] / 1e9
        if peer is not None:
            torch_event = (lambda: torch.cuda.Event(enable_timing=True)) if on_gpu else _WallEvent
            row["torch"]["s"] = _median_ms(peer, torch_event, repeat) / 1e3
    if peer is not None:
        row["torch"]["ratio"] = row["torch"]["s"] / row["lossforge_s"]
    else:
        row["torch"] = None
    return row


def format_table(rows: Sequence[dict[str, Any]], bandwidth: float) -> str:
    """The bandwidth table, then the host-overhead table, of rows made by :func:`run`."""
    from lossforge import inputs

    def torch_cells(r: dict[str, Any], scale: float, digits: int) -> list[str]:
        p = r["torch"]
        if p is None:
            return ["-", "-"]
        flag = "" if p["ok"] else " !"
        return [f"{p['s'] * scale:.{digits}f}", f"{p['ratio']:.1f}x{flag}"]

    timed: list[Sequence[str]] = [BANDWIDTH_COLUMNS]
    fixed: list[Sequence[str]] = [OVERHEAD_COLUMNS]
    for r in rows:
        if r["overhead"]:
            us = f"{r['lossforge_s'] * 1e6:.1f}"
            fixed.append([r["loss"], r["label"], r["dtype"], us, *torch_cells(r, 1e6, 1)])
            continue
        timed.append(
            [
                r["loss"],
                inputs.label(r["variant"]) or "-",
                r["label"],
                r["dtype"],
                f"{r['bytes'] / 1e6:.1f}",
                f"{r['lossforge_s'] * 1e3:.3f}",
                f"{r['gbps']:.0f}",
                f"{r['gbps'] / bandwidth:.0%}",
                *torch_cells(r, 1e3, 3),
            ]
        )
    lines = [
        "value_and_grad with out= (median of calls timed by CUDA events); MB: inputs read once "
        f"+ gradients written once; roofline: GB/s / {bandwidth:.0f} GB/s; speed-up: torch ms "
        "/ lossforge ms ('!': torch disagrees with lossforge)"
    ]
    titled = [("", timed), ("host overhead: wall time per call, a synchronization each", fixed)]
    for title, table in titled:
        if len(table) == 1:
            continue
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines += [title] if title else []
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from lossforge import bench

    p = argparse.ArgumentParser(
        prog="python -m lossforge.bench_cuda",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--loss", action="append", metavar="NAME", help="a loss (repeatable)")
    p.add_argument(
        "--sizes",
        "--size",
        nargs="+",
        type=bench._count,
        default=list(DEFAULT_SIZES),
        metavar="N",
        help="element counts (default 2^20 2^26)",
    )
    p.add_argument("--dtypes", "--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument(
        "--overhead-size",
        type=lambda text: 0 if text.strip() == "0" else bench._count(text),
        default=OVERHEAD_SIZE,
        metavar="N",
        help="elements of the host-overhead rows (default 2^10; 0: none)",
    )
    p.add_argument(
        "--example",
        action="append",
        type=bench._keyword,
        metavar="KEY=VALUE",
        help="a keyword for each loss's example, instead of its declared variants",
    )
    p.add_argument("--repeat", type=int, default=20, help="timed calls per figure (median)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per overhead figure")
    p.add_argument("--bandwidth", type=float, default=3350.0, help="peak GB/s (H100 SXM)")
    p.add_argument("--skip", action="append", choices=("torch",), default=[])
    p.add_argument("--no-torch", action="store_true", help="same as --skip torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the raw figures here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:  # usage errors first, GPU or not
        selected = cases(
            args.loss,
            args.sizes,
            list(dict.fromkeys(args.dtypes)),
            args.overhead_size,
            dict(args.example or ()),
            progress,
        )
    except ValueError as exc:
        print(f"bench_cuda: error: {exc}", file=sys.stderr)
        return 2
    import numba

    if numba.config.ENABLE_CUDASIM:
        print("bench_cuda needs a real GPU: NUMBA_ENABLE_CUDASIM is set", file=sys.stderr)
        return 2
    from numba import cuda

    if not cuda.is_available():
        print("bench_cuda needs a CUDA GPU: none is available", file=sys.stderr)
        return 2
    from lossforge import bench

    torch = None
    if not (args.no_torch or "torch" in args.skip):
        torch = bench._optional("torch")
        if torch is not None and not torch.cuda.is_available():
            torch = None
    name = cuda.get_current_device().name
    print(f"device: {name.decode() if isinstance(name, bytes) else name}")
    rows = run(selected, args.repeat, args.min_time, torch, seed=args.seed, progress=progress)
    print(format_table(rows, args.bandwidth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
