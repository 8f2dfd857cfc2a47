"""The exception hierarchy as seen from ``dse``: the shared root plus the pipeline's own kinds.

All of these derive from :class:`kernels.errors.ShiftAddError`; the CLI prints ``error: <msg>``
and exits with the class's ``exit_code`` (2 for usage/config errors, 1 for the rest).
"""

from __future__ import annotations

from kernels.errors import (
    ConfigError,
    KernelError,
    ShiftAddError,
    TargetUnavailableError,
    UnknownNameError,
    UsageError,
)
from models.errors import AssignmentError, CheckpointError, ModelError


class DataError(UsageError):
    """A dataset is missing or malformed (wrong folder layout, no images)."""


class ProfileError(UsageError):
    """A profile file is missing, corrupt, or from another device/target/TVM version."""


class UnmeasuredCostError(ProfileError):
    """``cost.strict`` (``--strict-costs``) is set and an MoE layer's expert costs are not all measured."""


class StageError(ShiftAddError):
    """A pipeline stage failed for a reason that is not the user's input."""


__all__ = [
    "AssignmentError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "KernelError",
    "ModelError",
    "ProfileError",
    "ShiftAddError",
    "StageError",
    "TargetUnavailableError",
    "UnknownNameError",
    "UnmeasuredCostError",
    "UsageError",
]
