"""Helpers shared by the command adapters."""

from __future__ import annotations

import argparse
from pathlib import Path

from dse.config import Config, load_config


def config_from_args(args: argparse.Namespace, *extra_overrides: str) -> Config:
    overrides = [*args.overrides, *extra_overrides]
    if getattr(args, "out", None):
        overrides.append(f"out={args.out}")
    return load_config(args.config, overrides)


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
