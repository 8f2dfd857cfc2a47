"""Helpers shared by the command adapters, and the one rule for checking what the user typed.

Every command builds its config through :func:`config_from_args`, which checks the user's own input —
config keys, types and ranges, numeric flags, the model name, an ``--assignment`` file's syntax and choices
(and its layer names when the model comes from the config) — before the command opens a profile,
checkpoint or artifact, measures or writes anything. A mistake is therefore reported as the user's
mistake (exit 2), never as a missing file it happened to reach first.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path

import models
from dse.config import Config, load_config
from models.assignment import Assignment


def config_from_args(args: argparse.Namespace, *extra_overrides: str,
                     flags: Mapping[str, str] | None = None) -> Config:
    """The command's config with ``--set``, ``--out`` and the ``flags`` (``{argument: config key}``, applied
    when given) folded in, then every input check of the module docstring."""
    overrides = [*args.overrides, *extra_overrides]
    for attr, key in (flags or {}).items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "out", None):
        overrides.append(f"out={args.out}")
    cfg = load_config(args.config, overrides)  # keys, types and ranges (dse.config)
    check_user_input(cfg, assignment=getattr(args, "assignment", None),
                     model_from_config=not (getattr(args, "checkpoint", None) or cfg.model.checkpoint))
    return cfg


def check_user_input(cfg: Config, *, assignment: str | Path | None = None, model_from_config: bool = True) -> None:
    """The model name is known; an assignment file parses, names valid choices, and (when the model is the
    config's architecture rather than a checkpoint's) names only layers the model has."""
    models.check_name(cfg.model.name)
    if assignment is None:
        return
    plan = Assignment.from_yaml(assignment)
    if model_from_config:
        plan.validate(models.create(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.kwargs))


def out_dir(cfg: Config) -> Path:
    path = Path(cfg.out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.3f}") -> str:
    """A plain fixed-width text table (no extra dependency)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v) -> str:
        if isinstance(v, float) and math.isnan(v):
            return "—"  # unknown (e.g. an energy nothing measures), never a number
        if isinstance(v, float):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if _num(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def _num(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False
