"""Vectorizable ``exp``, ``log`` and ``log1p`` for float64, for use inside Numba kernels.

Numba's ``math.exp``/``math.log`` are scalar libm calls (the wheels' llvmlite has no SVML), so
a loop calling them never vectorizes: exp-heavy losses ran 3-6x slower than their memory
traffic allows. These are branch-free (selects and bit manipulation only), so LLVM turns a
loop over them into AVX-512/AVX2 code. Accuracy: within 2 ulp of the correctly rounded result
over the whole float64 range (tests/test_mathfn.py checks it), with IEEE behaviour at the
edges: ``exp(-inf) = 0``, ``exp(inf) = inf``, overflow to ``inf``, gradual underflow to
subnormals; ``log(0) = -inf``, ``log(x < 0) = nan``, ``log(inf) = inf``; nan propagates.

``array_max`` is the maximum of a row through integer keys (``order_key``): one more loop that
only vectorizes this way.

The ``_f32`` variants compute in float32 (16 lanes per AVX-512 vector) for float32 kernels,
and the ``*_native`` / ``exp_nonpositive`` dispatchers pick the variant of an argument's
precision when the calling kernel is compiled. ``exp_nonpositive_f32`` and ``_f64`` serve the
only exponentials kernels take, of ``x - max`` and ``-|x|``: no overflow path, results below
the normal range flush to 0.

Numba's on-disk cache keys a kernel on its own source file only: after editing this module,
clear the ``__pycache__`` folders of the kernels that call it.
"""

from __future__ import annotations

import math
import warnings

import numba
import numba.core.errors
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_INLINE = {"inline": "always", "cache": True, "error_model": "numpy", "nogil": True}

# Inlining these select chains trips a pedantic SSA self-check in Numba, which warns that a
# phi variable "is not in scope" and asks for a bug report; the compiled code is unaffected
# (tests/test_mathfn.py checks the results), so users are spared the noise.
warnings.filterwarnings(
    "ignore", category=numba.core.errors.NumbaIRAssumptionWarning, module=r"numba\.core\.ssa"
)


@intrinsic
def _as_int64(typingctx, x):
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _as_float64(typingctx, i):
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


@numba.njit(**_INLINE)
def _pow2(n):
    """2.0 ** n for an integer n in [-1022, 1023]; 0.0 for n = -1023."""
    return _as_float64((n + 1023) << 52)


@numba.njit(**_INLINE)
def _exp_reduced(r):
    """e ** r for float64 |r| <= ln(2) / 2, the reduced argument of ``exp`` and
    ``exp_nonpositive_f64``: the Taylor series to r**13 / 13!, remainder < 2 ** -58 relative."""
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    return p * r + 1.0


# 1.5 * 2 ** 52: x + it rounds x to an integer, held in the low bits of the float's mantissa
_ROUND = 6755399441055744.0
_ROUND_BITS64 = int(np.array(_ROUND).view(np.int64))


@numba.njit(**_INLINE)
def exp(x):
    """e ** x for float64 x. n = round(x / log 2) is rounded in the mantissa of a float, as
    ``exp_nonpositive_f64`` does, not by a float-to-int conversion after a floor (a nan test,
    two selects and a conversion): 10% off a loop of two exps (tweedie_loss, 10^6 float32,
    one thread, 2.93 -> 2.63 ms, measured side by side in one process), the same results but
    for x / log 2 within rounding of a half-integer, where either n is as good."""
    x = 709.8 if x > 709.8 else x  # nan fails both tests and stays nan
    x = -745.2 if x < -745.2 else x
    k = x * _LOG2E + _ROUND
    fn = k - _ROUND
    r = (x - fn * _LN2_HI) - fn * _LN2_LO  # |r| <= ln(2) / 2
    p = _exp_reduced(r)
    n = _as_int64(k) - _ROUND_BITS64  # in [-1075, 1024]; garbage for nan, and p is nan
    half = n >> 1  # 2**n as two factors, so that subnormal results round once
    return p * _pow2(half) * _pow2(n - half)


