"""gaussian_nll_loss's CUDA kernel of ``value_and_grad`` (imported on first CUDA call, with
the CUDA stack): the formula's kernel, then the sum of var's gradient over its broadcast
axis."""

from __future__ import annotations

from lossforge.plugins.regression import GAUSSIAN, var_axes
from numba import cuda

from lossforge.runtime import cuda as rt


@rt.kernel
def _sum_columns(src, middle, inner, dst):
    """``dst[o]``: the sum over the middle axis of ``src`` seen as ``(outer, middle,
    inner)``, in float64 and in order (one thread an element of ``dst``: deterministic)."""
    for o in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        base = (o // inner) * middle * inner + o % inner
        s = 0.0
        for j in range(middle):
            s += src[base + j * inner]
        dst[o] = s


def gaussian_nll(p, loss_out, grads, grad_output, scale):
    """As the CPU kernel (``lossforge.plugins.regression.gaussian_nll_cpu``): one pass writes
    the three gradients, var's into a full-size buffer where var was broadcast."""
    if not grads:
        return GAUSSIAN.cuda(p, loss_out, grads, grad_output, scale)
    g_input, g_target, g_var = grads
    axes = var_axes(p.value_shape, p.grad_shapes[2])
    full = g_var if axes is None else rt.empty(p.value_shape, p.dtype)
    total = GAUSSIAN.cuda_hessian(p, loss_out, (g_input, full), (g_target,), grad_output, scale)
    if axes is not None and g_var.size:
        outer, middle, inner = axes
        blocks = rt.blocks_for(outer * inner)
        _sum_columns[blocks, rt.THREADS, rt.stream()](
            rt.flat(full, p.dtype), middle, inner, rt.flat(g_var, p.dtype)
        )
    return total
