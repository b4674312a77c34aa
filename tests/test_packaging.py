"""The wheel: one import name, and an installed lossforge that writes nothing beside its
sources (its kernels are cached in a per-user directory), so that ``pip uninstall`` leaves
nothing behind and a read-only install works."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CALL = """
import numpy as np, lossforge
x = np.linspace(-1, 1, 100)
value, grad = lossforge.mse_loss.value_and_grad(x, np.zeros_like(x))
assert abs(value - np.mean(x * x)) < 1e-12, value
print(lossforge.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
    )
    (found,) = out.glob("lossforge-*.whl")
    return found


def test_wheel_holds_only_lossforge(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"lossforge", wheel.name.split("-py")[0] + ".dist-info"}, tops
    for module in ("kernels.py", "runtime/cache.py", "py.typed", "plugins/__init__.py"):
        assert f"lossforge/{module}" in names
    for family in ("regression", "binary", "multiclass", "similarity"):
        assert f"lossforge/plugins/{family}/__init__.py" in names
    assert {"lossforge/plugins/multiclass/cpu.py", "lossforge/plugins/multiclass/cuda.py"} <= set(
        names
    )
    assert not [n for n in names if "focal" in n or "/tests/" in n or "examples" in n]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _run_installed(target: Path, env_extra: dict[str, str]) -> str:
    """CALL in a Python that sees the installed tree and the test environment's packages, but
    not the editable install of the checkout (``-S``: no .pth files, hence no editable
    finder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "LOSSFORGE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    env.update(env_extra)
    result = subprocess.run(
        [sys.executable, "-S", "-c", CALL], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_installed_wheel_writes_nothing_beside_its_sources(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
        check=True,
        timeout=600,
    )
    before = _files(target)
    cache = tmp_path / "cache"
    where = _run_installed(target, {"XDG_CACHE_HOME": str(cache), "PYTHONDONTWRITEBYTECODE": "1"})
    assert where.strip() == str(target / "lossforge" / "__init__.py")  # not the checkout
    # pip uninstall removes exactly the files it installed: nothing may be added to them
    assert _files(target) == before
    version = __import__("lossforge").__version__
    cached = list((cache / "lossforge" / version).rglob("*.nbi"))
    assert cached, "no kernel was cached in the per-user directory"
    # a second process loads them: no new index
    _run_installed(target, {"XDG_CACHE_HOME": str(cache), "PYTHONDONTWRITEBYTECODE": "1"})
    assert sorted((cache / "lossforge" / version).rglob("*.nbi")) == sorted(cached)

    # NUMBA_CACHE_DIR, Numba's own setting, takes precedence for lossforge's kernels too
    numba_dir = tmp_path / "numba-cache"
    other = tmp_path / "unused"
    _run_installed(
        target,
        {
            "NUMBA_CACHE_DIR": str(numba_dir),
            "XDG_CACHE_HOME": str(other),
            "PYTHONDONTWRITEBYTECODE": "1",
        },
    )
    assert list(numba_dir.rglob("*.nbi"))
    assert not list(other.rglob("*.nbi"))
    assert _files(target) == before