# from here down n = round(x / log 2) is -1023, which makes the scale 2 ** n exactly 0
_EXP_FLUSH = -709.0


@numba.njit(**_INLINE)
def exp_nonpositive_f64(x):
    """e ** x for float64 x <= 0, ``exp_nonpositive_f32``'s shortcuts in float64: no overflow
    path, n rounded in the mantissa of a float, one multiply by 2 ** n. Within 1 ulp for
    results in the normal range; results below it (x < -708.4) are 0 or subnormal, within
    2.3e-308 of e ** x; exp(-inf) = 0, nan propagates. Wrong for x > 0."""
    x = _EXP_FLUSH if x < _EXP_FLUSH else x  # nan stays nan
    k = x * _LOG2E + _ROUND
    fn = k - _ROUND
    r = (x - fn * _LN2_HI) - fn * _LN2_LO  # |r| <= ln(2) / 2
    n = _as_int64(k) - _ROUND_BITS64  # in [-1023, 0]; -1023 makes the scale 0
    return _exp_reduced(r) * _pow2(n)


_SQRT2 = 1.4142135623730951
_MANTISSA = (1 << 52) - 1


@numba.njit(**_INLINE)
def _log1p_reduced(f):
    """log(1 + f) for float64 f in [sqrt(1/2) - 1, sqrt(2) - 1], the reduced argument of
    ``log`` and ``log1p_unit``."""
    s = f / (2.0 + f)
    z = s * s
    # log(1 + f) = 2 atanh(s) = 2 (s + s**3/3 + ...): terms to s**21, remainder < 2 ** -60
    q = 1.0 / 21.0
    q = q * z + 1.0 / 19.0
    q = q * z + 1.0 / 17.0
    q = q * z + 1.0 / 15.0
    q = q * z + 1.0 / 13.0
    q = q * z + 1.0 / 11.0
    q = q * z + 1.0 / 9.0
    q = q * z + 1.0 / 7.0
    q = q * z + 1.0 / 5.0
    q = q * z + 1.0 / 3.0
    # f - (f - 2s) keeps the leading term exact: 2s = f - f*s
    return f - s * (f - z * 2.0 * q)


@numba.njit(**_INLINE)
def log(x):
    """Natural logarithm of float64 x."""
    tiny = x < 2.2250738585072014e-308  # subnormal (or 0, negative): scale into range
    y = x * 18014398509481984.0 if tiny else x  # 2 ** 54
    bits = _as_int64(y)
    e = ((bits >> 52) & 0x7FF) - 1023 - (54 if tiny else 0)
    m = _as_float64((bits & _MANTISSA) | (1023 << 52))  # in [1, 2)
    big = m > _SQRT2
    m = m * 0.5 if big else m
    e = e + 1 if big else e
    logm = _log1p_reduced(m - 1.0)
    fe = numba.float64(e)
    result = fe * _LN2_HI + (logm + fe * _LN2_LO)
    result = -math.inf if x == 0.0 else result
    result = x if x == math.inf else result
    result = math.nan if x < 0.0 else result
    return x if x != x else result


@numba.njit(**_INLINE)
def log1p(x):
    """log(1 + x) for float64 x, accurate for small x too."""
    w = 1.0 + x
    # log(w) is exact for w; (w - 1) - x is the rounding of 1 + x, corrected to first order
    correction = ((w - 1.0) - x) / w
    return log(w) - (0.0 if (w == math.inf or w == 0.0) else correction)


@intrinsic
def _f32_as_int32(typingctx, x):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _int32_as_f32(typingctx, i):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_F = np.float32
_LOG2E_F = _F(1.44269504088896341)
_LN2_HI_F = _F(0.693359375)
_LN2_LO_F = _F(-2.12194440e-4)
_ONE_F, _HALF_F, _ZERO_F = _F(1.0), _F(0.5), _F(0.0)
# 1.5 * 2 ** 23: x + it rounds x to an integer, held in the low bits of the float's mantissa
_ROUND_F = _F(12582912.0)
_ROUND_BITS = int(np.array(_ROUND_F).view(np.int32))
# below this, 2 ** n would not be a normal float32: results flush to 0 (exp(-88) ~ 6e-39)
_EXP_FLUSH_F = _F(-88.0)
# Cephes' expf minimax polynomial: exp(r) ~ 1 + r + r ** 2 P(r) on |r| <= log(2) / 2
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)


