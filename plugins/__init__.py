"""The built-in loss families, installed as ``lossforge.plugins.<family>``.

Each family is an ordinary plugin module (``@hookimpl`` functions yielding ``LossSpec`` and
``KernelSpec`` records), registered by the registry before any entry point through the same
hooks a third-party plugin uses (pytest's ``default_plugins``, datasette's
``DEFAULT_PLUGINS``): a third party gets nothing the built-ins don't. In the repository they
live in the top-level ``plugins/`` folder, mapped into the package by ``pyproject.toml``.
"""

#: The built-in plugins: (plugin name, module), loaded in this order on first registry use.
DEFAULT_PLUGINS = (
    ("regression", "lossforge.plugins.regression"),
    ("binary", "lossforge.plugins.binary"),
    ("multiclass", "lossforge.plugins.multiclass"),
    ("similarity", "lossforge.plugins.similarity"),
    ("margin", "lossforge.plugins.margin"),
    ("sequence", "lossforge.plugins.sequence"),
)
