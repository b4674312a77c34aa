"""Third-party plugins: found through the entry point alone, overriding built-in kernels,
failures isolated and reported, and the plugin guide's example working as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import lossforge as lf
from lossforge import (
    KernelSpec,
    LossSpec,
    PluginError,
    PluginOverrideWarning,
    PluginWarning,
    hookimpl,
)
from lossforge.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def run(args, env_path=None, strict=False, check=True, **variables):
    env = {**os.environ, **variables}
    if env_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(env_path), env.get("PYTHONPATH", "")])
    if strict:
        env["LOSSFORGE_STRICT_PLUGINS"] = "1"
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def fake_distribution(root: Path, name: str, source: str) -> Path:
    """An installed distribution as pip leaves one: a module and a dist-info directory with
    an entry point in the "lossforge" group."""
    root.mkdir(parents=True, exist_ok=True)
    module = f"lossforge_test_{name}"
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"lossforge_test_{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: lossforge-test-{name}\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(f"[lossforge]\n{name} = {module}\n")
    return root


HEADER = """
import numpy as np
import lossforge
from lossforge import KernelSpec, LossSpec
import lossforge.plugins.regression
"""

BROKEN = {
    "importfails": "raise ImportError('missing dependency: quux')",
    "hookraises": HEADER
    + """
@lossforge.hookimpl
def lossforge_losses():
    raise RuntimeError("boom")
""",
    "duplicate": HEADER
    + """
@lossforge.hookimpl
def lossforge_losses():
    yield lossforge.plugins.regression.SPECS[0]  # mse_loss again
""",
    "notaspec": HEADER
    + """
@lossforge.hookimpl
def lossforge_losses():
    yield "mse_loss"
""",
    # SystemExit is no exception to the rule: a plugin must not end the host process
    "importexits": "import sys\nsys.exit(3)",
    "hookexits": HEADER
    + """
@lossforge.hookimpl
def lossforge_losses():
    raise SystemExit("bye")
""",
}


def line_of(name, text):
    """The line number of ``text`` in the fake plugin ``name``'s module."""
    lines = textwrap.dedent(BROKEN[name]).splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


# -- entry points, in fresh processes -------------------------------------------------------


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken-site")
    for name, source in BROKEN.items():
        fake_distribution(root, name, source)
    return root


def test_broken_plugins_only_warn(broken_site):
    code = """
import warnings, json
import numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lossforge as lf
    value = float(lf.mse_loss(np.ones(3), np.zeros(3)))
    names = lf.list_losses()
    plugin = lf.mse_loss.plugin
print(json.dumps({"value": value, "names": names, "plugin": plugin,
                  "warnings": [str(w.message) for w in caught if w.category is lf.PluginWarning]}))
"""
    out = json.loads(run(["-c", code], broken_site).stdout)
    assert out["value"] == 1.0 and out["plugin"] == "regression"
    assert "cross_entropy" in out["names"]
    text = "\n".join(out["warnings"])
    assert "plugin 'importfails' (entry point 'importfails' = 'lossforge_test_importfails'" in text
    assert "import failed: ImportError('missing dependency: quux')" in text
    assert (
        "plugin 'hookraises'" in text
        and "hook lossforge_losses raised RuntimeError('boom')" in text
    )
    assert "declares loss 'mse_loss', already declared by plugin 'regression'" in text
    assert "hook lossforge_losses yielded 'mse_loss', not a LossSpec" in text
    assert "plugin 'importexits'" in text and "import failed: SystemExit(3)" in text
    assert "hook lossforge_losses raised SystemExit('bye')" in text
    # where each exception came from: the plugin's file and line
    for name, raising in [
        ("importfails", "raise"),
        ("hookraises", "raise"),
        ("hookexits", "raise"),
    ]:
        where = f"lossforge_test_{name}.py:{line_of(name, raising)}"
        assert re.search(rf"plugin '{name}' .* at \S*{re.escape(where)}", text), (name, text)