@numba.njit(**_INLINE)
def exp_nonpositive_f32(x):
    """e ** x for float32 x <= 0, in float32 arithmetic (16 lanes per AVX-512 vector): the
    exponentials of kernels, which are all of x - max or -|x|, so there is no overflow to
    handle and the scaling by 2 ** n is one multiply. Within 1 float32 ulp for results in
    the normal range; results below it (x < -87.3) are 0 or the normal-range value, within
    1.2e-38 of e ** x; exp(-inf) = 0, nan propagates. About half the work of a full-range
    exp. Wrong for x > 0."""
    x = _EXP_FLUSH_F if x < _EXP_FLUSH_F else x  # nan stays nan
    k = x * _LOG2E_F + _ROUND_F  # n = round(x / log 2), in the low bits of k
    fn = k - _ROUND_F
    r = (x - fn * _LN2_HI_F) - fn * _LN2_LO_F
    p = _P0
    p = p * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = p * (r * r) + r + _ONE_F
    n = _f32_as_int32(k) - _ROUND_BITS  # in [-127, 0]; -127 makes the scale 0
    return p * _int32_as_f32(numba.int32((n + 127) << 23))


def _order_key_codegen(bits):
    def codegen(context, builder, signature, args):
        int_type = ir.IntType(bits)
        x = args[0]
        if isinstance(signature.args[0], types.Float):
            x = builder.bitcast(x, int_type)
        sign = builder.ashr(x, ir.Constant(int_type, bits - 1))
        key = builder.xor(x, builder.and_(sign, ir.Constant(int_type, (1 << (bits - 1)) - 1)))
        if isinstance(signature.return_type, types.Float):
            key = builder.bitcast(key, context.get_value_type(signature.return_type))
        return key

    return codegen


@intrinsic
def order_key(typingctx, x):
    """The bits of a float32 (float64) as an int32 (int64) that orders as the float does:
    negative floats get their magnitude bits flipped. Integer maxima vectorize without
    fast-math flags, float maxima (compare and select) do not. nan: positive above +inf,
    negative below -inf. Written in LLVM IR so that the integer stays 32 bits wide (Numba
    widens int32 arithmetic to int64: half the lanes)."""
    if x in (types.float32, types.float64):
        return types.int32(x) if x == types.float32 else types.int64(x), _order_key_codegen(
            x.bitwidth
        )
    return None


@intrinsic
def from_order_key(typingctx, key):
    """The float whose ``order_key`` is ``key`` (the map is its own inverse on the bits)."""
    if key in (types.int32, types.int64):
        return types.float32(key) if key == types.int32 else types.float64(key), (
            _order_key_codegen(key.bitwidth)
        )
    return None


@numba.njit(**_INLINE)
def array_max(values):
    """The maximum of a float32/float64 array, through ``order_key``: one vectorized pass,
    exact (a maximum is one of the values). -inf for an empty array; a positive nan is the
    maximum, a negative one is never picked (either makes ``exp(values - max)`` nan
    somewhere, as a nan should)."""
    best = order_key(like(values, -np.inf))
    for j in range(values.size):
        key = order_key(values[j])
        best = key if key > best else best
    return from_order_key(best)


def exp_nonpositive(x):
    """e ** x for x <= 0 in the precision of ``x``: ``exp_nonpositive_f32`` for float32,
    ``exp_nonpositive_f64`` for float64 (chosen when the calling kernel is compiled)."""
    return math.exp(x)


def like(x, value):
    """``value`` converted to the type of ``x``, or to the dtype of ``x`` if it is an array
    (chosen when the calling kernel is compiled)."""
    return type(x)(value)


