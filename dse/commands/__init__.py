"""Command adapters: each module registers its subcommand with ``dse.cli.command``."""

from dse.commands import pretrain, run  # noqa: F401
