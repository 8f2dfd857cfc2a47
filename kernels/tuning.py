"""MetaSchedule tuning with a persistent JSON database per target.

MetaSchedule's JSON database is keyed by workload (the PrimFunc's structure), not by target, so
records live in one folder per target slug: ``<root>/<target-slug>/database_workload.json`` and
``database_tuning_record.json``. ``<root>`` is, in order, the ``tuning_dir`` argument, the
``SHIFTADD_TUNING_DIR`` environment variable, or ``profiles/tuning`` in the project. The folder
also keeps ``selection.json``: per kernel, the trial budget it was tuned with and the measured
default vs tuned times, so the choice is made once, by measurement, and reused.

A kernel that has a record is built from it and never re-tuned; MetaSchedule tunes the canonical
definition (``schedules.canonical_primfunc``), the hand CPU schedules stay as the baseline, and the
tuned schedule is used only where it measured faster (on CUDA without a GPU nothing can be
measured, so an existing record wins).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import inspect
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernels import primitives, schedules, targets
from kernels.compiled import CompiledKernel, compile_primfunc
from kernels.errors import KernelError, UsageError

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)

ENV_VAR = "SHIFTADD_TUNING_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = PROJECT_ROOT / "profiles" / "tuning"
SELECTION_FILE = "selection.json"
# One candidate build can exceed MetaSchedule's default 30 s on a 2-core machine.
BUILDER_TIMEOUT_S = 120.0


def _fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` without source lookups (the frames are all TVMScript's parser uses)."""
    frame = sys._getframe(1)
    out = []
    while frame is not None:
        out.append(
            inspect.FrameInfo(
                frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None, None
            )
        )
        frame = frame.f_back
    return out