@overload(exp_nonpositive, inline="always")
def _exp_nonpositive(x):
    if x == types.float32:
        return lambda x: exp_nonpositive_f32(x)
    return lambda x: exp_nonpositive_f64(numba.float64(x))


@overload(like, inline="always")
def _like(x, value):
    if isinstance(x, types.Array):
        x = x.dtype
    if x == types.float32:
        return lambda x, value: numba.float32(value)
    return lambda x, value: numba.float64(value)


_SQRT2_F = _F(1.41421356)
_MANTISSA_F = (1 << 23) - 1
_TWO_F = _F(2.0)


@numba.njit(**_INLINE)
def _log1p_reduced_f32(f):
    """``_log1p_reduced`` in float32 arithmetic (terms to s**9)."""
    s = f / (_TWO_F + f)
    z = s * s
    q = _F(1.0 / 9.0)
    q = q * z + _F(1.0 / 7.0)
    q = q * z + _F(1.0 / 5.0)
    q = q * z + _F(1.0 / 3.0)
    return f - s * (f - z * _TWO_F * q)


@numba.njit(**_INLINE)
def log_f32(x):
    """Natural logarithm in float32 arithmetic, within 2 float32 ulp for normal x; edges as
    ``log`` (subnormal inputs are scaled first)."""
    tiny = x < _F(1.17549435e-38)
    y = x * _F(16777216.0) if tiny else x  # 2 ** 24
    bits = _f32_as_int32(y)
    e = ((bits >> 23) & 0xFF) - 127 - (24 if tiny else 0)
    m = _int32_as_f32(numba.int32((bits & _MANTISSA_F) | (127 << 23)))
    big = m > _SQRT2_F
    m = m * _HALF_F if big else m
    e = e + 1 if big else e
    logm = _log1p_reduced_f32(m - _ONE_F)
    fe = numba.float32(e)
    result = fe * _LN2_HI_F + (logm + fe * _LN2_LO_F)
    result = _F(-np.inf) if x == _ZERO_F else result
    result = x if x == _F(np.inf) else result
    result = _F(np.nan) if x < _ZERO_F else result
    return x if x != x else result


def log_native(x):
    """``log`` in the precision of ``x`` (see ``exp_nonpositive``)."""
    return math.log(x)


@overload(log_native, inline="always")
def _log_native(x):
    if x == types.float32:
        return lambda x: log_f32(x)
    return lambda x: log(numba.float64(x))


_LN2 = math.log(2.0)
_SQRT2_M1 = math.sqrt(2.0) - 1.0


@numba.njit(**_INLINE)
def log1p_unit(x):
    """log(1 + x) for float64 x in [0, 1] (softplus's ``log1p(exp(-|v|))``): the argument
    needs no exponent extraction, so this costs about half of ``log1p``. Within 2 ulp; nan
    propagates; outside [0, 1] it is wrong."""
    big = x > _SQRT2_M1
    f = (x - 1.0) * 0.5 if big else x  # 1 + x = 2 (1 + f) or 1 + f, f in (-0.3, 0.42]
    log_f = _log1p_reduced(f)
    return log_f + _LN2 if big else log_f


_LN2_F = _F(_LN2)
_SQRT2_M1_F = _F(_SQRT2_M1)


@numba.njit(**_INLINE)
def log1p_unit_f32(x):
    """``log1p_unit`` in float32 arithmetic."""
    big = x > _SQRT2_M1_F
    f = (x - _ONE_F) * _HALF_F if big else x
    log_f = _log1p_reduced_f32(f)
    return log_f + _LN2_F if big else log_f


def log1p_unit_native(x):
    """``log1p_unit`` in the precision of ``x`` (see ``exp_nonpositive``)."""
    return math.log1p(x)


@overload(log1p_unit_native, inline="always")
def _log1p_unit_native(x):
    if x == types.float32:
        return lambda x: log1p_unit_f32(x)
    return lambda x: log1p_unit(numba.float64(x))
