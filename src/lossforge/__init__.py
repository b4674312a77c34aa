"""lossforge: loss functions and their gradients in compiled kernels.

Every loss of ``torch.nn.functional`` that lossforge has is an attribute of this module under
the same name (``lossforge.mse_loss``, ``lossforge.cross_entropy``, ...), a :class:`Loss`
that computes the value when called and the gradient with ``.grad``/``.value_and_grad``.

Losses come from plugins (entry-point group ``"lossforge"``), loaded on first use: importing
this module loads no plugin and compiles nothing.
"""

from __future__ import annotations

from typing import Any

from lossforge.errors import PluginError, PluginOverrideWarning, PluginWarning
from lossforge.hookspecs import KernelSpec, LossSpec, hookimpl, hookspec
from lossforge.loss import Loss
from lossforge.registry import registry
from lossforge.validate import Prepared

__version__ = "0.1.0"

__all__ = [
    "KernelSpec",
    "Loss",
    "LossSpec",
    "PluginError",
    "PluginOverrideWarning",
    "PluginWarning",
    "Prepared",
    "get",
    "grad",
    "hookimpl",
    "hookspec",
    "list_losses",
    "value_and_grad",
]


def list_losses() -> list[str]:
    """The names of every registered loss, sorted."""
    return registry.names()


def get(name: str) -> Loss:
    """The loss called ``name``; ``KeyError`` suggesting close names if there is none."""
    return registry.get(name)


def grad(name: str, *arrays: Any, **options: Any) -> Any:
    """``get(name).grad(*arrays, **options)``."""
    return registry.get(name).grad(*arrays, **options)


def value_and_grad(name: str, *arrays: Any, **options: Any) -> tuple[Any, Any]:
    """``get(name).value_and_grad(*arrays, **options)``."""
    return registry.get(name).value_and_grad(*arrays, **options)


def __getattr__(name: str) -> Loss:
    # The functional names (lossforge.mse_loss, ...) are the registered losses themselves.
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return registry.get(name)
    except KeyError:
        raise AttributeError(f"module 'lossforge' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(registry.names()))
