"""The vectorizable exp/log/log1p of runtime.mathfn: ulp error against long-double NumPy
(float64 functions) and float64 NumPy (float32 ones), and IEEE behaviour at the edges.
Compiled with the kernels' own options, FMA contraction included."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lossforge.runtime import mathfn
from lossforge.runtime.cpu import JIT_OPTIONS

_OPTIONS = {**JIT_OPTIONS, "cache": False}


def _elementwise(fn):
    @numba.njit(**_OPTIONS)
    def apply(x, out):
        for i in range(x.size):
            out[i] = fn(x[i])

    return apply


# name: (the function, its NumPy reference, the dtype it computes in)
FUNCTIONS = {
    "exp": (mathfn.exp, np.exp, np.float64),
    "log": (mathfn.log, np.log, np.float64),
    "log1p": (mathfn.log1p, np.log1p, np.float64),
    "log1p_unit": (mathfn.log1p_unit, np.log1p, np.float64),
    "exp_nonpositive_f64": (mathfn.exp_nonpositive_f64, np.exp, np.float64),
    "exp_nonpositive_f32": (mathfn.exp_nonpositive_f32, np.exp, np.float32),
    "log_f32": (mathfn.log_f32, np.log, np.float32),
    "log1p_unit_f32": (mathfn.log1p_unit_f32, np.log1p, np.float32),
}
_COMPILED = {name: _elementwise(fn) for name, (fn, _, _) in FUNCTIONS.items()}


def apply(name, x):
    x = np.asarray(x, FUNCTIONS[name][2])
    out = np.empty_like(x)
    _COMPILED[name](x, out)
    return out


def ulp_error(name, x):
    reference, dtype = FUNCTIONS[name][1:]
    x = x.astype(dtype)
    got = apply(name, x)
    wide = np.longdouble if dtype == np.float64 else np.float64
    with np.errstate(all="ignore"):
        exact = reference(x.astype(wide))
        rounded = exact.astype(dtype)
    finite = np.isfinite(rounded) & (rounded != 0)
    spacing = np.spacing(np.abs(rounded[finite])).astype(wide)
    return np.abs(got[finite].astype(wide) - exact[finite]) / spacing


def samples(name, rng):
    base = name.removesuffix("_f32").removesuffix("_f64")
    if base == "exp":
        return np.concatenate(
            [
                rng.uniform(-745, 710, 200_000),
                rng.uniform(-1, 1, 100_000),
                rng.uniform(-40, 40, 100_000),
                # x / log 2 at half-integers, where n = round(x / log 2) is a tie: either n
                # must do (|r| at its bound ln(2) / 2), subnormal results included
                (np.arange(-1075, 1024) + 0.5) * np.log(2.0),
            ]
        )
    if base == "exp_nonpositive":  # results in the normal range (below it: test_flush)
        low = -87.3 if name.endswith("_f32") else -708.39
        return np.concatenate(
            [
                rng.uniform(low, 0, 200_000),
                rng.uniform(-1, 0, 100_000),
                -(10.0 ** rng.uniform(-30, 0, 100_000)),
                [0.0, low],
            ]
        )
    if base == "log":
        if name == "log_f32":
            return np.concatenate(
                [np.exp(rng.uniform(-87, 88, 200_000)), rng.uniform(0.5, 2, 100_000)]
            )
        return np.concatenate(
            [
                np.exp(rng.uniform(-700, 709, 200_000)),
                rng.uniform(0.5, 2.0, 100_000),
                10.0 ** rng.uniform(-323, -308, 10_000),  # subnormals
            ]
        )
    if base == "log1p_unit":
        return np.concatenate(
            [rng.uniform(0, 1, 200_000), 10.0 ** rng.uniform(-30, 0, 100_000), [0.0, 1.0]]
        )
    return np.concatenate(
        [
            rng.uniform(-1, 1, 100_000),
            10.0 ** rng.uniform(-300, 0, 100_000),
            10.0 ** rng.uniform(0, 300, 10_000),
        ]
    )


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_within_two_ulp(name, rng):
    if FUNCTIONS[name][2] == np.float64 and np.finfo(np.longdouble).nmant <= 52:
        pytest.skip("needs an extended long double")
    assert ulp_error(name, samples(name, rng)).max() <= 2.0


@pytest.mark.parametrize(
    ("name", "x"),
    [
        ("exp", [np.inf, -np.inf, np.nan, -np.nan, 0.0, 710.0, -746.0, -745.13, 709.78]),
        ("log", [np.inf, -np.inf, np.nan, 0.0, -0.0, -1.0, 1.0, 5e-324, 1.7976931348623157e308]),
        ("log1p", [-1.0, -2.0, np.inf, np.nan, 0.0, 1e-320, 1e-17]),
        ("log1p_unit", [np.nan, 0.0, 1.0, 1e-320]),
        ("exp_nonpositive_f64", [-np.inf, np.nan, 0.0, -0.0, -5e-324, -800.0, -1e308]),
        ("exp_nonpositive_f32", [-np.inf, np.nan, 0.0, -0.0, -1e-45, -200.0, -1e38]),
        ("log_f32", [np.inf, -np.inf, np.nan, 0.0, -0.0, -1.0, 1.0, 1e-45, 3.4e38]),
        ("log1p_unit_f32", [np.nan, 0.0, 1.0, 1e-45]),
    ],
)
def test_special_values(name, x):
    reference, dtype = FUNCTIONS[name][1:]
    x = np.array(x, dtype)
    with np.errstate(all="ignore"):
        expected = reference(x.astype(np.float64)).astype(dtype)
    np.testing.assert_array_equal(apply(name, x), expected)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("exp_nonpositive_f32", -104, -87.3), ("exp_nonpositive_f64", -745.2, -708.3)],
)
def test_exp_nonpositive_flushes_below_the_normal_range(name, low, high, rng):
    # e ** x is below the smallest normal (float32: 1.18e-38 for x < -87.34; float64:
    # 2.23e-308 for x < -708.40): results may be 0 or subnormal, within that of e ** x
    dtype = FUNCTIONS[name][2]
    x = np.concatenate([rng.uniform(low, high, 100_000), [high - 0.1, high - 1.0, low]])
    got = apply(name, x)
    wide = np.longdouble if dtype == np.float64 else np.float64
    exact = np.exp(x.astype(dtype).astype(wide))
    assert np.all(got >= 0)
    assert np.abs(got - exact).max() <= np.finfo(dtype).tiny


@numba.njit(**_OPTIONS)
def _array_max(x):
    return mathfn.array_max(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(
    values=st.lists(
        st.floats(allow_nan=False, width=32) | st.sampled_from([0.0, -0.0, 5e-324, -5e-324]),
        max_size=80,
    )
)
def test_array_max_is_the_maximum(dtype, values):
    # signed zeros compare equal, so the test cannot tell which one is returned: neither can
    # a kernel, which only subtracts the maximum
    x = np.array(values, dtype)
    expected = x.max() if x.size else -np.inf
    assert _array_max(x) == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_array_max_of_nan(dtype):
    positive_nan = np.array([1.0, np.nan, 2.0], dtype)
    assert np.isnan(_array_max(positive_nan))
    negative_nan = np.array([1.0, -np.nan, 2.0], dtype)
    assert np.signbit(negative_nan[1])
    assert _array_max(negative_nan) == 2.0  # then exp(nan - max) is nan: the loss is nan
    assert _array_max(np.array([-np.inf, -np.inf], dtype)) == -np.inf
    assert _array_max(np.array([3.0, np.inf], dtype)) == np.inf
