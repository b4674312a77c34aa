"""Compiles every CUDA kernel for the real CUDA target, without a GPU.

The simulator runs kernels as Python, so it cannot tell whether the CUDA target types and
lowers them. This script (run by ``tests/test_cuda.py`` in a subprocess, with
``NUMBA_ENABLE_CUDASIM=0``) compiles each kernel for compute capability 9.0 with the argument
types its wrapper passes. Typing and lowering always run; the last step (NVVM to PTX) runs
when libNVVM and NVRTC can be loaded (e.g. ``pip install nvidia-nvvm nvidia-cuda-nvrtc``),
and is left out otherwise. Exit status 1 if any kernel fails; prints ``SKIP`` when this
numba-cuda lacks the internals the check relies on.
"""

from __future__ import annotations

import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

import numba.cuda.dispatcher as _dispatcher
import numpy as np
from numba import cuda, types
from numba.np import numpy_support


class _Device:
    compute_capability = (9, 0)


# Device functions are compiled for the current device's compute capability: without a GPU,
# say which one.
_dispatcher.get_current_device = lambda: _Device()

import lossforge.plugins.binary as binary  # noqa: E402
import lossforge.plugins.margin.cuda as margin  # noqa: E402
import lossforge.plugins.multiclass as softmax_losses  # noqa: E402
import lossforge.plugins.multiclass.cuda as multiclass  # noqa: E402
import lossforge.plugins.regression as regression  # noqa: E402
import lossforge.plugins.regression.cuda as regression_cuda  # noqa: E402
import lossforge.plugins.sequence.cuda as sequence  # noqa: E402
import lossforge.plugins.similarity as similarity  # noqa: E402
import lossforge.plugins.similarity.overlap_cuda as overlap_cuda  # noqa: E402
import lossforge.plugins.similarity.triplet_cuda as triplet_cuda  # noqa: E402

from lossforge.runtime import cuda as rt  # noqa: E402


def _array(dtype, ndim=1, layout="C"):
    return types.Array(numpy_support.from_dtype(np.dtype(dtype)), ndim, layout)


