"""PyTorch drop-ins: every registered lossforge loss as a ``torch.autograd.Function`` and as an
``nn.Module`` named as PyTorch's, taking and returning tensors.

```python
import lossforge.torch as lft

criterion = lft.CrossEntropyLoss(label_smoothing=0.1)  # as torch.nn.CrossEntropyLoss
loss = criterion(model(x), y)
loss.backward()
lft.cross_entropy(logits, y)  # as torch.nn.functional.cross_entropy; any registered loss
lft.apply("sigmoid_focal_loss", x, y, alpha=0.5)  # a plugin's loss, by name
```

How a call runs (``lossforge.torch.LossFunction``):

- Tensors reach the kernels without a copy: a CPU tensor as ``tensor.detach().numpy()`` (the
  same memory; lossforge copies only what its kernels cannot read as it is: a non-contiguous
  or float16 input), a CUDA tensor as itself, which lossforge's ``"cuda"`` backend reads
  through ``__cuda_array_interface__`` and runs on PyTorch's current stream. Results come
  back as tensors on the input's device, CPU ones through ``torch.from_numpy`` (no copy).
  bfloat16, which NumPy lacks, is computed in float32 and returned as bfloat16.
- A ``"mean"``/``"sum"`` loss computes its value and gradient in one fused pass in
  ``forward`` (only when grad mode is on and a differentiable argument requires grad;
  otherwise the value alone). ``backward`` returns that gradient as it is when
  ``grad_output`` is 1 (``loss.backward()``), else ``gradient * grad_output``, a new tensor:
  the saved gradient is never scaled in place. The gradient is handed to autograd on the
  first backward; a second backward through a retained graph (``retain_graph=True``)
  computes it again from the saved inputs.
- ``reduction="none"`` and losses that are not reduced (``cosine_similarity``) compute the
  value in ``forward`` and the gradient in ``backward`` with ``grad_output``
  (``Loss.grad``): the gradient of a per-element value depends on ``grad_output``.
- Gradients are returned for the loss's differentiable arguments (``Loss.differentiable``,
  ``input`` for most losses) that require grad, ``None`` for the others. Another argument
  (a target, a ``weight``) that requires grad is a ``ValueError`` rather than a silently
  missing gradient: detach it, or use PyTorch's loss.
- First derivatives only: ``backward`` is ``once_differentiable``, and a backward with
  ``create_graph=True`` (double backward, gradient penalties through the loss, MAML) raises
  a ``RuntimeError`` instead of returning a gradient whose own gradient would be missing.
- ``torch.compile``: the functional and module calls are ``torch.compiler.disable``-d, so a
  compiled model graph-breaks at the loss (Dynamo cannot trace Numba kernels): the code
  before and after it is compiled, the loss runs eagerly. Not a registered custom op:
  a custom op needs a fixed schema and a shape function per loss, which a plugin's loss
  does not declare. ``torch.func`` transforms (``vmap``, ``grad``) are not supported.

Install PyTorch with ``pip install "lossforge[torch]"``; ``import lossforge`` never imports
it, only ``import lossforge.torch`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

import lossforge as lf
from lossforge.loss import Loss

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised without PyTorch
    raise ImportError(
        'lossforge.torch needs PyTorch: pip install "lossforge[torch]"'
        " (or install torch yourself, e.g. its CPU or CUDA build)"
    ) from exc

from torch.autograd.function import once_differentiable

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CosineEmbeddingLoss",
    "CosineSimilarity",
    "CrossEntropyLoss",
    "HingeEmbeddingLoss",
    "HuberLoss",
    "L1Loss",
    "LossFunction",
    "LossModule",
    "MSELoss",
    "MultiLabelSoftMarginLoss",
    "NLLLoss",
    "PoissonNLLLoss",
    "SmoothL1Loss",
    "SoftMarginLoss",
    "apply",
]


def _loss(loss: str | Loss) -> Loss:
    return loss if isinstance(loss, Loss) else lf.get(loss)


def _array(t: Any) -> Any:
    """What lossforge gets for a tensor: a NumPy view of a CPU tensor, a CUDA tensor as it is
    (``__cuda_array_interface__``); anything else unchanged."""
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach()
    kind = t.device.type
    if kind == "cuda":
        return t
    if kind != "cpu":
        raise TypeError(f"lossforge.torch runs on CPU and CUDA tensors, got a {kind} tensor")
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
        t = t.float()
    try:
        return t.numpy()
    except RuntimeError:  # a conjugate or negative view (a bit set, not applied)
        return t.resolve_conj().resolve_neg().numpy()


def _tensor(x: Any, like: torch.Tensor) -> torch.Tensor:
    """A result (NumPy array or scalar, or a CUDA tensor) as a tensor on ``like``'s device,
    bfloat16 again if ``like`` is."""
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.asarray(x))  # shares an array's memory; a scalar: 0-d
        if like.device.type != "cpu":
            x = x.to(like.device)
    if like.dtype == torch.bfloat16 and x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    return x


def _like(tensors: Sequence[Any]) -> torch.Tensor:
    """The tensor whose device (and bfloat16) a loss's value takes: the first argument."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError("lossforge.torch takes tensors; lossforge itself takes NumPy arrays")


