"""CUDA benchmark: each loss's fused ``value_and_grad`` on the GPU against PyTorch's CUDA
forward + backward, timed with CUDA events, with the achieved bandwidth beside the roofline.

    python -m lossforge.bench_cuda [--size 67108864] [--dtype float32] [--bandwidth 3350]

A fused pass must read its inputs once and write its gradient once, so the floor for a call
is ``bytes moved / memory bandwidth``: for ``mse_loss`` on ``n`` float32 elements that is
``3 * 4 * n`` bytes (input and target read, gradient written), 0.24 ms for ``n = 2**26`` on
an H100 SXM (~3.35 TB/s). The table prints the achieved GB/s (bytes moved / median time) and
its fraction of ``--bandwidth``. Gradients go into preallocated ``out=`` arrays; reduced
calls include the one synchronization that reads the value back.

Needs a real GPU (not the simulator); PyTorch with CUDA is optional. Importing this module
imports nothing from Numba or PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Case:
    """One benchmark: a loss, NumPy inputs, options, and the bytes a fused pass moves."""

    name: str
    shape: tuple[int, ...]
    arrays: list[Any]
    options: dict[str, Any]
    moved: int
    differentiable: tuple[int, ...] = (0,)
    torch_options: dict[str, Any] = field(default_factory=dict)


def cases(size: int, dtype: Any, classes: int) -> list[Case]:
    import numpy as np

    rng = np.random.default_rng(0)
    item = np.dtype(dtype).itemsize

    def floats(*shape: int) -> Any:
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)

    def unit(*shape: int) -> Any:
        return rng.random(shape, dtype=np.float32).astype(dtype)

    n = size
    rows = max(1, size // classes)
    ml_rows, ml_classes = max(1, size // 100), 100
    pair_rows, dim = max(1, size // 256), 256
    out = [
        Case(name, (n,), [floats(n), floats(n)], {}, 3 * n * item)
        for name in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")
    ]
    signs = np.where(unit(n) < 0.5, -1.0, 1.0).astype(dtype)  # targets in {-1, 1}
    out += [
        Case("poisson_nll_loss", (n,), [floats(n), np.floor(4 * unit(n))], {}, 3 * n * item),
        Case("soft_margin_loss", (n,), [floats(n), signs], {}, 3 * n * item),
        Case("hinge_embedding_loss", (n,), [floats(n), signs], {}, 3 * n * item),
        Case(
            "margin_ranking_loss",
            (n,),
            [floats(n), floats(n), signs],
            {},
            5 * n * item,
            differentiable=(0, 1),
        ),
        Case("kl_div", (n,), [floats(n), unit(n)], {"reduction": "batchmean"}, 3 * n * item),
        Case("log_cosh_loss", (n,), [floats(n), floats(n)], {}, 3 * n * item),
        Case("pinball_loss", (n,), [floats(n), floats(n)], {"quantile": 0.9}, 3 * n * item),
        Case("tweedie_loss", (n,), [floats(n), np.floor(4 * unit(n))], {}, 3 * n * item),
    ]
    out += [
        Case("binary_cross_entropy", (n,), [unit(n), unit(n)], {}, 3 * n * item),
        Case("binary_cross_entropy_with_logits", (n,), [floats(n), unit(n)], {}, 3 * n * item),
        Case(
            "multilabel_soft_margin_loss",
            (ml_rows, ml_classes),
            [floats(ml_rows, ml_classes), (unit(ml_rows, ml_classes) > 0.5).astype(dtype)],
            {},
            3 * ml_rows * ml_classes * item,
        ),
    ]
    for c in sorted({10, classes}):
        r = max(1, size // c)
        target = rng.integers(0, c, r)
        out.append(
            Case("cross_entropy", (r, c), [floats(r, c), target], {}, 2 * r * c * item + 8 * r)
        )
    out.append(
        Case(
            "nll_loss",
            (rows, classes),
            [floats(rows, classes), rng.integers(0, classes, rows)],
            {},
            rows * classes * item + rows * (8 + item),
        )
    )
    out.append(
        Case(
            "cosine_similarity",
            (pair_rows, dim),
            [floats(pair_rows, dim), floats(pair_rows, dim)],
            {"dim": 1},
            4 * pair_rows * dim * item + pair_rows * item,
            differentiable=(0, 1),
        )
    )
    out.append(
        Case(
            "cosine_embedding_loss",
            (pair_rows, dim),
            [
                floats(pair_rows, dim),
                floats(pair_rows, dim),
                np.where(rng.random(pair_rows) < 0.5, 1.0, -1.0),
            ],
            {},
            4 * pair_rows * dim * item + 8 * pair_rows,
            differentiable=(0, 1),
        )
    )
    return out + _from_examples({c.name for c in out}, size, dtype, rng)


def _from_examples(covered: set[str], size: int, dtype: Any, rng: Any) -> list[Case]:
    """A case for every other built-in loss with a CUDA kernel, from its ``LossSpec.example``
    with the default options (as the CPU bench takes them): its arrays read once, each
    gradient written once."""
    import numpy as np

    import lossforge
    from lossforge.plugins import DEFAULT_PLUGINS

    builtin = {name for name, _ in DEFAULT_PLUGINS}
    out = []
    for name in lossforge.list_losses():
        loss = lossforge.get(name)
        if name in covered or loss.plugin not in builtin or loss.spec.example is None:
            continue
        if "cuda" not in loss.backends:
            continue
        arrays, _ = loss.spec.example(rng, size, np.dtype(dtype))
        positions = tuple(loss.arguments.index(d) for d in loss.differentiable)
        moved = sum(a.nbytes for a in arrays) + sum(arrays[i].nbytes for i in positions)
        out.append(Case(name, np.shape(arrays[0]), list(arrays), {}, moved, positions))
    return out


def _median_ms(run: Callable[[], Any], event: Callable[[], Any], repeat: int) -> float:
    """Median time of ``run()`` in ms between two CUDA events (after two warm-up calls)."""
    run()
    run()
    times = []
    for _ in range(repeat):
        start, stop = event(), event()
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _torch_runner(case: Case, torch: Any) -> Callable[[], Any] | None:
    import numpy as np

    F = torch.nn.functional
    tensors = []
    for i, a in enumerate(case.arrays):
        t = torch.as_tensor(np.asarray(a), device="cuda")
        if i in case.differentiable:
            t.requires_grad_(True)
        tensors.append(t)
    wanted = [tensors[i] for i in case.differentiable]
    function = getattr(F, case.name, None)
    if function is None:  # a loss PyTorch does not have
        return None

    def run() -> None:
        value = function(*tensors, **case.options)
        if value.ndim:
            value = value.sum()
        torch.autograd.grad(value, wanted)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lossforge.bench_cuda", description=__doc__)
    parser.add_argument("--size", type=int, default=1 << 26, help="elements (default 2**26)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--classes", type=int, default=1000, help="cross_entropy/nll classes")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--bandwidth", type=float, default=3350.0, help="peak GB/s (H100 SXM)")
    parser.add_argument("--losses", nargs="*", help="only these losses")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    args = parser.parse_args(argv)

    import numba

    if numba.config.ENABLE_CUDASIM:
        print("bench_cuda needs a real GPU: NUMBA_ENABLE_CUDASIM is set", file=sys.stderr)
        return 2
    from numba import cuda

    if not cuda.is_available():
        print("bench_cuda needs a CUDA GPU: none is available", file=sys.stderr)
        return 2
    import numpy as np

    import lossforge as lf

    torch: Any = None
    if not args.no_torch:
        try:
            import torch as _torch

            if _torch.cuda.is_available():
                torch = _torch
        except ImportError:
            pass

    device = cuda.get_current_device()
    print(f"device: {device.name.decode() if isinstance(device.name, bytes) else device.name}")
    print(f"dtype {args.dtype}, roofline {args.bandwidth:.0f} GB/s, median of {args.repeat}")
    header = ("loss", "shape", "MB", "lossforge ms", "GB/s", "roofline", "torch ms", "speed-up")
    rows = [header]
    for case in cases(args.size, np.dtype(args.dtype), args.classes):
        if args.losses and case.name not in args.losses:
            continue
        loss = lf.get(case.name)
        device_arrays = [cuda.to_device(np.ascontiguousarray(a)) for a in case.arrays]
        outs = tuple(cuda.device_array_like(device_arrays[i]) for i in case.differentiable)
        out = outs[0] if len(outs) == 1 else outs

        def run(loss=loss, arrays=device_arrays, case=case, out=out) -> None:
            loss.value_and_grad(*arrays, out=out, **case.options)

        ms = _median_ms(run, cuda.event, args.repeat)
        gbs = case.moved / ms / 1e6
        torch_ms = speedup = "-"
        runner = _torch_runner(case, torch) if torch is not None else None
        if runner is not None:

            def torch_event() -> Any:
                return torch.cuda.Event(enable_timing=True)

            t_ms = _median_ms(runner, torch_event, args.repeat)
            torch_ms, speedup = f"{t_ms:.3f}", f"{t_ms / ms:.1f}x"
        rows.append(
            (
                case.name,
                "x".join(map(str, case.shape)),
                f"{case.moved / 1e6:.0f}",
                f"{ms:.3f}",
                f"{gbs:.0f}",
                f"{gbs / args.bandwidth:.0%}",
                torch_ms,
                speedup,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
