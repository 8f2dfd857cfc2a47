"""The profile store: ``<root>/<device-slug>/<target-slug>.csv`` plus a ``.yaml`` header beside it.

One CSV holds every measured row for one device and target, whatever model asked for it; a row is
keyed by ``(primitive, backend, batch, m, k, n, dtype)``. The YAML says what the rows were measured
on (device, target JSON, versions, dates, which models were profiled into it), so that a profile from
another device, target or TVM/PyTorch version is refused rather than silently extended or used.

Crash and concurrency safety: every write replaces the file atomically (:mod:`dse.fileio`), under an
exclusive lock on ``<csv>.lock`` held around read-merge-write, one row at a time, so a killed run
loses at most the row it was measuring and two processes extending the same profile keep every row
exactly once. A complete file always ends with a newline; one that does not was cut short.

Columns (``COLUMNS``; those marked required must be present on read):

=================  ====================================================================================
primitive          kernel primitive (matmul, matshift, ...), non-primitive op (layernorm, ...) or ``framework``
                   (eager PyTorch's own time per forward, dse.profiling.eager)
backend            ``tvm`` (compiled for the target) or ``torch`` (PyTorch eager, the dense baseline)
batch, m, k, n     the kernel's problem size; ``batch`` is the kernel's b (see dse.profiling.inventory)
dtype              the kernel's dtype (matshift: int32)
latency_ms         median over ``repeats`` repeats, each the mean of back-to-back calls lasting at
latency_ms_p90     least ``min_repeat_ms`` (TVM ``time_evaluator``; the same loop for PyTorch); for a row
                   measured in several passes (``dse profile --passes``) the median of the passes'
                   medians, and the largest of their p90s
passes             how many passes measured the row (empty: one)
pass_latencies_ms  each pass's median, ``;``-separated, oldest first (empty: one pass)
energy_mj          energy per call from ``energy_source`` (nvml | rapl measured, model = analytical);
                   over several passes (all from one source) their mean; empty when nothing measures or
                   models it (a ``framework`` row: interpreter time, which the analytical model cannot price)
idle_power_w       idle power measured once per session by a meter (empty for the model)
target             the target slug (the full JSON is in the .yaml)
schedule           default | tuned (TVM kernels), eager (PyTorch)
tuned_trials       MetaSchedule trials behind the kernel's tuning record (0: never tuned)
load_1m            1-minute load average when the row was measured (noise indicator)
measured_at        ISO-8601 UTC time of the measurement
=================  ====================================================================================
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dse.errors import ProfileError
from dse.fileio import atomic_write_text, file_lock
from dse.profiling.eager import FRAMEWORK

log = logging.getLogger(__name__)

FORMAT = 1
BACKENDS = ("tvm", "torch")
ENERGY_SOURCES = ("nvml", "rapl", "model")
SCHEDULES = ("default", "tuned", "eager")
KEY = ("primitive", "backend", "batch", "m", "k", "n", "dtype")

# name -> (type, required on read)
COLUMNS: dict[str, tuple[str, bool]] = {
    "primitive": ("name", True),
    "backend": ("backend", True),
    "batch": ("size", True),
    "m": ("size", True),
    "k": ("size", True),
    "n": ("size", True),
    "dtype": ("name", True),
    "latency_ms": ("latency", True),
    "latency_ms_p90": ("latency", True),
    "repeats": ("size", True),
    "min_repeat_ms": ("opt_nonneg", False),
    "energy_mj": ("opt_nonneg", True),  # empty: unknown, never a made-up 0
    "energy_source": ("energy_source", True),  # empty exactly when energy_mj is
    "idle_power_w": ("opt_nonneg", True),
    "target": ("name", True),
    "schedule": ("schedule", True),
    "tuned_trials": ("count", True),
    "load_1m": ("opt_nonneg", False),
    "measured_at": ("name", True),
    "passes": ("opt_count", False),
    "pass_latencies_ms": ("opt_latencies", False),
}
# What must agree between an existing profile and this run for rows to be mixed: (section, field, label).
_IDENTITY = (
    ("device", "kind", "device kind"),
    ("device", "name", "device"),
    ("target", None, "target"),
    ("versions", "tvm", "TVM version"),
    ("versions", "torch", "PyTorch version"),
)

Key = tuple[str, str, int, int, int, int, str]


def profile_path(root: str | Path, device_slug: str, target_slug: str) -> Path:
    """``<root>/<device-slug>/<target-slug>.csv``."""
    return Path(root) / device_slug / f"{target_slug}.csv"


def meta_path(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".yaml")


def row_key(row: Mapping[str, Any]) -> Key:
    return (str(row["primitive"]), str(row["backend"]), int(row["batch"]), int(row["m"]), int(row["k"]),
            int(row["n"]), str(row["dtype"]))


def passes_of(row: Mapping[str, Any]) -> int:
    """How many passes measured ``row`` (a row from before passes existed: one)."""
    value = row.get("passes")
    return 1 if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def merge_passes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` (one more pass of the row ``old``) merged into it: the median of the passes' medians, the
    largest p90, the mean energy, the summed repeats, the highest load; identity and date from ``new``.
    ProfileError when the two measured energy with different sources: a mean of a RAPL and an analytical
    figure is neither, and would carry one of their labels.

    A shared machine changes speed in phases of minutes (the README's drift figures), so one pass measures
    a row in one phase; passes taken a whole profile apart see different ones, and their median does not
    carry a single phase's error into every prediction that uses the row.
    """
    import statistics

    if row_key(old) != row_key(new):
        raise ValueError(f"cannot merge passes of different rows {row_key(old)} and {row_key(new)}")
    def medians(row: Mapping[str, Any]) -> tuple[float, ...]:  # a one-pass row stores only its latency
        return tuple(row.get("pass_latencies_ms") or (float(row["latency_ms"]),))

    sources = {str(old.get("energy_source") or ""), str(new.get("energy_source") or "")}
    if len(sources) > 1:
        names = " and ".join(sorted(s or "none" for s in sources))
        raise ProfileError(f"row {row_key(new)} has passes with energy from {names}; passes are merged only "
                           "from one energy source: rerun `dse profile --force` with one meter (or passes=1)")
    before, after = medians(old), medians(new)
    lat, k, j = (*before, *after), len(before), len(after)
    loads = [v for v in (old.get("load_1m"), new.get("load_1m")) if v is not None and not math.isnan(v)]
    return {**dict(new), "latency_ms": float(statistics.median(lat)),
            "latency_ms_p90": max(float(old["latency_ms_p90"]), float(new["latency_ms_p90"])),
            "repeats": int(old["repeats"]) + int(new["repeats"]),
            "energy_mj": (k * float(old["energy_mj"]) + j * float(new["energy_mj"])) / (k + j),
            "load_1m": max(loads) if loads else None, "passes": k + j, "pass_latencies_ms": lat}