def _grad_tensors(loss: Loss, grads: Any, tensors: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """lossforge's gradient(s) as tensors, each like its argument."""
    grads = (grads,) if len(loss.differentiable) == 1 else grads
    like = [tensors[loss.arguments.index(d)] for d in loss.differentiable]
    return tuple(
        _tensor(g, t if isinstance(t, torch.Tensor) else _like(tensors))
        for g, t in zip(grads, like)
    )


def _is_reduced(loss: Loss, options: dict[str, Any]) -> bool:
    return loss.reduced and options.get("reduction", loss.options["reduction"]) != "none"


def _check_requires_grad(loss: Loss, tensors: tuple[Any, ...], options: dict[str, Any]) -> bool:
    """Whether a differentiable argument requires grad; ``ValueError`` for any other tensor
    argument that does (lossforge has no gradient for it)."""
    wanted = False
    for name, t in (*zip(loss.arguments, tensors), *options.items()):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            if name not in loss.differentiable:
                raise ValueError(
                    f"{loss.name}: {name} requires grad, but lossforge computes the gradient "
                    f"with respect to {', '.join(loss.differentiable)} only; detach {name} "
                    f"(.detach()) or use PyTorch's own loss for a gradient with respect to it"
                )
            wanted = True
    return wanted


class LossFunction(torch.autograd.Function):
    """``LossFunction.apply(loss, options, *tensors)``: the autograd Function of every loss.
    ``loss`` is a :class:`lossforge.Loss` (or its name), ``options`` a dict of its keyword
    options (tensors allowed, e.g. ``weight``), ``tensors`` its array arguments in order.
    :func:`apply` is the same with the options as keywords, and skips autograd when nothing
    requires grad."""

    @staticmethod
    def forward(ctx: Any, loss: Any, options: dict[str, Any], *tensors: Any) -> torch.Tensor:
        loss = _loss(loss)
        _check_requires_grad(loss, tensors, options)  # another argument needing grad: raises
        arrays = [_array(t) for t in tensors]
        opts = {k: _array(v) for k, v in options.items()}
        ctx.loss, ctx.options = loss, opts
        # tensors are saved (autograd checks they are not modified in place before backward);
        # anything else lossforge takes (a NumPy target) is kept as it is
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in tensors))
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in tensors]
        ctx.grads = None
        if _is_reduced(loss, opts):
            value, grads = loss.value_and_grad(*arrays, **opts)
            ctx.grads = _grad_tensors(loss, grads, tensors)
        else:
            value = loss(*arrays, **opts)
        return _tensor(value, _like(tensors))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                f"lossforge.torch: {ctx.loss.name} has first derivatives only; a backward "
                "with create_graph=True (double backward, e.g. a gradient penalty or MAML "
                "through the loss) would miss its second derivative. Use PyTorch's own loss "
                "for that."
            )
        return _backward(ctx, grad_output)


@once_differentiable
def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
    loss, opts = ctx.loss, ctx.options
    tensors = [o if t is None else t for t, o in zip(ctx.saved_tensors, ctx.others)]
    wanted = [ctx.needs_input_grad[2 + loss.arguments.index(d)] for d in loss.differentiable]
    grads, ctx.grads = ctx.grads, None  # handed to autograd: never kept and scaled in place
    if grads is not None:
        if not (grad_output.device.type == "cpu" and float(grad_output) == 1.0):
            grads = tuple(g * grad_output for g in grads)  # out of place
    else:
        # reduction "none", a loss that is not reduced, or a second backward through a
        # retained graph: the gradient from grad_output, in its own pass
        if any(wanted):
            arrays = [_array(t) for t in tensors]
            g = loss.grad(*arrays, grad_output=_array(grad_output), **opts)
            grads = _grad_tensors(loss, g, tensors)
        else:
            grads = (None,) * len(loss.differentiable)
    result: list[Any] = [None] * (2 + len(tensors))
    for d, g, want in zip(loss.differentiable, grads, wanted):
        if want:
            result[2 + loss.arguments.index(d)] = g
    return tuple(result)


@torch.compiler.disable(reason="lossforge runs Numba kernels, which Dynamo cannot trace")
def apply(loss: str | Loss, *tensors: Any, **options: Any) -> torch.Tensor:
    """``loss(*tensors, **options)`` as a tensor, differentiable by autograd with respect to
    the loss's differentiable arguments (``lossforge.get(loss).differentiable``). ``loss``:
    a registered loss or its name. Options as in ``lossforge``'s functional form; tensor
    options (``weight``, ``pos_weight``) are taken as constants."""
    loss = _loss(loss)
    if torch.is_grad_enabled() and _check_requires_grad(loss, tensors, options):
        return LossFunction.apply(loss, options, *tensors)
    arrays = [_array(t) for t in tensors]
    value = loss(*arrays, **{k: _array(v) for k, v in options.items()})
    return _tensor(value, _like(tensors))


