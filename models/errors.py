"""Model-level errors; part of the hierarchy rooted at ``kernels.errors.ShiftAddError``."""

from __future__ import annotations

from kernels.errors import ShiftAddError, UsageError


class ModelError(ShiftAddError):
    """A model could not be built, loaded or reparameterised."""


class AssignmentError(UsageError):
    """An assignment names a layer or a choice that does not exist; the message lists valid ones."""


class CheckpointError(UsageError):
    """A checkpoint is missing, unreadable or belongs to another architecture."""
