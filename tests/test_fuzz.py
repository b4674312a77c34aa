"""Fuzzing every registered loss over its argument space (API.md section 5).

Each example takes a loss's own ``LossSpec.example`` and bends it: shapes (empty, 0-d),
dtypes (float16, big-endian, integer, unsigned, bool, complex), layouts (strided,
transposed, read-only), NaN/Inf, valid and invalid options, and ``out=`` arrays that are
right, of the wrong shape or dtype, the input itself, or overlapping it. Whatever comes in,
a call either raises a contract error (``ValueError``, ``TypeError``, ``IndexError``) or
returns the right value (the spec's float64 ``reference``, where the inputs are valid), and
never modifies its inputs. Bounded and deterministic: ``derandomize=True``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import assert_unchanged, layouts, snapshot

import lossforge as lf

CONTRACT_ERRORS = (ValueError, TypeError, IndexError)
LOSSES = lf.list_losses()

#: dtypes the first argument is converted to; those of kind "f" are valid.
DTYPES = ["=f8", "=f4", "=f2", ">f8", ">f4", "i4", "u1", "u8", "?", "c8"]

#: Invalid values of options, where a loss has the option: each is a contract error.
BAD_OPTIONS = {
    "reduction": ["avg", None, 1],
    "ignore_index": [2**63, -(2**63) - 1, 1.5],
    "label_smoothing": [-0.1, 2.0, float("nan")],
    "beta": [-1.0, "1"],
    "delta": [-1.0, float("nan")],
    "weight": ["ones", np.ones(3)],
    "pos_weight": [np.ones(3)],
    "dim": [7, -9, 1.0],
    "eps": [-1.0, 1j],
    "margin": ["x", 1j],
}


@st.composite
def cases(draw, name):
    loss = lf.get(name)
    size = draw(st.sampled_from([0, 1, 8, 64]))
    base = draw(st.sampled_from(["f8", "f4"]))
    seed = draw(st.integers(0, 2**16))
    arrays, options = loss.spec.example(np.random.default_rng(seed), size, np.dtype(base))
    arrays = list(arrays)
    valid = True
    if not draw(st.booleans()):  # the example's options, or none
        options = {}
    if draw(st.integers(0, 3)) == 0 and size == 1:
        arrays = [a.reshape(()) if a.size == 1 else a for a in arrays]
        valid = False  # 0-d: a contract error or a value, not compared
    dtype = draw(st.sampled_from(DTYPES))
    if dtype != "=" + base:
        arrays[0] = arrays[0].astype(dtype)
        if np.dtype(dtype).kind != "f":
            valid = False
        else:
            base = np.dtype(dtype).newbyteorder("=").str[1:]
    if draw(st.integers(0, 3)) == 0 and arrays[0].size and arrays[0].dtype.kind in "fc":
        special = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[0] = arrays[0].copy()
        arrays[0].reshape(-1)[draw(st.integers(0, arrays[0].size - 1))] = special
        valid = False  # propagates as IEEE arithmetic does: not compared
    layout = draw(st.sampled_from(["C", "strided", "fortran", "readonly", "bigendian"]))
    if layout != "C":
        arrays = [layouts(a)[layout] if a.ndim else a for a in arrays]
    bad = [k for k in options.keys() | loss.options.keys() if k in BAD_OPTIONS]
    if bad and draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(sorted(bad)))
        value = draw(st.sampled_from(BAD_OPTIONS[key]))
        options = dict(options, **{key: value})
        valid = False
    method = draw(st.sampled_from(["call", "grad", "value_and_grad"]))
    out_kind = "none"
    if method != "call":
        out_kind = draw(st.sampled_from(["none", "right", "shape", "dtype", "alias", "overlap"]))
    return name, arrays, options, method, out_kind, valid, base


def _outs(loss, arrays, kind, dtype):
    """An ``out=`` of the given kind for the loss's gradients (shapes of the inputs)."""
    first = np.asarray(arrays[0])
    shape = first.shape
    n = len(loss.differentiable)
    if kind == "none":
        return None
    if kind == "right":
        return tuple(np.empty(np.shape(a), dtype) for a in arrays[:n])
    if kind == "shape":
        return tuple(np.empty((*shape, 2), dtype) for _ in range(n))
    if kind == "dtype":
        return tuple(np.empty(shape, np.int32) for _ in range(n))
    if kind == "alias":
        return tuple(np.asarray(a) for a in arrays[:n])
    buf = np.empty(first.size + 1, dtype)  # overlap: the input moved into a shifted buffer
    moved = buf[:-1].reshape(shape)
    moved[...] = first
    arrays[0] = moved
    return (buf[1:].reshape(shape), *(np.empty(np.shape(a), dtype) for a in arrays[1:n]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", LOSSES)
@settings(
    max_examples=5,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_every_loss(name, data):
    # a test a loss, so that the bounds-checked CI lane can spread the losses over processes
    name, arrays, options, method, out_kind, valid, base = data.draw(cases(name))
    loss = lf.get(name)
    out = _outs(loss, arrays, out_kind, base)
    if out is not None and len(out) == 1:
        out = out[0]
    if out_kind in ("shape", "dtype", "alias", "overlap") and out is not None:
        valid = False
    before = snapshot(*arrays)
    try:
        if method == "call":
            result = loss(*arrays, **options)
        elif method == "grad":
            result = loss.grad(*arrays, out=out, **options)
        else:
            result = loss.value_and_grad(*arrays, out=out, **options)[0]
    except CONTRACT_ERRORS as exc:
        assert "Numba" not in str(exc) and "numba" not in type(exc).__module__, exc
        assert_unchanged(before, arrays)
        return
    size = np.asarray(arrays[0]).size  # a shifted buffer of one element shares none
    shared = (out_kind == "alias" and size) or (out_kind == "overlap" and size > 1)
    assert not shared, "an out= sharing memory with the input was taken"
    assert_unchanged(before, arrays)
    if not valid or method == "grad" or loss.spec.reference is None:
        return
    per_element = loss(*arrays, **(dict(options, reduction="none") if loss.reduced else options))
    expected = loss.spec.reference(*[np.asarray(a) for a in arrays], **options)
    tol = {8: 1e-9, 4: 2e-4, 2: 2e-2}[np.dtype(base).itemsize]
    np.testing.assert_allclose(
        np.asarray(per_element, np.float64), expected, rtol=tol, atol=tol, err_msg=name
    )
    if loss.reduced and options.get("reduction", "mean") == "sum":
        np.testing.assert_allclose(float(result), expected.sum(), rtol=tol, atol=tol)


def test_unknown_names_are_key_errors():
    with pytest.raises(KeyError):
        lf.get("mse")
    with pytest.raises(KeyError):
        lf.grad("no_such_loss", np.ones(2), np.ones(2))
