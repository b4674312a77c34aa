"""The plugin contract: hook markers, the hooks, and the records plugins yield.

A plugin is a module (found through the entry-point group ``"lossforge"``) with functions
marked ``@lossforge.hookimpl``:

- ``lossforge_losses()`` yields :class:`LossSpec` records: the losses it declares.
- ``lossforge_kernels()`` yields :class:`KernelSpec` records: compiled value-and-gradient
  kernels, one per loss and backend. A plugin may supply kernels for losses declared by
  another plugin; among several kernels for one (loss, backend), the plugin called first
  wins, so ``@hookimpl(tryfirst=True)`` replaces a built-in kernel.

Hooks are called once, when the registry is first used, never on a loss call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

PROJECT = "lossforge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class LossSpec:
    """A loss as a plugin declares it.

    name: the functional name (``"mse_loss"``), unique across plugins.
    family: a short group name (``"regression"``).
    arguments: the positional array arguments, in order (``("input", "target")``).
    differentiable: the arguments the gradient is taken for, in order.
    options: the keyword-only options and their defaults; ``"reduction"`` among them makes
        the loss reduced (``"none" | "mean" | "sum"``), otherwise it returns an array.
    prepare: ``prepare(arrays, options, backend) -> lossforge.Prepared``; validates and
        normalises the arguments (see ``lossforge.validate``). ``options`` holds every option.
    reference: optional float64 NumPy reference, ``reference(*arrays, **options)``, returning
        the per-element loss (``reduction="none"``) as an array; the conformance kit uses it.
    example: optional ``example(rng, size, dtype, **variant) -> (arrays, options)``: valid
        inputs of about ``size`` elements. The conformance kit calls it without a variant and
        uses the options too (non-default ones exercise more paths). Benchmarks
        (``python -m lossforge bench``, ``asv_bench/``) and ``lossforge.warmup`` use its
        arrays with every option at its default, the path most calls take: the arrays must
        be valid with the defaults as well.
    example_variants: optional keyword sets for ``example`` that benchmarks and warmup
        cover, one each: input kinds that compile different kernels or run at different
        speeds, e.g. ``({"classes": 10}, {"classes": 1000})`` for rows of few and of many
        classes. The keywords are the plugin's own. Empty (the default): the plain call
        ``example(rng, size, dtype)``.
    doc: the docstring of the functional form.
    option_sets: non-default options that the conformance kit checks besides the example's
        own: each a mapping of options, or a callable ``(rng, arrays, dtype) -> mapping`` for
        options that depend on the example's arrays (a weight of the input's shape). Its
        entries update the example's options; one named after an argument replaces that
        array. See ``lossforge.testing``.
    hessian_bound: the Hessian its kernels give (``Loss.grad_hess``) is an upper bound of
        the second derivative, not its value, where the loss has linear pieces (there the
        true value, 0, would make a Newton step infinite): e.g. the curvature of the loss's
        quadratic piece everywhere. The conformance kit then checks it against finite
        differences as a bound.
    reductions: the loss's reductions beyond ``"none" | "mean" | "sum"`` (kl_div's
        ``"batchmean"``), each a mean over a denominator of its own: ``prepare`` receives the
        name in ``options["reduction"]`` and returns a ``Prepared`` with reduction
        ``"mean"`` and that denominator, so that kernels and ``Loss`` know only the three.
        ``Loss.partial`` given one returns its denominator (by default ``"mean"``'s).
    weighted_mean: ``"mean"`` divides each loss by a weight of its own before averaging
        (ctc_loss: by its target length), so the ``"sum"`` is not the mean's total: its
        ``prepare`` returns ``"mean"`` with the plain denominator (the batch size) and the
        kernels divide; ``Loss.partial`` gives the mean's pair (its total, the denominator).
    gradient_term: optional ``(arrays, options, grad_output) -> array``, for a loss whose
        gradient is not the derivative of its value by convention (ctc_loss returns
        PyTorch's gradient, taken through the ``log_softmax`` its log-probabilities come
        from): the term the gradient of the first differentiable argument adds to that
        derivative, for ``reduction="none"`` and ``grad_output``. The conformance kit checks
        the gradient less this term against finite differences.
    """

    name: str
    family: str
    arguments: tuple[str, ...]
    differentiable: tuple[str, ...]
    options: Mapping[str, Any]
    prepare: Callable[..., Any]
    reference: Callable[..., Any] | None = None
    example: Callable[..., Any] | None = None
    doc: str = ""
    example_variants: tuple[Mapping[str, Any], ...] = ()
    option_sets: tuple[Mapping[str, Any] | Callable[..., Mapping[str, Any]], ...] = ()
    hessian_bound: bool = False
    reductions: tuple[str, ...] = ()
    weighted_mean: bool = False
    gradient_term: Callable[..., Any] | None = None


@dataclass(frozen=True)
class KernelSpec:
    """A compiled kernel for one loss on one backend (``"cpu"`` or ``"cuda"``).

    ``function`` is the callable or an import path ``"package.module:attribute"`` resolved
    the first time the kernel is needed, so that no plugin compiles or imports a GPU stack
    before it is used. Its call is::

        total = function(p, loss_out, grad_outs, grad_output, scale)

    ``p`` is the :class:`lossforge.Prepared` that the loss's ``prepare`` returned.
    ``loss_out`` is ``None`` or an array of ``p.value_shape`` to receive per-element losses.
    ``grad_outs`` is ``None`` or a tuple of arrays, one per differentiable argument, of the
    shapes in ``p.grad_shapes``, to receive ``grad_output * scale * d(loss)/d(argument)``.
    ``grad_output`` is ``None`` (ones) or an array of ``p.value_shape`` (reduction
    ``"none"``). The kernel returns the float sum of the (weighted) per-element losses.

    ``fast`` (optional, CPU kernels only; a callable or an import path) is the whole of
    ``value_and_grad(*arrays, out=out)`` with every option at its default, for the case its
    plugin makes cheap (typically NumPy arrays already as the kernel takes them)::

        result = fast(arrays, out)  # (value, gradient), or None: take the general path

    It skips the general path's per-call layers (options, ``prepare``, ``Prepared``, output
    checks), which cost microseconds, as much as the kernel on small inputs. It must return
    exactly what the general path returns, and ``None`` for anything else, bad input
    included (the general path then raises the right error). It is used only with the
    kernel it comes with: a plugin that replaces the kernel replaces it too.

    ``hessian`` (optional; a callable or an import path) is the kernel of ``grad_hess``: the
    gradient and the Hessian diagonal with respect to the first differentiable argument in
    one pass::

        total = hessian(p, loss_out, (grad_out,), (hess_out,), grad_output, scale)

    ``hess_out`` receives ``grad_output * scale * d^2(loss)/d(argument)^2`` element by
    element, weighted as the gradient is; the rest is as for ``function``. It comes and goes
    with its kernel, like ``fast``.
    """

    loss: str
    backend: str
    function: Callable[..., float] | str
    extras: Mapping[str, Any] = field(default_factory=dict)
    fast: Callable[..., Any] | str | None = None
    hessian: Callable[..., float] | str | None = None


@hookspec
def lossforge_losses() -> Iterable[LossSpec]:  # type: ignore[empty-body]
    """Declare losses: yield or return :class:`LossSpec` records."""


@hookspec
def lossforge_kernels() -> Iterable[KernelSpec]:  # type: ignore[empty-body]
    """Supply kernels: yield or return :class:`KernelSpec` records."""