def test_cli_lists_failures(broken_site):
    out = run(["-m", "lossforge", "plugins"], broken_site).stdout
    assert re.search(r"importfails  \[FAILED\]  entry point 'importfails'", out)
    assert "error: import failed: ImportError('missing dependency: quux')" in out
    assert "regression  [ok]" in out
    listing = run(["-m", "lossforge", "list"], broken_site).stdout
    assert "mse_loss" in listing


def test_cli_lists_failures_in_strict_mode(broken_site):
    # strict mode fails the listing, after listing every failure (not a traceback at the first)
    result = run(["-m", "lossforge", "plugins"], broken_site, strict=True, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for name in BROKEN:
        assert f"{name}  [FAILED]" in result.stdout
    assert "regression  [ok]" in result.stdout
    listing = run(["-m", "lossforge", "list"], broken_site, strict=True, check=False)
    assert listing.returncode == 1 and "Traceback" not in listing.stderr
    assert "lossforge: error: lossforge plugin 'importexits'" in listing.stderr


@pytest.mark.parametrize(
    "variables, loaded",
    [
        ({"LOSSFORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}, set()),
        (
            {"LOSSFORGE_PLUGINS_BLOCK": "importfails, hookexits,regression"},
            set(BROKEN) - {"importfails", "hookexits"},
        ),
        ({"LOSSFORGE_PLUGINS_ALLOW": "notaspec,duplicate"}, {"notaspec", "duplicate"}),
    ],
)
def test_environment_turns_third_party_plugins_off(broken_site, variables, loaded):
    result = run(["-m", "lossforge", "plugins"], broken_site, check=False, **variables)
    for name in BROKEN:
        status = "FAILED" if name in loaded else "skipped"
        assert f"{name}  [{status}]" in result.stdout, (name, result.stdout)
    for name in BROKEN.keys() - loaded:  # not imported at all: no warning about it
        assert f"plugin '{name}'" not in result.stderr
    # the built-in families always load, even when named in the block list
    assert re.search(r"regression  \[ok\]  .*\(built-in\)", result.stdout)
    assert result.returncode == 0


def test_registry_arguments_turn_plugins_off():
    registry = Registry(autoload=False)
    assert "cross_entropy" in registry.names()
    for info in registry.plugins.values():
        assert info.builtin != bool(info.skipped), info
    allowed = Registry(allow=(), block=None)
    allowed.ensure_loaded()
    assert all(info.builtin or info.skipped for info in allowed.plugins.values())


def test_strict_mode_raises(broken_site):
    result = run(
        ["-c", "import lossforge; lossforge.list_losses()"], broken_site, strict=True, check=False
    )
    assert result.returncode != 0
    # the first failure in entry-point order; SystemExit(3) became a PluginError
    assert "PluginError" in result.stderr and "importexits" in result.stderr
    # importing alone loads no plugin, so it never fails
    run(["-c", "import lossforge"], broken_site, strict=True)


@pytest.fixture(scope="module")
def focal_installed():
    """The example third-party plugin, installed with pip into this environment."""
    run(["-m", "pip", "install", "--no-deps", "-q", str(ROOT / "examples" / "lossforge-focal")])


def test_example_plugin_found_through_its_entry_point(focal_installed):
    listing = run(["-m", "lossforge", "list"]).stdout
    assert re.search(r"sigmoid_focal_loss\s+detection\s+focal\s+cpu", listing)
    plugins = run(["-m", "lossforge", "plugins"]).stdout
    assert (
        "focal  [ok]  entry point 'focal' = 'lossforge_focal' (distribution lossforge-focal 0.1.0)"
        in plugins
    )
    code = (
        "import numpy as np, lossforge as lf; "
        "v, g = lf.sigmoid_focal_loss.value_and_grad(np.array([0.5, -1.0]), np.array([1.0, 0.0])); "
        "print(v.shape, g.shape)"
    )
    assert run(["-c", code]).stdout.strip() == "(2,) (2,)"


def test_example_plugin_own_tests_pass(focal_installed):
    result = run(
        [
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",  # one file: the repository's "-n auto" would start workers to sit idle
            "0",
            str(ROOT / "examples" / "lossforge-focal" / "tests"),
        ]
    )
    assert re.search(r"\d+ passed", result.stdout)


def test_example_plugin_has_both_backends(focal_installed):
    listing = run(["-m", "lossforge", "list"]).stdout
    assert re.search(r"sigmoid_focal_loss\s+detection\s+focal\s+cpu, cuda", listing)


# -- the guide -------------------------------------------------------------------------------


def guide_blocks():
    text = (ROOT / "docs" / "plugins.md").read_text()
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)


def test_guide_example_is_short():
    python = next(body for lang, body in guide_blocks() if lang == "python")
    code = [
        line for line in python.splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    assert len(code) < 40


def test_guide_example_installs_and_passes_the_kit(tmp_path, broken_site):
    blocks = guide_blocks()
    module = next(body for lang, body in blocks if lang == "python")
    pyproject = next(body for lang, body in blocks if lang == "toml")
    package = tmp_path / "lossforge-cauchy"
    (package / "lossforge_cauchy").mkdir(parents=True)
    (package / "lossforge_cauchy" / "__init__.py").write_text(module)
    (package / "pyproject.toml").write_text(pyproject)
    site = tmp_path / "site"
    run(["-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(package)])
    path = os.pathsep.join([str(site), str(broken_site)])  # a broken plugin beside it
    listing = run(["-m", "lossforge", "list"], path).stdout
    assert re.search(r"cauchy_loss\s+regression\s+cauchy\s+cpu, cuda", listing)
    code = """
import warnings
warnings.simplefilter("ignore")
import numpy as np, lossforge as lf
from lossforge.testing import check_loss
x, y = np.array([0.5, -2.0, 3.0]), np.array([0.0, 1.0, 1.0])
value, grad = lf.cauchy_loss.value_and_grad(x, y, reduction="sum")
d = x - y
assert np.isclose(value, np.log1p(d * d).sum()) and np.allclose(grad, 2 * d / (1 + d * d))
print(check_loss("cauchy_loss"))
from numba import cuda  # the simulator (NUMBA_ENABLE_CUDASIM=1, set by the tests' conftest)
on_gpu = lf.cauchy_loss.value_and_grad(cuda.to_device(x), cuda.to_device(y), reduction="sum")
assert np.isclose(on_gpu[0], value) and np.allclose(on_gpu[1].copy_to_host(), grad)
"""
    out = run(["-c", code], path).stdout
    assert "gradient" in out and "reference" in out and "cuda" in out


# -- overriding and call-time failures, on a registry built in this process ---------------


class Override:
    """Replaces the CPU kernel of mse_loss with one that reports 42."""

    @hookimpl(tryfirst=True)
    def lossforge_kernels(self):
        yield KernelSpec("mse_loss", "cpu", lambda p, *args: 42.0)


class BadKernels:
    @hookimpl
    def lossforge_losses(self):
        import lossforge.plugins.regression

        base = lossforge.plugins.regression.SPECS[0]
        for name in ("raises_loss", "array_loss"):
            yield LossSpec(**{**base.__dict__, "name": name})

    @hookimpl
    def lossforge_kernels(self):
        def raises(p, *args):
            raise ZeroDivisionError("oops")

        yield KernelSpec("raises_loss", "cpu", raises)
        yield KernelSpec("array_loss", "cpu", lambda p, *args: np.zeros(3))
        yield KernelSpec("no_such_loss", "cpu", raises)


def registry_with(*plugins):
    import lossforge.plugins.regression

    registry = Registry(group=None, defaults=False)
    registry.register(lossforge.plugins.regression, "regression")
    for plugin in plugins:
        registry.register(plugin, type(plugin).__name__.lower())
    return registry


def test_override_replaces_a_builtin_kernel():
    registry = registry_with(Override())
    with pytest.warns(
        PluginOverrideWarning,
        match="plugin 'override' .* replaces the cpu kernel of 'mse_loss' from built-in "
        "plugin 'regression'",
    ) as caught:
        loss = registry.get("mse_loss")
    assert len(caught) == 1  # once, not per call
    loss(np.ones(3), np.zeros(3))
    assert loss(np.ones(3), np.zeros(3), reduction="sum") == 42.0
    assert loss.plugin == "regression" and loss.suppliers["cpu"] == "override"
    assert loss.suppliers["cuda"] == "regression"  # only the overridden backend changes
    assert lf.mse_loss(np.ones(3), np.zeros(3), reduction="sum") == 3.0  # the global one


@pytest.mark.filterwarnings("ignore::lossforge.PluginOverrideWarning")
def test_override_also_replaces_the_fast_path():
    # the multi-class kernels come with a fast path; a plugin replacing the kernel without
    # one gets its own kernel on every call, the fast path's case included
    import lossforge.plugins.multiclass

    class OverrideCrossEntropy:
        @hookimpl(tryfirst=True)
        def lossforge_kernels(self):
            yield KernelSpec("cross_entropy", "cpu", lambda p, *args: 42.0)

    registry = registry_with(OverrideCrossEntropy())
    registry.register(lossforge.plugins.multiclass, "multiclass")
    x, t = np.ones((4, 3)), np.zeros(4, np.int64)
    assert registry.get("cross_entropy").value_and_grad(x, t)[0] == 42.0 / 4
    assert lf.cross_entropy.value_and_grad(x, t)[0] == pytest.approx(np.log(3))


@pytest.mark.filterwarnings("ignore::lossforge.PluginOverrideWarning")
def test_unloadable_fast_path_names_the_plugin():
    class Missing:
        @hookimpl(tryfirst=True)
        def lossforge_kernels(self):
            yield KernelSpec("mse_loss", "cpu", lambda p, *args: 1.0, fast="no_such_module:f")

    registry = registry_with(Missing())
    with pytest.raises(
        PluginError, match="plugin 'missing': cannot load the fast path of 'mse_loss'"
    ):
        registry.get("mse_loss").value_and_grad(np.ones(3), np.zeros(3))


def test_kernel_failures_name_the_plugin():
    with pytest.warns(PluginWarning, match="supplies a cpu kernel for unknown loss 'no_such_loss'"):
        registry = registry_with(BadKernels())
        registry.ensure_loaded()
    x = np.ones(3)
    with pytest.raises(
        PluginError,
        match=r"'raises_loss' from plugin 'badkernels' failed: ZeroDivisionError\('oops'\)",
    ):
        registry.get("raises_loss")(x, x)
    with pytest.raises(PluginError, match="'array_loss' from plugin 'badkernels' returned ndarray"):
        registry.get("array_loss")(x, x)
    assert registry.get("mse_loss")(x, x) == 0.0


@pytest.mark.filterwarnings("ignore::lossforge.PluginOverrideWarning")
def test_unloadable_kernel_path_names_the_plugin():
    class Missing:
        @hookimpl(tryfirst=True)
        def lossforge_kernels(self):
            yield KernelSpec("mse_loss", "cpu", "no_such_module:kernel")

    registry = registry_with(Missing())
    with pytest.raises(
        PluginError, match="plugin 'missing': cannot load the cpu kernel of 'mse_loss'"
    ):
        registry.get("mse_loss")(np.ones(2), np.ones(2))


def test_misspelt_hook_is_a_failure():
    class Typo:
        @hookimpl
        def lossforge_loses(self):
            return []

    with pytest.warns(PluginWarning, match="unknown hook"):
        registry = registry_with(Typo())
        assert "mse_loss" in registry.names()
    assert registry.plugins["typo"].failed


def test_no_override_warning_without_an_override():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginOverrideWarning)
        registry_with().ensure_loaded()


def test_system_exit_in_a_hook_fails_the_plugin_alone():
    class Exits:
        @hookimpl
        def lossforge_losses(self):
            raise SystemExit("bye")

    with pytest.warns(PluginWarning, match=r"hook lossforge_losses raised SystemExit\('bye'\) at "):
        registry = registry_with(Exits())
        assert "mse_loss" in registry.names()
    assert registry.plugins["exits"].failed


def test_keyboard_interrupt_in_a_plugin_is_not_swallowed():
    class Interrupted:
        @hookimpl
        def lossforge_losses(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry_with(Interrupted()).ensure_loaded()