def preload_tensor_intrin() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` quickly (MetaSchedule's TuneContext imports it).

    Each of its hundreds of ``@T.prim_func`` calls ``inspect.stack()``, which, for every
    ``<frozen importlib>`` frame of the import, scans all of ``sys.modules`` for a source file:
    minutes on a loaded 2-core machine. The parser only needs the frame objects.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _fast_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


def build_candidate(mod: Any, target: Any, _params: Any = None) -> Any:
    """MetaSchedule builder function: ``default_build`` without ``import tvm.s_tir.tensor_intrin``.

    That import parses hundreds of TVMScript intrinsics (minutes on a loaded 2-core machine,
    longer than any builder timeout) and only tensorizing rules need it; on CPU none of our
    workloads do. Runs in the builder's worker processes, which import it by module name.
    """
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    if not targets.is_cuda(target):
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm.tirx.build(mod, target=target)
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    preload_tensor_intrin()
    return default_build(mod, target, _params)


def tuning_root(tuning_dir: str | Path | None = None) -> Path:
    """Root of the per-target tuning folders (argument > $SHIFTADD_TUNING_DIR > profiles/tuning)."""
    if tuning_dir is not None:
        return Path(tuning_dir).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return DEFAULT_ROOT


def target_dir(target: Any, tuning_dir: str | Path | None = None) -> Path:
    return tuning_root(tuning_dir) / targets.target_slug(targets.resolve_target(target))


def kernel_key(name: str, b: int, m: int, k: int, n: int, dtype: str) -> str:
    return f"{name}/b{b}_m{m}_k{k}_n{n}/{dtype}"


def _workload(name: str, b: int, m: int, k: int, n: int, dtype: str) -> tvm.IRModule:
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(schedules.canonical_primfunc(name, b, m, k, n, dtype))


_DB_CACHE: dict[Path, tuple[tuple[float, ...], Any]] = {}


def _cached_database(folder: Path) -> Any:
    """A read handle on ``folder``'s database, reloaded only when its files change."""
    files = (folder / "database_workload.json", folder / "database_tuning_record.json")
    stamp = tuple(f.stat().st_mtime if f.exists() else 0.0 for f in files)
    hit = _DB_CACHE.get(folder)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    db = open_database(folder)
    _DB_CACHE[folder] = (stamp, db)
    return db


def open_database(folder: Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(folder / "database_workload.json"),
        path_tuning_record=str(folder / "database_tuning_record.json"),
        allow_missing=True,
    )


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialise writers of one target folder across processes (tuning appends to shared files)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_selection(folder: Path) -> dict[str, Any]:
    path = folder / SELECTION_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s (%s)", path, exc)
        return {}


def _update_selection(folder: Path, key: str, entry: dict[str, Any]) -> None:
    try:
        with _locked(folder):
            data = _read_selection(folder)
            data[key] = {**data.get(key, {}), **entry}
            tmp = folder / (SELECTION_FILE + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            tmp.replace(folder / SELECTION_FILE)
    except OSError as exc:  # a read-only checkout still builds, it just cannot remember
        log.warning("could not record the tuning selection in %s: %s", folder, exc)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    key: str
    folder: Path
    trials: int
    tuned_now: bool
    seconds: float


def tuned_primfunc(
    name: str, b: int, m: int, k: int, n: int, dtype: str, target: tvm.target.Target, folder: Path
) -> tvm.tirx.PrimFunc | None:
    """The best recorded schedule of this kernel in ``folder``'s database, or None.

    ``selection.json`` indexes the tuned kernels, so a kernel never tuned costs no database load.
    """
    if kernel_key(name, b, m, k, n, dtype) not in _read_selection(folder):
        return None
    if not (folder / "database_tuning_record.json").exists():
        return None
    db = _cached_database(folder)
    mod = _workload(name, b, m, k, n, dtype)
    if not db.has_workload(mod):
        return None
    sch = db.query_schedule(mod, target, workload_name="main")
    return None if sch is None else sch.mod["main"]


def tune(
    name: str,
    b: int,
    m: int,
    k: int,
    n: int,
    target: Any = "cpu",
    dtype: str | None = None,
    trials: int = 32,
    tuning_dir: str | Path | None = None,
    force: bool = False,
) -> TuneResult:
    """Tune one kernel with MetaSchedule unless its target database already has a record.

    ``force=True`` tunes again (adding records); otherwise an existing record is reused.
    """
    from tvm.s_tir import meta_schedule as ms

    prim = primitives.get(name)
    primitives.check_shape(b, m, k, n)
    dtype = prim.check_dtype(dtype)
    if trials < 1:
        raise UsageError(f"tuning needs trials >= 1, got {trials}")
    tgt = targets.resolve_target(target)
    folder = target_dir(tgt, tuning_dir)
    key = kernel_key(name, b, m, k, n, dtype)
    if not force and tuned_primfunc(name, b, m, k, n, dtype, tgt, folder) is not None:
        recorded = int(_read_selection(folder).get(key, {}).get("trials", 0))
        log.info("%s: reusing the tuning record in %s (tuned with %d trials)", key, folder, recorded)
        return TuneResult(key, folder, recorded, False, 0.0)
    targets.require_runnable(tgt)  # tuning measures candidates on the device
    start = time.perf_counter()
    preload_tensor_intrin()
    log.info("%s: tuning for %s with %d trials", key, targets.target_slug(tgt), trials)
    with _locked(folder), tempfile.TemporaryDirectory(prefix="shiftadd-tune-") as work_dir:
        try:
            ms.tune_tir(
                mod=_workload(name, b, m, k, n, dtype),
                target=tgt,
                work_dir=work_dir,
                max_trials_global=trials,
                num_trials_per_iter=min(trials, 16),
                builder=ms.builder.LocalBuilder(timeout_sec=BUILDER_TIMEOUT_S, f_build=build_candidate),
                database=open_database(folder),
            )
        except Exception as exc:
            raise KernelError(
                f"MetaSchedule tuning of {key} failed: {str(exc).strip().splitlines()[-1]}"
            ) from exc
    seconds = time.perf_counter() - start
    _update_selection(folder, key, {"trials": trials, "tuning_seconds": round(seconds, 1)})
    if tuned_primfunc(name, b, m, k, n, dtype, tgt, folder) is None:
        raise KernelError(
            f"MetaSchedule tuning of {key} produced no valid record in {trials} trials; "
            "raise the trial budget or check the builder log"
        )
    return TuneResult(key, folder, trials, True, seconds)


def _race(default: CompiledKernel, tuned: CompiledKernel, rounds: int = 3) -> tuple[float, float]:
    """Median times of the two kernels, measured alternately on the same inputs (noise-fair)."""
    b, m, k, n = default.shape
    arrays = primitives.random_inputs(default.name, b, m, k, n, default.dtype)
    d_ms, t_ms = [], []
    for _ in range(rounds):
        d_ms.append(default.time(*arrays, min_repeat_ms=20, repeat=3).median_ms)
        t_ms.append(tuned.time(*arrays, min_repeat_ms=20, repeat=3).median_ms)
    return sorted(d_ms)[rounds // 2], sorted(t_ms)[rounds // 2]


def tuned_kernel(default: CompiledKernel, tuning_dir: str | Path | None = None) -> CompiledKernel | None:
    """The kernel built from the best tuning record for ``default``'s kernel, or None if there is none."""

    name, (b, m, k, n), dtype, tgt = default.name, default.shape, default.dtype, default.target
    folder = target_dir(tgt, tuning_dir)
    func = tuned_primfunc(name, b, m, k, n, dtype, tgt, folder)
    if func is None:
        return None
    trials = int(_read_selection(folder).get(kernel_key(name, b, m, k, n, dtype), {}).get("trials", 0))
    return CompiledKernel(name, default.shape, dtype, tgt, compile_primfunc(func, tgt), func, "tuned", trials)


def select(
    default: CompiledKernel, trials: int = 0, tuning_dir: str | Path | None = None
) -> CompiledKernel | None:
    """The tuned kernel if a record exists (tuning first when ``trials > 0``) and it beats ``default``.

    Returns None when there is no record; ``default`` (with ``tuned_trials`` set) when it won.
    """
    name, (b, m, k, n), dtype, tgt = default.name, default.shape, default.dtype, default.target
    folder = target_dir(tgt, tuning_dir)
    key = kernel_key(name, b, m, k, n, dtype)
    if trials > 0:
        tune(name, b, m, k, n, tgt, dtype, trials, tuning_dir)
    tuned = tuned_kernel(default, tuning_dir)
    if tuned is None:
        return None
    entry = _read_selection(folder).get(key, {})
    if entry.get("choice") in ("default", "tuned") and entry.get("default_version") == schedules.VERSION:
        winner = entry["choice"]
    elif not default.is_cuda or targets.cuda_available():
        default_ms, tuned_ms = _race(default, tuned)
        winner = "tuned" if tuned_ms < default_ms else "default"
        log.info("%s: default %.3f ms, tuned %.3f ms -> %s", key, default_ms, tuned_ms, winner)
        _update_selection(
            folder,
            key,
            {
                "choice": winner,
                "default_ms": round(default_ms, 4),
                "tuned_ms": round(tuned_ms, 4),
                "default_version": schedules.VERSION,
            },
        )
    else:
        winner = "tuned"  # cannot measure here: a record tuned on a real GPU beats an untimed default
    if winner == "tuned":
        return tuned
    default.tuned_trials = tuned.tuned_trials
    return default