def signatures(dtype):
    a, i, f = _array(dtype), types.int64, types.float64
    index, f64, scratch = _array(np.int64), _array(np.float64), _array(np.float64, 2)
    boolean, f64x3 = types.boolean, _array(np.float64, 3)
    one = types.UniTuple(f, 1)  # the parameters of a formula without any
    return [
        (rt._gather, (_array(dtype, 8, "A"), a)),
        (rt._gather, (_array(np.float16, 8, "A"), _array(np.float32))),
        (rt._gather, (_array(np.float32, 8, "A"), _array(np.float16))),
        (rt._gather, (_array(np.int32, 8, "A"), index)),
        (rt._sum, (a, scratch)),
        *[
            (
                rt.elementwise_kernel(k.formula, k.invalid, k.hessian, f"check_{k.__name__}"),
                (a, a, a, a, p, a, a, a, a, a, f, scratch),
            )
            for k, p in [
                (regression.KERNELS["mse_loss"][0], types.UniTuple(f, 1)),
                (regression.KERNELS["l1_loss"][0], types.UniTuple(f, 1)),
                (regression.KERNELS["smooth_l1_loss"][0], types.UniTuple(f, 2)),
                (regression.KERNELS["huber_loss"][0], types.UniTuple(f, 1)),
                (regression.POISSON, types.UniTuple(f, 3)),
                (regression.POISSON_LOG_RATE, types.UniTuple(f, 3)),
                (regression.KERNELS["log_cosh_loss"][0], types.UniTuple(f, 1)),
                (regression.KERNELS["tweedie_loss"][0], types.UniTuple(f, 1)),
                (regression.KL_DIV, types.UniTuple(f, 1)),
            ]
        ],
        *[
            (
                rt.elementwise_kernel(
                    k.formula, k.invalid, k.hessian, f"check_{k.__name__}", k.target_grad
                ),
                (a, a, a, a, one, a, a, a, a, a, f, scratch),
            )
            for k in (
                binary.BCE,
                binary.LOGITS,
                binary.SOFT_MARGIN,
                binary.HINGE_EMBEDDING,
                binary.MARGIN_RANKING,
            )
        ],
        *[
            (
                rt.elementwise_kernel(
                    k.formula, k.invalid, k.hessian, f"check_{name}", k.target_grad
                ),
                (a, a, a, a, types.UniTuple(f, 2), a, a, a, a, a, f, scratch),
            )
            for name, k in [
                ("gaussian_nll", regression.GAUSSIAN),
                ("gaussian_nll_hessian", regression.GAUSSIAN_HESSIAN),
            ]
        ],
        (regression_cuda._sum_columns, (a, i, i, a)),
        (
            rt.row_mean_kernel(
                binary.LOGITS.formula, None, binary.LOGITS.hessian, "check_row_mean"
            ),
            (a, a, a, a, one, i, i, a, a, a, a, f, i, scratch),
        ),
        (multiclass._check_targets, (index, i, i, a, scratch)),
        (multiclass._nll, (a, index, a, i, i, a, a, a, f, i, scratch)),
        (margin._multi_margin, (a, index, a, i, i, i, f, a, a, a, a, f, i, scratch)),
        (margin._multilabel_margin, (a, index, i, i, a, a, a, f, scratch)),
        *[
            (
                rt.softmax_rows_kernel(k.row, k.transform, f"check_softmax_{k.__name__}"),
                (
                    a,
                    index,
                    a,
                    a,
                    types.UniTuple(f, n),
                    i,
                    i,
                    i,
                    f,
                    types.boolean,
                    a,
                    a,
                    a,
                    f,
                    i,
                    scratch,
                ),
            )
            for k, n in ((softmax_losses.SOFTMAX, 4), (softmax_losses.CROSS_ENTROPY, 1))
        ],
        *[
            (
                rt.softmax_hessian_kernel(
                    (k.row, k.row_hessian, k.transform, k.transform_hessian),
                    f"check_softmax_hessian_{k.__name__}",
                ),
                (
                    a,
                    index,
                    a,
                    a,
                    types.UniTuple(f, n),
                    i,
                    i,
                    boolean,
                    i,
                    f,
                    boolean,
                    a,
                    a,
                    a,
                    a,
                    f,
                    i,
                    scratch,
                ),
            )
            for k, n in ((softmax_losses.SOFTMAX, 4), (softmax_losses.CROSS_ENTROPY, 1))
        ],
        *[
            (
                rt.rowwise_kernel(k.formulas, f"check_{k.__name__}_rowwise"),
                (a, a, f64, one, i, i, a, a, a, a, f, i, scratch),
            )
            for k in (similarity.COSINE, similarity.EMBEDDING)
        ],
        (overlap_cuda.SUMS, (a, a, i, types.boolean, i, scratch)),
        (overlap_cuda.GRAD, (a, a, i, types.boolean, f64, f64, a)),
        (triplet_cuda.KERNEL, (a, a, a, types.UniTuple(f, 4), i, i, a, a, a, a, a, f, scratch)),
        (
            sequence._ctc,
            (a, i, i, *[index] * 4, i, boolean, boolean, f64x3, f64x3, a, a, a, f, scratch),
        ),
    ]


class _Lowered(Exception):
    """Raised where NVVM would start: typing and lowering succeeded."""


def _nvvm_works() -> bool:
    def probe(out):
        out[0] = 1.0

    try:
        cuda.compile_ptx(probe, (_array(np.float64),), cc=_Device.compute_capability)
    except Exception:
        return False
    return True


def main() -> int:
    try:  # the internals this relies on (numba-cuda 0.30)
        from numba.cuda.codegen import CUDACodeLibrary

        assert callable(CUDACodeLibrary.get_asm_strs)
        assert callable(_dispatcher.get_current_device)
    except (ImportError, AttributeError, AssertionError) as exc:
        print(f"SKIP: this numba-cuda differs from the one the check was written for ({exc!r})")
        return 0
    if not _nvvm_works():  # stop where NVVM would take over

        def lowered_only(self, *args, **kwargs):
            raise _Lowered

        CUDACodeLibrary.get_asm_strs = lowered_only
    failed = compiled = lowered = 0
    for dtype in (np.float32, np.float64):
        for kernel, signature in signatures(dtype):
            name = f"{kernel.py_func.__module__}.{kernel.py_func.__name__}{signature}"
            try:
                cuda.compile_ptx(kernel.py_func, signature, cc=_Device.compute_capability)
                compiled += 1
            except _Lowered:
                lowered += 1
            except Exception as exc:
                failed += 1
                print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"{compiled} compiled to PTX, {lowered} typed and lowered (no NVVM), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
