"""The exceptions and warnings of the plugin machinery, apart from both the registry and
``Loss`` so that neither imports the other for them."""

from __future__ import annotations


class PluginWarning(UserWarning):
    """A plugin was skipped, wholly or in part; the message says which and why."""


class PluginOverrideWarning(PluginWarning):
    """An installed plugin replaces a built-in kernel (allowed: said once, on loading, so that
    results that changed with an install are traceable). Not a failure: strict mode leaves
    it a warning."""


class PluginError(RuntimeError):
    """A plugin failed (raised in strict mode, and when a plugin's kernel breaks at call
    time); the message names the plugin."""