# ---------------------------------------------------------------------------------------------------
# parsing and validation


def _parse(value: str, kind: str, column: str) -> Any:
    """One cell; raises ValueError with a reason."""
    text = value.strip()
    if kind == "name":
        if not text:
            raise ValueError(f"'{column}' is empty")
        return text
    if kind == "energy_source" and text == "":
        return ""  # no energy figure (checked against energy_mj by parse_rows)
    if kind in ("backend", "energy_source", "schedule"):
        allowed = {"backend": BACKENDS, "energy_source": ENERGY_SOURCES, "schedule": SCHEDULES}[kind]
        if text not in allowed:
            raise ValueError(f"'{column}' is {text!r}, expected one of {', '.join(allowed)}")
        return text
    if kind in ("size", "count"):
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"'{column}' is {text!r}, not an integer") from None
        if number < (1 if kind == "size" else 0):
            raise ValueError(f"'{column}' is {number}, must be {'positive' if kind == 'size' else '>= 0'}")
        return number
    if kind in ("opt_count", "opt_latencies") and text == "":
        return None
    if kind == "opt_count":
        return _parse(text, "size", column)
    if kind == "opt_latencies":
        return tuple(_parse(v, "latency", column) for v in text.split(";"))
    if kind.startswith("opt_") and text == "":
        return math.nan
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"'{column}' is {text!r}, not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"'{column}' is {text}, not a finite number")
    if kind == "latency" and number <= 0:
        raise ValueError(f"'{column}' is {number}, a latency must be positive")
    if kind in ("nonneg", "opt_nonneg") and number < 0:
        raise ValueError(f"'{column}' is {number}, must be >= 0")
    return number


