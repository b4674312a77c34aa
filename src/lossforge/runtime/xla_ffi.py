"""A Python function as an XLA FFI handler on the CPU: what ``lossforge.jax`` calls the kernels
through, instead of ``jax.pure_callback``.

``jax.pure_callback`` copies every result the callback returns into XLA's buffer (and runs
through JAX's callback machinery: about 10 ms a call at 10^6 elements on a loaded 2-core
machine). Through the typed FFI (``jax.ffi.ffi_call``) XLA hands the handler its own input and
output buffers: the kernels read the inputs in place and write the gradients straight into
the outputs, as ``out=``. The handler is a ``ctypes`` callback (no C compiler, no extension
module) that reads XLA's call frame, a stable C ABI (``xla/ffi/api/c_api.h``: JAX ships the
header); the structures below are that header's, trimmed to the fields read.

An exception in the function becomes an XLA error carrying its type and message (JAX raises
it as ``JaxRuntimeError``); nothing is lost silently, as a bare ``ctypes`` callback would.
"""

from __future__ import annotations

import ctypes as C
import itertools
import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np


class _Extension(C.Structure):
    pass


_Extension._fields_ = [
    ("struct_size", C.c_size_t),
    ("type", C.c_int),
    ("next", C.POINTER(_Extension)),
]


class _Version(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", C.c_void_p),
        ("major", C.c_int),
        ("minor", C.c_int),
    ]


class _Metadata(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("api_version", _Version),
        ("traits", C.c_uint32),
        ("state_type_id", C.c_int64),
    ]


class _MetadataExtension(C.Structure):
    _fields_ = [("base", _Extension), ("metadata", C.POINTER(_Metadata))]


class _Buffer(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", C.c_void_p),
        ("dtype", C.c_int),
        ("data", C.c_void_p),
        ("rank", C.c_int64),
        ("dims", C.POINTER(C.c_int64)),
    ]


class _Buffers(C.Structure):  # XLA_FFI_Args and XLA_FFI_Rets have the same layout
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", C.c_void_p),
        ("size", C.c_int64),
        ("types", C.POINTER(C.c_int)),
        ("buffers", C.POINTER(C.POINTER(_Buffer))),
    ]


class _ErrorArgs(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", C.c_void_p),
        ("message", C.c_char_p),
        ("errc", C.c_int),
    ]


class _Api(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", C.c_void_p),
        ("api_version", _Version),
        ("internal_api", C.c_void_p),
        ("error_create", C.CFUNCTYPE(C.c_void_p, C.POINTER(_ErrorArgs))),
    ]


class _CallFrame(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("extension_start", C.POINTER(_Extension)),
        ("api", C.POINTER(_Api)),
        ("ctx", C.c_void_p),
        ("stage", C.c_int),
        ("args", _Buffers),
        ("rets", _Buffers),
    ]


_HANDLER = C.CFUNCTYPE(C.c_void_p, C.POINTER(_CallFrame))
_METADATA = 1  # XLA_FFI_Extension_Metadata
_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_API_VERSION = (0, 3)  # XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR of the header this follows
_INVALID_ARGUMENT, _INTERNAL = 3, 13
_DTYPES = {  # XLA_FFI_DataType: np.dtype (looked up for every buffer of every call)
    1: np.dtype(np.bool_),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.uint8),
    7: np.dtype(np.uint16),
    8: np.dtype(np.uint32),
    9: np.dtype(np.uint64),
    10: np.dtype(np.float16),
    11: np.dtype(np.float32),
    12: np.dtype(np.float64),
}
_handlers: list[Any] = []  # XLA keeps the function pointers for the process's life
_names = itertools.count()


def _huge_pages(address: int, size: int) -> None:
    """Ask for transparent huge pages over a large output buffer, as NumPy does for its own
    arrays: XLA's fresh buffer is otherwise faulted in 4 KiB at a time by the kernel's first
    write (a 40 MB gradient: ~10^4 page faults, as long as the kernel itself)."""
    page = 4096
    start = -(-address // page) * page
    length = (address + size - start) // page * page
    if _madvise is not None and length > 0:
        _madvise(C.c_void_p(start), C.c_size_t(length), _MADV_HUGEPAGE)


def _libc_madvise() -> Any:
    try:
        madvise = C.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not a POSIX libc: no advice
        return None
    madvise.argtypes = (C.c_void_p, C.c_size_t, C.c_int)
    madvise.restype = C.c_int
    return madvise


_madvise = _libc_madvise() if sys.platform.startswith("linux") else None
_MADV_HUGEPAGE = 14
_HUGE = 4 << 20  # NumPy's threshold for the same advice


def _array(pointer: Any, writeable: bool) -> np.ndarray:
    """XLA's buffer as a NumPy array, without a copy (read-only for an input). Called for every
    buffer of every call: the fewest ``ctypes`` reads and one ``np.ndarray`` constructor
    (``np.frombuffer``, ``reshape`` and ``np.prod`` took ~5 us a buffer, ~1 us now)."""
    b = pointer.contents
    dtype = _DTYPES[b.dtype]
    shape = tuple(b.dims[: b.rank])
    size = math.prod(shape) * dtype.itemsize
    if size == 0:
        array = np.empty(shape, dtype)
    else:
        if writeable and size >= _HUGE:
            _huge_pages(b.data, size)
        array = np.ndarray(shape, dtype, (C.c_char * size).from_address(b.data))
    array.flags.writeable = writeable
    return array


def _call(function: Callable[[list[np.ndarray], list[np.ndarray]], None], frame_p: Any) -> Any:
    frame = frame_p.contents
    if frame.extension_start and frame.extension_start.contents.type == _METADATA:
        # XLA asks which FFI version the handler speaks, when it registers it
        extension = C.cast(frame.extension_start, C.POINTER(_MetadataExtension)).contents
        metadata = extension.metadata.contents
        metadata.api_version.major, metadata.api_version.minor = _API_VERSION
        metadata.traits = 0
        return None
    if frame.stage != _EXECUTE:
        return None
    try:
        args = [_array(b, False) for b in frame.args.buffers[: frame.args.size]]
        rets = [_array(b, True) for b in frame.rets.buffers[: frame.rets.size]]
        function(args, rets)
        return None
    except BaseException as exc:  # every error goes back to XLA, never lost in ctypes
        bad_input = isinstance(exc, (ValueError, TypeError, LookupError))
        code = _INVALID_ARGUMENT if bad_input else _INTERNAL
        message = f"{type(exc).__name__}: {exc}".encode()
        error = _ErrorArgs(C.sizeof(_ErrorArgs), None, message, code)
        return frame.api.contents.error_create(C.byref(error))


def register(function: Callable[[list[np.ndarray], list[np.ndarray]], None], stem: str) -> str:
    """Register ``function(args, rets)`` (NumPy views of XLA's input buffers, read-only, and of
    its output buffers, which it fills) as a CPU FFI target; returns the target's name for
    ``jax.ffi.ffi_call``."""
    import jax

    handler = _HANDLER(lambda frame_p: _call(function, frame_p))
    _handlers.append(handler)
    name = f"lossforge_{stem}_{next(_names)}"
    address = C.cast(handler, C.c_void_p).value
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(address), platform="cpu")
    return name
