"""The plugin registry: loads the built-in plugins (``lossforge.plugins.DEFAULT_PLUGINS``)
and then the ``"lossforge"`` entry points, once, isolates their failures, and resolves each
loss's kernels once.

A plugin that fails to import, whose hook raises, that yields something that is not a
``LossSpec``/``KernelSpec``, or that declares a loss name another plugin already declared, is
skipped (entirely, or that record alone) with a :class:`PluginWarning` naming the entry point
and the reason; the failure is listed by ``python -m lossforge plugins``. With the environment
variable ``LOSSFORGE_STRICT_PLUGINS=1`` such failures raise instead (for CI and plugin
authors).
"""

from __future__ import annotations

import difflib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from lossforge import hookspecs
from lossforge.errors import PluginError, PluginWarning
from lossforge.hookspecs import KernelSpec, LossSpec
from lossforge.loss import Loss
from lossforge.plugins import DEFAULT_PLUGINS

ENTRY_POINT_GROUP = hookspecs.PROJECT
STRICT_ENV = "LOSSFORGE_STRICT_PLUGINS"


@dataclass
class PluginInfo:
    """What ``python -m lossforge plugins`` lists about one plugin."""

    name: str
    source: str
    losses: list[str] = field(default_factory=list)
    kernels: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors)


class Registry:
    """Plugins and the losses they declare. Loading happens on first use, once."""

    def __init__(self, group: str | None = ENTRY_POINT_GROUP, defaults: bool = True):
        self._group = group
        self._defaults = defaults
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
        if ep.name in self.plugins:
            self._fail(self._info(ep.name, source), "a plugin of this name is already loaded")
            return
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not break the host
            self._fail(self._info(ep.name, source), f"import failed: {exc!r}")
            return
        self._add(ep.name, plugin, source)

    def _load_default(self, name: str, module: str) -> None:
        try:
            plugin = importlib.import_module(module)
        except Exception as exc:  # a broken family must not break the others
            self._fail(self._info(name, f"built-in {module!r}"), f"import failed: {exc!r}")
            return
        self._add(name, plugin, f"built-in {module!r}")

    def _info(self, name: str, source: str) -> PluginInfo:
        info = self.plugins.get(name) or PluginInfo(name, source)
        self.plugins.setdefault(name, info)
        return info

    def _add(self, name: str, plugin: Any, source: str) -> None:
        info = self._info(name, source)
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self._fail(info, f"registration failed: {exc!r}")

    def _fail(self, info: PluginInfo, reason: str) -> None:
        info.errors.append(reason)
        message = f"lossforge plugin {info.name!r} ({info.source}): {reason}"
        if os.environ.get(STRICT_ENV, "") not in ("", "0"):
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
            try:
                produced = list(impl.function() or ())
            except Exception as exc:
                self._fail(info, f"hook {hook_name} raised {exc!r}")
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
