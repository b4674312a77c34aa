"""The plugin registry: loads the built-in plugins (``lossforge.plugins.DEFAULT_PLUGINS``)
and then the ``"lossforge"`` entry points, once, isolates their failures, and resolves each
loss's kernels once.

A plugin that fails to import, whose hook raises, that yields something that is not a
``LossSpec``/``KernelSpec``, or that declares a loss name another plugin already declared, is
skipped (entirely, or that record alone) with a :class:`PluginWarning` naming the entry point
and the reason (and, for an exception, the file and line in the plugin where it came from); the
failure is listed by ``python -m lossforge plugins``. With the environment variable
``LOSSFORGE_STRICT_PLUGINS=1`` such failures raise instead (for CI and plugin authors).
A plugin that raises ``SystemExit`` (anything but ``KeyboardInterrupt``) fails the same way:
a plugin never ends the host process.

Turning plugins off, as pytest users know it (names are entry-point names; all three apply
to third-party plugins only, since the built-in families are the core losses):
``LOSSFORGE_DISABLE_PLUGIN_AUTOLOAD=1`` loads no third-party entry point,
``LOSSFORGE_PLUGINS_BLOCK=a,b`` skips those, ``LOSSFORGE_PLUGINS_ALLOW=a,b`` loads only those.
``Registry(autoload=, block=, allow=, strict=)`` take precedence over the environment.
An installed plugin that replaces a built-in kernel gets a :class:`PluginOverrideWarning`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import threading
import traceback
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from lossforge import hookspecs
from lossforge.errors import PluginError, PluginOverrideWarning, PluginWarning
from lossforge.hookspecs import KernelSpec, LossSpec
from lossforge.loss import Loss
from lossforge.plugins import DEFAULT_PLUGINS

ENTRY_POINT_GROUP = hookspecs.PROJECT
STRICT_ENV = "LOSSFORGE_STRICT_PLUGINS"
DISABLE_AUTOLOAD_ENV = "LOSSFORGE_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "LOSSFORGE_PLUGINS_BLOCK"
ALLOW_ENV = "LOSSFORGE_PLUGINS_ALLOW"


@dataclass
class PluginInfo:
    """What ``python -m lossforge plugins`` lists about one plugin."""

    name: str
    source: str
    losses: list[str] = field(default_factory=list)
    kernels: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    builtin: bool = False
    skipped: str = ""  # why the plugin was not loaded (block, allow, autoload off)

    @property
    def failed(self) -> bool:
        return bool(self.errors)


def is_builtin(name: str, module: str | None) -> bool:
    """Whether plugin ``name``, the module ``module``, is one of lossforge's own (a default
    plugin): the one place that decides, for the override warning and the plugin controls."""
    return (name, module) in DEFAULT_PLUGINS


def _env_names(variable: str) -> frozenset[str] | None:
    """The comma-separated names in an environment variable; None when unset or empty."""
    names = frozenset(n.strip() for n in os.environ.get(variable, "").split(",") if n.strip())
    return names or None


def _env_flag(variable: str) -> bool:
    return os.environ.get(variable, "") not in ("", "0")


def _plugin_files(module: str) -> str | None:
    """The file or package directory of ``module``'s top-level package (found without
    importing it): a failure's traceback frames under it are the plugin's own."""
    with contextlib.suppress(Exception):
        spec = importlib.util.find_spec(module.partition(".")[0])
        if spec is not None and spec.submodule_search_locations:
            return os.path.join(next(iter(spec.submodule_search_locations)), "")
        if spec is not None:
            return spec.origin
    return None


def _raised_at(exc: BaseException, module: str | None) -> str:
    """`` at FILE:LINE``: the last traceback frame in the plugin's files (a plugin calling a
    helper that raises is the plugin's line), else the frame that raised."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename[:1] != "<"]
    root = module and _plugin_files(module)
    own = [f for f in frames if root and f.filename.startswith(root)]
    found = own or frames
    return f" at {found[-1].filename}:{found[-1].lineno}" if found else ""