def parse_rows(text: str, where: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Parse and validate profile CSV text; ProfileError (one line, naming ``where``) if corrupt."""
    if not text.strip():
        return list(COLUMNS), []
    if not text.endswith("\n"):
        raise ProfileError(f"profile {where} is truncated (its last line is incomplete); delete it or rerun "
                           "`dse profile --force`")
    try:
        records = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise ProfileError(f"profile {where} is not valid CSV ({exc}); delete it or rerun `dse profile --force`") \
            from None
    header = [h.strip() for h in records[0]]
    missing = [c for c, (_, required) in COLUMNS.items() if required and c not in header]
    if missing:
        raise ProfileError(f"profile {where} lacks column(s) {', '.join(missing)}; it is not a profile of this "
                           "version: rerun `dse profile --force`")
    if len(set(header)) != len(header):
        raise ProfileError(f"profile {where} has duplicate column names; rerun `dse profile --force`")
    rows, seen = [], {}
    for line, fields in enumerate(records[1:], start=2):
        if not fields:
            continue
        if len(fields) != len(header):
            raise ProfileError(f"profile {where} line {line} has {len(fields)} fields, expected {len(header)} "
                               "(truncated or corrupt file); delete it or rerun `dse profile --force`")
        row: dict[str, Any] = {}
        for column, value in zip(header, fields):
            kind = COLUMNS.get(column, ("raw", False))[0]
            if kind == "raw":
                row[column] = value
                continue
            try:
                row[column] = _parse(value, kind, column)
            except ValueError as exc:
                raise ProfileError(f"profile {where} line {line}: {exc}; fix the file or rerun "
                                   "`dse profile --force`") from None
        _check_energy(row, where, line)
        key = row_key(row)
        if key in seen:
            raise ProfileError(f"profile {where} lines {seen[key]} and {line} are the same measurement {key}; "
                               "delete one of them")
        seen[key] = line
        rows.append(row)
    return header, rows


def _check_energy(row: dict[str, Any], where: str, line: int) -> None:
    """An energy figure names its source and a source has a figure; an old profile's ``framework`` row (0.0 mJ
    labelled ``model``, which prices no interpreter time) is read as what it is: unknown."""
    energy, source = row.get("energy_mj", math.nan), row.get("energy_source", "")
    if row.get("primitive") == FRAMEWORK and source == "model" and energy == 0.0:
        row["energy_mj"], row["energy_source"] = math.nan, ""
        return
    if (isinstance(energy, float) and math.isnan(energy)) != (source == ""):
        raise ProfileError(f"profile {where} line {line}: energy_mj {'is empty' if source else 'is given'} but "
                           f"energy_source {'is ' + repr(source) if source else 'is empty'}; a figure needs its "
                           "source and an unknown energy leaves both empty; fix the row or rerun `dse profile`")


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ";".join(_format(v) for v in value)
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def format_rows(rows: Iterable[Mapping[str, Any]], extra: Iterable[str] = ()) -> str:
    columns = list(COLUMNS) + [c for c in extra if c not in COLUMNS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row.get(c)) for c in columns])
    return buf.getvalue()


def read_meta(path: Path) -> dict[str, Any]:
    """The ``.yaml`` header of a profile CSV; ProfileError if missing or malformed."""
    mpath = meta_path(path)
    try:
        text = mpath.read_text()
    except FileNotFoundError:
        raise ProfileError(f"profile {path} has no metadata file {mpath.name} beside it, so its device and "
                           "versions are unknown; rerun `dse profile --force`") from None
    except OSError as exc:
        raise ProfileError(f"cannot read {mpath}: {exc.strerror}") from None
    try:
        meta = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ProfileError(f"profile metadata {mpath} is not valid YAML; rerun `dse profile --force`") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("device"), dict) or "target" not in meta:
        raise ProfileError(f"profile metadata {mpath} lacks the device/target header; rerun `dse profile --force`")
    return meta


def merge_meta_entry(csv_path: str | Path, section: str, key: str, value: Any) -> None:
    """Set ``meta[section][key] = value`` in a profile's ``.yaml`` under its lock, keeping every other entry
    (e.g. one model's calibration beside another's, :mod:`dse.cost.calibration`)."""
    with file_lock(Path(csv_path)):
        meta = read_meta(Path(csv_path))
        entries = dict(meta.get(section) or {})
        entries[key] = value
        atomic_write_text(meta_path(csv_path), yaml.safe_dump({**meta, section: entries}, sort_keys=False))


# ---------------------------------------------------------------------------------------------------
# the loaded profile


@dataclasses.dataclass
class Profile:
    """A validated profile: ``frame`` (pandas DataFrame, one row per measurement) and ``meta``."""

    frame: Any
    meta: dict[str, Any]
    path: Path | None = None

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], meta: dict[str, Any], path: Path | None = None,
                  columns: Iterable[str] | None = None) -> Profile:
        import pandas as pd

        columns = list(columns or COLUMNS)
        frame = pd.DataFrame(rows, columns=columns)
        return cls(frame, meta, path)

    @property
    def energy_sources(self) -> list[str]:
        """Where the rows' energy figures come from (nvml | rapl measured, model analytical), each once."""
        if "energy_source" not in self.frame.columns:
            return []
        return sorted({str(s) for s in self.frame["energy_source"] if isinstance(s, str) and s})

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def device_slug(self) -> str | None:
        return self.meta.get("device", {}).get("slug")

    @property
    def target(self) -> dict[str, Any]:
        return dict(self.meta.get("target") or {})

    def keys(self) -> set[Key]:
        return {row_key(r) for r in self.frame.to_dict("records")}

    def lookup(self, primitive: str, b: int, m: int, k: int, n: int, backend: str = "tvm",
               dtype: str | None = None) -> dict[str, Any] | None:
        """The row for one measurement (any dtype if ``dtype`` is None and only one exists), or None."""
        f = self.frame
        sel = f[(f["primitive"] == primitive) & (f["backend"] == backend) & (f["batch"] == b) & (f["m"] == m)
                & (f["k"] == k) & (f["n"] == n)]
        if dtype is not None:
            sel = sel[sel["dtype"] == dtype]
        if len(sel) == 0:
            return None
        if len(sel) > 1:
            raise ProfileError(f"profile has {len(sel)} dtypes for {primitive} {backend} {(b, m, k, n)}; pass dtype=")
        return sel.iloc[0].to_dict()


