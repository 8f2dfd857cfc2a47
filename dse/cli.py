"""The ``dse`` command line: the subcommands of :mod:`dse.commands.registry`, sharing one set of common options.

Only this module (and the command adapters in ``dse.commands``) print. Errors from the project's
hierarchy become one line ``error: <message>`` and the class's exit status (2 usage/config, 1 other);
``--debug`` re-raises them with the full traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any

from dse.commands.registry import COMMANDS
from dse.errors import ShiftAddError, UsageError
from dse.hardware.threads import use_all_cores


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as the README's exit statuses say
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE.yaml", help="configuration file (default: built-in)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.batch_size=32 (repeatable)")
    common.add_argument("--out", metavar="DIR", help="output folder (default: config 'out')")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    common.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    return common


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: the command modules import every stage (torch, TVM, optuna), which
    # only a parser needs; importing dse.cli for its helpers stays cheap.
    from dse import commands  # noqa: F401  (registers every subcommand)

    parser = _Parser(prog="dse", description="ShiftAddDSE: measure, search, fine-tune and export "
                     "multiplication-reduced ViTs for your hardware.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _common()
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, parents=[common])
        cmd.add_arguments(p)
    return parser


def _json_safe(value: Any) -> Any:
    """NaN (an unknown figure) as JSON null: ``json.dumps`` would write the non-standard token ``NaN``."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _print(result: Any, as_json: bool) -> None:
    if result is None:
        return
    if as_json:
        print(json.dumps(_json_safe(result.get("json", result) if isinstance(result, dict) else result), indent=2,
                         default=str))
    elif isinstance(result, dict) and "text" in result:
        print(result["text"])
    else:
        print(json.dumps(result, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(2, args.verbose)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # One TVM thread-pool size for every command, so the profiler prices kernels with the threads the
    # exported model runs on (TVM's own default is half the cores); TVM_NUM_THREADS still wins.
    use_all_cores()
    try:
        result = COMMANDS[args.command].run(args)
    except ShiftAddError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; completed work is saved, rerun the same command to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure is still one line unless --debug
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    _print(result, args.json)
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


__all__ = ["UsageError", "build_parser", "main"]
