"""``python -m lossforge demo``: losses and gradients computed by lossforge, printed beside
PyTorch's (when PyTorch is installed), with the time each took."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

import lossforge as lf


def _cases(n: int, rng: np.random.Generator) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    labels = (rng.random(n) < 0.5).astype(np.float32)
    rows, classes = max(n // 100, 1), 100
    logits = rng.standard_normal((rows, classes), dtype=np.float32)
    index = rng.integers(0, classes, rows)
    return [
        ("mse_loss", (x, y), {}),
        ("smooth_l1_loss", (x, y), {"beta": 0.5}),
        ("binary_cross_entropy_with_logits", (x, labels), {}),
        ("cross_entropy", (logits, index), {"label_smoothing": 0.1}),
    ]


def _median_time(f: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _torch_value_and_grad(name: str, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(args[0]).requires_grad_(True)
    rest = [torch.from_numpy(a) for a in args[1:]]
    value = getattr(F, name)(x, *rest, **options)
    (g,) = torch.autograd.grad(value, x)
    return value.detach().numpy(), g.numpy()


def main(args: Any) -> int:
    torch: Any
    try:
        import torch
    except ImportError:
        torch = None
        print("(PyTorch is not installed: showing lossforge alone)")
    else:
        torch.set_num_threads(__import__("numba").get_num_threads())
    rng = np.random.default_rng(0)
    available = set(lf.list_losses())
    print(f"lossforge {lf.__version__}: value and gradient, float32, {args.size:,} elements\n")
    for name, arrays, options in _cases(args.size, rng):
        if name not in available:
            continue
        loss = lf.get(name)
        loss.value_and_grad(*arrays, **options)  # compiles (or loads from the cache)
        value, grad = loss.value_and_grad(*arrays, **options)
        ours = _median_time(lambda: loss.value_and_grad(*arrays, **options))  # noqa: B023
        shape = "x".join(map(str, arrays[0].shape))
        print(f"{name}, input {shape}" + "".join(f", {k}={v}" for k, v in options.items()))
        print(
            f"  lossforge  value {float(value):.8g}  |grad|_1 {np.abs(grad).sum():.8g}"
            f"  {ours * 1e3:8.2f} ms"
        )
        if torch is not None:
            t_value, t_grad = _torch_value_and_grad(name, arrays, options)
            theirs = _median_time(lambda: _torch_value_and_grad(name, arrays, options))  # noqa: B023
            diff = float(np.abs(grad - t_grad).max())
            print(
                f"  PyTorch    value {float(t_value):.8g}  |grad|_1 {np.abs(t_grad).sum():.8g}"
                f"  {theirs * 1e3:8.2f} ms   (max |grad diff| {diff:.2g}, "
                f"lossforge {theirs / ours:.1f}x faster)"
            )
        print()
    return 0