@functools.cache
def _functional(name: str) -> Callable[..., torch.Tensor]:
    loss = lf.get(name)

    def call(*tensors: Any, **options: Any) -> torch.Tensor:
        return apply(loss, *tensors, **options)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"lossforge's {name} on tensors, with autograd (see lossforge.torch).\n\n"
    call.__doc__ += loss.__doc__ or ""
    return call


def __getattr__(name: str) -> Callable[..., torch.Tensor]:
    # lossforge.torch.<loss name>: the functional form of every registered loss
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return _functional(name)
    except KeyError:
        raise AttributeError(f"module 'lossforge.torch' has no attribute {name!r}") from None


class LossModule(torch.nn.Module):
    """A registered loss as an ``nn.Module``: ``LossModule("mse_loss", reduction="sum")``, or
    a subclass named as PyTorch's module (``MSELoss(reduction="sum")``). Options are
    keyword-only and named as in ``torch.nn.functional`` (the deprecated ``size_average``
    and ``reduce`` are not taken); tensor options (``weight``, ``pos_weight``) are buffers,
    as in PyTorch, so that ``.to(device)`` and ``state_dict`` carry them."""

    loss_name: ClassVar[str | None] = None

    def __init__(self, *name: str, **options: Any) -> None:
        super().__init__()
        if len(name) != (self.loss_name is None):
            raise TypeError(
                f"{type(self).__name__} takes keyword options only"
                if self.loss_name
                else "LossModule takes the loss's name, then keyword options"
            )
        loss = _loss(name[0] if name else self.loss_name)  # type: ignore[arg-type]
        unknown = options.keys() - loss.options.keys()
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got an unexpected keyword argument "
                f"{sorted(unknown)[0]!r}; {loss.name} takes {', '.join(loss.options)}"
            )
        self.loss = loss
        self._option_names = tuple(options)
        for key, value in options.items():
            if isinstance(value, torch.Tensor):
                self.register_buffer(key, value)
            else:
                setattr(self, key, value)

    def forward(self, *tensors: Any) -> torch.Tensor:
        # only the options given: a call with every option at its default takes the
        # kernel's fast path
        return apply(self.loss, *tensors, **{k: getattr(self, k) for k in self._option_names})

    def extra_repr(self) -> str:
        shown = [f"{k}={getattr(self, k)!r}" for k in self._option_names]
        return ", ".join(["" if self.loss_name else repr(self.loss.name), *shown]).strip(", ")


def _module(torch_name: str, loss_name: str) -> type[LossModule]:
    doc = (
        f"``torch.nn.{torch_name}`` on lossforge's ``{loss_name}`` kernel (see "
        f"``lossforge.torch.LossModule``; options: ``help(lossforge.{loss_name})``)."
    )
    return type(torch_name, (LossModule,), {"loss_name": loss_name, "__doc__": doc})


# PyTorch's module names for the built-in losses; any other registered loss: LossModule(name).
MSELoss = _module("MSELoss", "mse_loss")
L1Loss = _module("L1Loss", "l1_loss")
SmoothL1Loss = _module("SmoothL1Loss", "smooth_l1_loss")
HuberLoss = _module("HuberLoss", "huber_loss")
PoissonNLLLoss = _module("PoissonNLLLoss", "poisson_nll_loss")
BCELoss = _module("BCELoss", "binary_cross_entropy")
BCEWithLogitsLoss = _module("BCEWithLogitsLoss", "binary_cross_entropy_with_logits")
SoftMarginLoss = _module("SoftMarginLoss", "soft_margin_loss")
HingeEmbeddingLoss = _module("HingeEmbeddingLoss", "hinge_embedding_loss")
CrossEntropyLoss = _module("CrossEntropyLoss", "cross_entropy")
NLLLoss = _module("NLLLoss", "nll_loss")
MultiLabelSoftMarginLoss = _module("MultiLabelSoftMarginLoss", "multilabel_soft_margin_loss")
MultiMarginLoss = _module("MultiMarginLoss", "multi_margin_loss")
MultiLabelMarginLoss = _module("MultiLabelMarginLoss", "multilabel_margin_loss")
CosineSimilarity = _module("CosineSimilarity", "cosine_similarity")
CosineEmbeddingLoss = _module("CosineEmbeddingLoss", "cosine_embedding_loss")
KLDivLoss = _module("KLDivLoss", "kl_div")
MarginRankingLoss = _module("MarginRankingLoss", "margin_ranking_loss")
GaussianNLLLoss = _module("GaussianNLLLoss", "gaussian_nll_loss")
TripletMarginLoss = _module("TripletMarginLoss", "triplet_margin_loss")
TripletMarginWithDistanceLoss = _module(
    "TripletMarginWithDistanceLoss", "triplet_margin_with_distance_loss"
)
CTCLoss = _module("CTCLoss", "ctc_loss")
