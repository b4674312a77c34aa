"""Where lossforge's compiled kernels are cached on disk.

Numba's default (``cache=True``) writes ``*.nbi``/``*.nbc`` files into the ``__pycache__``
beside each source file: inside site-packages. ``pip uninstall`` then leaves those folders
behind, and a leftover ``site-packages/lossforge`` without ``__init__.py`` becomes a namespace
package that shadows a later ``pip install -e .``. So lossforge's own kernels (functions of
the ``lossforge`` package, the built-in families included) are cached in a per-user
directory instead, keyed by lossforge's version and the source folder:

- ``$NUMBA_CACHE_DIR`` when set (Numba's own locator then applies, as for any Numba code);
- else ``$LOSSFORGE_CACHE_DIR`` when set;
- else ``$XDG_CACHE_HOME/lossforge`` or ``~/.cache/lossforge`` (``~/Library/Caches/lossforge``
  on macOS, ``%LOCALAPPDATA%\\lossforge`` on Windows).

Numba checks each entry against its source file's contents, so an edited file recompiles.
A directory that cannot be written falls through to Numba's own locators. Third-party
plugins keep Numba's default for their kernels. ``python -m lossforge warmup`` fills it.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any


def cache_root() -> str:
    """The per-user folder of lossforge's kernel caches (all versions)."""
    explicit = os.environ.get("LOSSFORGE_CACHE_DIR")
    if explicit:
        return explicit
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "lossforge")


def cache_dir() -> str:
    """This version's folder: a new version never loads an older one's kernels."""
    from lossforge import __version__

    return os.path.join(cache_root(), __version__)


def _ours(py_func: Any) -> bool:
    module = getattr(py_func, "__module__", None) or ""
    return module == "lossforge" or module.startswith("lossforge.")


def install(caching: ModuleType) -> None:
    """Put lossforge's locator first in a Numba caching module (``numba.core.caching``, or
    numba-cuda's ``numba.cuda.core.caching``); the names differ across Numba versions."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    base = getattr(caching, "UserProvidedCacheLocator", None) or (caching._UserProvidedCacheLocator)
    if any(getattr(c, "_lossforge", False) for c in impl._locator_classes):
        return

    class LossforgeCacheLocator(base):  # type: ignore[misc, valid-type]
        _lossforge = True

        def __init__(self, py_func: Any, py_file: str):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = os.path.join(cache_dir(), self.get_suitable_cache_subpath(py_file))

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if caching.config.CACHE_DIR or not _ours(py_func):
                return None  # NUMBA_CACHE_DIR, or not lossforge's: Numba's own locators
            # the grandparent's: existence of the file, a writable folder, or None
            return super(base, cls).from_function(py_func, py_file)

    impl._locator_classes.insert(0, LossforgeCacheLocator)
