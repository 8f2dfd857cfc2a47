"""The registry of ``dse`` subcommands: each module of :mod:`dse.commands` registers its command here with
:func:`command`, and :mod:`dse.cli` builds one subparser per entry of :data:`COMMANDS`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]  # returns a result (dict) or None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``fn(args) -> result`` as subcommand ``name``."""
    def wrap(fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
        COMMANDS[name] = Command(name, help, add_arguments or (lambda p: None), fn)
        return fn

    return wrap


__all__ = ["COMMANDS", "Command", "command"]
