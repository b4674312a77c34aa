"""The exceptions and warnings of the plugin machinery, apart from both the registry and
``Loss`` so that neither imports the other for them."""

from __future__ import annotations


class PluginWarning(UserWarning):
    """A plugin was skipped, wholly or in part; the message says which and why."""


class PluginError(RuntimeError):
    """A plugin failed (raised in strict mode, and when a plugin's kernel breaks at call
    time); the message names the plugin."""
