"""Command adapters: one module per ``dse`` subcommand, each registering itself with
:func:`dse.commands.registry.command`.

Every module in this package is imported (so adding a command is adding a file).
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("common", "registry"):
        importlib.import_module(f"{__name__}.{_info.name}")
