"""Command adapters: each module here registers its subcommand with ``dse.cli.command``.

Every module in this package is imported (so adding a command is adding a file); modules must keep
heavy imports (torch, TVM, optuna) inside their run functions so ``dse --help`` stays fast.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "common":
        importlib.import_module(f"{__name__}.{_info.name}")