def load_profile(path: str | Path) -> Profile:
    """Load and validate ``<target>.csv`` and its ``.yaml``; ProfileError naming the file and problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProfileError(f"profile {path} does not exist; run `dse profile` for this device and target") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    header, rows = parse_rows(text, str(path))
    meta = read_meta(path)
    return Profile.from_rows(rows, meta, path, [*COLUMNS, *(h for h in header if h not in COLUMNS)])


def find_profile(root: str | Path, target_slug: str, device_slug: str | None = None) -> Path:
    """The profile for ``target_slug`` under ``root``: ``device_slug``'s when it has one, else the only device's
    that does (a profile measured elsewhere prices the model for that device). ProfileError saying what is
    missing, or which profiles to choose from."""
    root = Path(root)
    if device_slug is not None and profile_path(root, device_slug, target_slug).is_file():
        return profile_path(root, device_slug, target_slug)
    found = sorted(root.glob(f"*/{target_slug}.csv"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ProfileError(f"no profile for target {target_slug} under {root}; run `dse profile --target ...` on "
                           "that device and copy its <device>/<target>.csv and .yaml here, or pass --profile")
    raise ProfileError(f"several devices have a profile for target {target_slug} under {root} "
                       f"({', '.join(p.parent.name for p in found)}); pass the one to use with --profile")


def list_profiles(root: str | Path) -> list[dict[str, Any]]:
    """One summary per profile under ``root`` (``<device>/<target>.csv``): device, target, rows, the models
    it was measured for, when, and its energy sources. A profile that cannot be read is listed with why."""
    out = []
    for path in sorted(Path(root).glob("*/*.csv")):
        entry: dict[str, Any] = {"profile": str(path), "device": path.parent.name, "target": path.stem}
        try:
            profile = load_profile(path)
        except ProfileError as exc:
            out.append(entry | {"error": str(exc)})
            continue
        meta = profile.meta
        device = meta.get("device") or {}
        models = [m.split(" (")[0] for m in meta.get("models") or [] if re.match(r"^[\w.-]+ \(batch", str(m))]
        out.append(entry | {
            "device": device.get("slug") or entry["device"], "device_name": device.get("name"),
            "target": meta.get("target_slug") or entry["target"], "rows": len(profile),
            "models": sorted(set(models)), "date": str(meta.get("updated") or meta.get("created") or ""),
            "energy_source": profile.energy_sources, "tvm": (meta.get("versions") or {}).get("tvm"),
        })
    return out


# ---------------------------------------------------------------------------------------------------
# the store


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _pick(meta: Mapping[str, Any], section: str, field: str | None) -> Any:
    value = meta.get(section)
    if field is None:
        return json.dumps(value, sort_keys=True) if isinstance(value, Mapping) else value
    return value.get(field) if isinstance(value, Mapping) else None


def differences(existing: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two profile headers, as phrases ('TVM version 0.26 vs 0.27')."""
    out = []
    for section, field, label in _IDENTITY:
        a, b = _pick(existing, section, field), _pick(current, section, field)
        if a != b:
            out.append(f"{label}: profile has {a}, this run has {b}")
    return out


