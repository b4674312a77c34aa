"""The vectorizable exp/log/log1p of runtime.mathfn: ulp error against long-double NumPy
over the whole float64 range, and IEEE behaviour at the edges."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from lossforge.runtime import mathfn


@numba.njit(error_model="numpy")
def _exp(x, out):
    for i in range(x.size):
        out[i] = mathfn.exp(x[i])


@numba.njit(error_model="numpy")
def _log(x, out):
    for i in range(x.size):
        out[i] = mathfn.log(x[i])


@numba.njit(error_model="numpy")
def _log1p(x, out):
    for i in range(x.size):
        out[i] = mathfn.log1p(x[i])


FUNCTIONS = {"exp": (_exp, np.exp), "log": (_log, np.log), "log1p": (_log1p, np.log1p)}


def apply(name, x):
    out = np.empty_like(x)
    FUNCTIONS[name][0](x, out)
    return out


def ulp_error(name, x):
    got = apply(name, x)
    with np.errstate(all="ignore"):
        exact = FUNCTIONS[name][1](x.astype(np.longdouble))
        rounded = exact.astype(np.float64)
    finite = np.isfinite(rounded) & (rounded != 0)
    rounded = rounded[finite]
    return np.abs(got[finite].astype(np.longdouble) - exact[finite]) / np.spacing(np.abs(rounded))


def samples(name, rng):
    if name == "exp":
        return np.concatenate(
            [
                rng.uniform(-745, 710, 200_000),
                rng.uniform(-1, 1, 100_000),
                rng.uniform(-40, 40, 100_000),
            ]
        )
    if name == "log":
        return np.concatenate(
            [
                np.exp(rng.uniform(-700, 709, 200_000)),
                rng.uniform(0.5, 2.0, 100_000),
                10.0 ** rng.uniform(-323, -308, 10_000),  # subnormals
            ]
        )
    return np.concatenate(
        [
            rng.uniform(-1, 1, 100_000),
            10.0 ** rng.uniform(-300, 0, 100_000),
            10.0 ** rng.uniform(0, 300, 10_000),
        ]
    )


@pytest.mark.skipif(np.finfo(np.longdouble).nmant <= 52, reason="needs an extended long double")
@pytest.mark.parametrize("name", ["exp", "log", "log1p"])
def test_within_two_ulp(name, rng):
    assert ulp_error(name, samples(name, rng)).max() <= 2.0


@pytest.mark.parametrize(
    ("name", "x", "expected"),
    [
        ("exp", [np.inf, -np.inf, np.nan, 0.0, 710.0, -746.0, -745.13, 709.78], None),
        (
            "log",
            [np.inf, -np.inf, np.nan, 0.0, -0.0, -1.0, 1.0, 5e-324, 1.7976931348623157e308],
            None,
        ),
        ("log1p", [-1.0, -2.0, np.inf, np.nan, 0.0, 1e-320, 1e-17], None),
    ],
)
def test_special_values(name, x, expected):
    x = np.array(x)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(apply(name, x), FUNCTIONS[name][1](x))
