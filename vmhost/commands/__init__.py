"""Subcommands of the ``vmhost`` CLI, one module per area.

Each module has ``register(sub)``, which adds its parsers to the top-level
subparsers and sets ``func`` on each; ``vmhost.cli`` calls them in order.
"""

COMMAND_MODULES = ("bench", "ksm", "guests", "hotremove", "importers", "calibrate", "density", "fleet")