class ProfileStore:
    """Reads and extends one profile (one device + target) safely across processes."""

    def __init__(self, root: str | Path, device: Mapping[str, Any], target: Mapping[str, Any], target_slug: str,
                 versions: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> None:
        self.path = profile_path(root, str(device["slug"]), target_slug)
        self.meta_path = meta_path(self.path)
        self.target_slug = target_slug
        self._model: str | None = None
        self.header: dict[str, Any] = {
            "format": FORMAT,
            "device": dict(device),
            "target": dict(target),
            "target_slug": target_slug,
            "versions": dict(versions),
            "settings": dict(settings or {}),
        }

    # ---- locked primitives ----------------------------------------------------------------------------
    def _read_rows(self) -> tuple[list[str], list[dict[str, Any]]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return list(COLUMNS), []
        return parse_rows(text, str(self.path))

    def _write_rows(self, rows: list[dict[str, Any]], header: list[str]) -> None:
        extra = [h for h in header if h not in COLUMNS]
        atomic_write_text(self.path, format_rows(rows, extra))

    def _write_meta(self, meta: Mapping[str, Any]) -> None:
        atomic_write_text(self.meta_path, yaml.safe_dump(dict(meta), sort_keys=False))

    # ---- public ------------------------------------------------------------------------------------------
    def open(self, *, force: bool = False, model: str | None = None) -> None:
        """Check the existing profile belongs to this device/target/versions (or create it).

        A foreign, header-less or corrupt profile is refused with a ProfileError saying what differs;
        ``force=True`` starts it afresh instead (its rows are discarded).
        """
        with file_lock(self.path):
            meta = None
            problem = None
            if self.meta_path.exists() or self.path.exists():
                try:
                    meta = read_meta(self.path)
                    self._read_rows()
                    diff = differences(meta, self.header)
                    if diff:
                        problem = (f"profile {self.path} was measured elsewhere ({'; '.join(diff)}); "
                                   "use another --out or --force to discard it and re-measure")
                except ProfileError as exc:
                    problem = str(exc)
                if problem and not force:
                    raise ProfileError(problem)
                if problem:
                    log.warning("discarding %s: %s", self.path, problem)
                    meta = None
                    self._write_rows([], list(COLUMNS))
            # An existing profile is not touched here: the model label is recorded by touch(), after rows
            # were measured, so a run that fails or measures nothing leaves both files as they were.
            self._model = model
            if meta is None:
                self._write_meta({**self.header, "created": _now(), "updated": _now(),
                                  "models": [model] if model else []})
            # The CSV after its metadata: a kill between the two leaves a profile without rows (valid),
            # never rows without a device (refused until --force).
            if not self.path.exists():
                self._write_rows([], list(COLUMNS))

    def touch(self, extra: Mapping[str, Any] | None = None) -> None:
        """Record that rows were just measured with this run's settings (``updated``, ``settings``) and for
        which model (the label given to :meth:`open`); ``extra`` entries (e.g. the host-speed reference,
        :mod:`dse.profiling.reference`) replace their keys."""
        with file_lock(self.path):
            meta = read_meta(self.path)
            models = list(meta.get("models") or [])
            if self._model and self._model not in models:
                models.append(self._model)
            self._write_meta({**meta, **dict(extra or {}), "settings": self.header["settings"], "updated": _now(),
                              "models": models})

    def keys(self) -> set[Key]:
        with file_lock(self.path):
            return {row_key(r) for r in self._read_rows()[1]}

    def rows(self) -> list[dict[str, Any]]:
        with file_lock(self.path):
            return self._read_rows()[1]

    def row(self, key: Key) -> dict[str, Any] | None:
        """The stored row with ``key``, None if there is none."""
        return next((r for r in self.rows() if row_key(r) == key), None)

    def add(self, row: Mapping[str, Any], *, replace: bool = False, merge: bool = False) -> bool:
        """Merge one measured row into the file (atomic, under the lock).

        Returns False (and writes nothing) when the row exists and neither ``replace`` nor ``merge`` is
        set — another process measured it meanwhile. ``merge`` adds the row as one more pass of the
        existing one (:func:`merge_passes`).
        """
        row = dict(row)
        key = row_key(row)
        with file_lock(self.path):
            header, rows = self._read_rows()
            index = {row_key(r): i for i, r in enumerate(rows)}
            if key in index:
                if not (replace or merge):
                    return False
                rows[index[key]] = merge_passes(rows[index[key]], row) if merge else row
            else:
                rows.append(row)
            self._write_rows(rows, header)
        return True

    def load(self) -> Profile:
        with file_lock(self.path):
            return load_profile(self.path)