class Registry:
    """Plugins and the losses they declare. Loading happens on first use, once.

    ``autoload``, ``block``, ``allow`` (entry-point names) and ``strict``: ``None`` reads the
    environment variable (see the module docstring) when the registry loads. ``defaults``:
    register the built-in families (``lossforge.plugins.DEFAULT_PLUGINS``)."""

    def __init__(
        self,
        group: str | None = ENTRY_POINT_GROUP,
        *,
        autoload: bool | None = None,
        block: Collection[str] | None = None,
        allow: Collection[str] | None = None,
        strict: bool | None = None,
        defaults: bool = True,
    ):
        self._group = group
        self._defaults = defaults
        self.autoload = autoload
        self.block = block
        self.allow = allow
        self.strict = strict
        self._lock = threading.RLock()
        self._loaded = False
        self._extra: list[tuple[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.specs: dict[str, LossSpec] = {}
        self.owners: dict[str, str] = {}
        self.kernels: dict[tuple[str, str], tuple[KernelSpec, str]] = {}
        self.losses: dict[str, Any] = {}

    # -- loading -------------------------------------------------------------------------
    def register(self, plugin: Any, name: str) -> None:
        """Register a plugin object (a module or any object with hookimpls) by hand, in
        addition to the entry points; the registry resolves again on next use."""
        with self._lock:
            self._extra.append((name, plugin))
            self._loaded = False

    def unregister(self, name: str) -> None:
        with self._lock:
            self._extra = [(n, p) for n, p in self._extra if n != name]
            self._loaded = False

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._reset()
            if self._group is not None:
                for ep in sorted(entry_points(group=self._group), key=lambda e: e.name):
                    self._load_entry_point(ep)
            for name, plugin in self._extra:
                self._add(name, plugin, source=f"registered {plugin!r}")
            # pluggy calls the plugin registered last first: the built-ins, registered last,
            # win a loss name or a kernel over any other plugin that does not use tryfirst
            if self._defaults:
                for name, module in DEFAULT_PLUGINS:
                    self._load_default(name, module)
            self._collect()
            self._loaded = True

    def _load_entry_point(self, ep: Any) -> None:
        source = f"entry point {ep.name!r} = {ep.value!r}"
        if ep.dist is not None:
            source += f" (distribution {ep.dist.name} {ep.dist.version})"
        if ep.name in self.plugins or any(ep.name == name for name, _ in DEFAULT_PLUGINS):
            self._fail(
                self._info(f"{ep.name} ({ep.value})", source),
                "a plugin of this name is already loaded, or it is a built-in plugin's name",
            )
            return
        skipped = self._skip_reason(ep.name)
        if skipped:
            self._info(ep.name, source).skipped = skipped
            return
        info, plugin = self._info(ep.name, source), None
        with self._isolated(info, "import failed:", ep.module):
            plugin = ep.load()
        if not info.failed:
            self._add(ep.name, plugin, source)

    def _skip_reason(self, name: str) -> str:
        """Why third-party entry point ``name`` is not to be loaded; empty if it is."""
        autoload = not _env_flag(DISABLE_AUTOLOAD_ENV) if self.autoload is None else self.autoload
        block = _env_names(BLOCK_ENV) if self.block is None else self.block
        allow = _env_names(ALLOW_ENV) if self.allow is None else self.allow
        if not autoload:
            return f"autoloading of third-party plugins is off ({DISABLE_AUTOLOAD_ENV})"
        if block and name in block:
            return f"blocked ({BLOCK_ENV})"
        if allow is not None and name not in allow:
            return f"not in the allow list ({ALLOW_ENV})"
        return ""

    @contextlib.contextmanager
    def _isolated(self, info: PluginInfo, what: str, module: str | None) -> Iterator[None]:
        """Run plugin code: what it raises fails the plugin, ``SystemExit`` included (a
        plugin must not end the host); an interrupt, or a generator being closed, goes on."""
        try:
            yield
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:
            self._fail(info, f"{what} {exc!r}{_raised_at(exc, module)}")

    def _load_default(self, name: str, module: str) -> None:
        info, plugin = self._info(name, f"module {module!r}"), None
        with self._isolated(info, "import failed:", module):
            plugin = importlib.import_module(module)
        if not info.failed:
            self._add(name, plugin, info.source)

    def _info(self, name: str, source: str) -> PluginInfo:
        info = self.plugins.get(name) or PluginInfo(name, source)
        self.plugins.setdefault(name, info)
        return info

    def _add(self, name: str, plugin: Any, source: str) -> None:
        info = self._info(name, source)
        info.builtin = is_builtin(name, getattr(plugin, "__name__", None))
        with self._isolated(info, "registration failed:", None):
            self.pm.register(plugin, name=name)

    def is_strict(self) -> bool:
        return _env_flag(STRICT_ENV) if self.strict is None else self.strict

    def _fail(self, info: PluginInfo, reason: str) -> None:
        info.errors.append(reason)
        message = f"lossforge plugin {info.name!r} ({info.source}): {reason}"
        if self.is_strict():
            raise PluginError(message)
        warnings.warn(message, PluginWarning, stacklevel=4)

    def _results(self, hook_name: str, kind: type) -> list[tuple[str, Any]]:
        """Each plugin's records for a hook, in pluggy's call order (``tryfirst`` first),
        calling plugins one by one so that one that raises is skipped alone."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
            self._fail(self._info(name, "?"), f"unknown hook: {exc}")
            self.pm.unregister(exc.plugin)
            return self._results(hook_name, kind)
        records = []
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            info = self._info(impl.plugin_name, "?")
            if info.failed:
                continue
            produced = []
            with self._isolated(info, f"hook {hook_name} raised", impl.function.__module__):
                produced = list(impl.function() or ())
            if info.failed:
                continue
            for record in produced:
                if isinstance(record, kind):
                    records.append((impl.plugin_name, record))
                else:
                    self._fail(info, f"hook {hook_name} yielded {record!r}, not a {kind.__name__}")
        return records

    def _collect(self) -> None:
        for plugin, spec in self._results("lossforge_losses", LossSpec):
            owner = self.owners.get(spec.name)
            if owner is not None:
                self._fail(
                    self.plugins[plugin],
                    f"declares loss {spec.name!r}, already declared by plugin {owner!r}; "
                    "this declaration is skipped",
                )
                continue
            self.specs[spec.name] = spec
            self.owners[spec.name] = plugin
            self.plugins[plugin].losses.append(spec.name)
        for plugin, kernel in self._results("lossforge_kernels", KernelSpec):
            if self.plugins[plugin].failed:
                continue
            key = (kernel.loss, kernel.backend)
            if kernel.loss not in self.specs:
                self._fail(
                    self.plugins[plugin],
                    f"supplies a {kernel.backend} kernel for unknown loss {kernel.loss!r}",
                )
            elif key not in self.kernels:  # the first in call order wins
                self.kernels[key] = (kernel, plugin)
                self.plugins[plugin].kernels.append(key)
            elif self.plugins[plugin].builtin and not self.plugins[self.kernels[key][1]].builtin:
                winner = self.plugins[self.kernels[key][1]]
                warnings.warn(
                    f"lossforge plugin {winner.name!r} ({winner.source}) replaces the "
                    f"{kernel.backend} kernel of {kernel.loss!r} from built-in plugin {plugin!r}",
                    PluginOverrideWarning,
                    stacklevel=4,
                )

    # -- lookups -------------------------------------------------------------------------
    def names(self) -> list[str]:
        self.ensure_loaded()
        return sorted(self.specs)

    def get(self, name: str) -> Loss:
        loss = self.losses.get(name)
        if loss is not None and self._loaded:
            return loss
        self.ensure_loaded()
        with self._lock:
            loss = self.losses.get(name)
            if loss is None:
                spec = self.specs.get(name)
                if spec is None:
                    close = difflib.get_close_matches(name, self.specs, n=3, cutoff=0.5)
                    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                    raise KeyError(f"no loss named {name!r}{hint} (see lossforge.list_losses())")
                loss = self.losses[name] = Loss(spec, self.owners[name], self)
            return loss

    def backends(self, name: str) -> dict[str, str]:
        """backend -> the plugin that supplies that kernel of loss ``name``."""
        self.ensure_loaded()
        return {b: p for (n, b), (_, p) in self.kernels.items() if n == name}

    def kernel(self, name: str, backend: str) -> tuple[Any, str]:
        """The kernel callable for (loss, backend) and the plugin that supplies it."""
        self.ensure_loaded()
        found = self.kernels.get((name, backend))
        if found is None:
            have = sorted(self.backends(name))
            raise NotImplementedError(
                f"loss {name!r} has no {backend} kernel (its plugin {self.owners[name]!r} "
                f"supplies: {', '.join(have) or 'none'})"
            )
        spec, plugin = found
        return self._load(spec.function, spec, plugin, f"the {backend} kernel"), plugin

    def hessian_kernel(self, name: str, backend: str) -> tuple[Any, str]:
        """The ``hessian`` kernel that comes with the (loss, backend) kernel, and its plugin."""
        self.kernel(name, backend)  # the same error when there is no kernel at all
        spec, plugin = self.kernels[(name, backend)]
        if spec.hessian is None:
            raise NotImplementedError(
                f"loss {name!r} has no Hessian on {backend} (its {backend} kernel, from plugin "
                f"{plugin!r}, supplies none)"
            )
        return self._load(spec.hessian, spec, plugin, f"the {backend} Hessian kernel"), plugin

    def fast_path(self, name: str) -> Any:
        """The ``fast`` callable that comes with the CPU kernel of loss ``name``, or None."""
        self.ensure_loaded()
        found = self.kernels.get((name, "cpu"))
        if found is None or found[0].fast is None:
            return None
        spec, plugin = found
        return self._load(spec.fast, spec, plugin, "the fast path")

    @staticmethod
    def _load(function: Any, spec: KernelSpec, plugin: str, what: str) -> Any:
        if not isinstance(function, str):
            return function
        try:
            module, _, attr = function.partition(":")
            return getattr(importlib.import_module(module), attr)
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin!r}: cannot load {what} of {spec.loss!r} from {function!r}: {exc!r}"
            ) from exc


registry = Registry()
