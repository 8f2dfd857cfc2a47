"""The project's one exception hierarchy.

It lives in the lowest package (``kernels``) so that ``models`` and ``dse`` can raise the same
types without breaking the dependency direction kernels <- models <- dse. The CLI maps
``exit_code`` to the process exit status and prints ``error: <message>`` on one line, so every
message must say what was wrong *and* what to do about it.
"""

from __future__ import annotations


class ShiftAddError(Exception):
    """Base of every error the tool reports to a user (exit status 1 unless overridden)."""

    exit_code = 1

    def __init__(self, message: str = "", *args: object):
        # Messages quote user input (keys, layer names, values), which may hold line breaks; the CLI prints
        # one line per error, so they are escaped here once rather than at every raise site.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"), *args)


class UsageError(ShiftAddError):
    """Bad command-line usage or configuration: the user must change their input (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file or ``--set`` override is invalid; the message names the dotted key."""


class KernelError(ShiftAddError):
    """A primitive kernel could not be defined, compiled, tuned or run."""


class UnknownNameError(UsageError):
    """A registry lookup failed; the message lists the valid names."""


class TargetUnavailableError(ShiftAddError):
    """A compilation target exists but cannot run here (e.g. CUDA without a GPU)."""
