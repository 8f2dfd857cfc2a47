"""Stage bookkeeping for ``dse run``: each stage owns a subfolder, records a fingerprint of its inputs
(the config sections it reads plus its upstream stages' fingerprints) and is skipped on a rerun when
the fingerprint matches and its outputs exist.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dse.config import Config, config_to_dict, save_config
from dse.fileio import atomic_write_text, fingerprint

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str
    folder: Path
    key: str
    reused: bool
    seconds: float  # spent now (0 when reused)
    summary: dict[str, Any]
    ran_seconds: float = 0.0  # what the stage took when it last ran


def run_stage(name: str, folder: Path, key: str, outputs: Iterable[str], cfg: Config,
              fn: Callable[[Path], dict[str, Any]]) -> StageResult:
    """Run ``fn(folder)`` unless ``folder/stage.json`` records the same key and all outputs exist, and its
    summary asks for no rerun (``"rerun"``: why the result should not be reused, e.g. rows measured under load)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "stage.json"
    outputs = list(outputs)
    if marker.exists():
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("key") == key and all((folder / o).exists() for o in outputs) and \
                not done.get("summary", {}).get("rerun"):
            log.info("stage %s: inputs unchanged, reusing %s", name, folder)
            return StageResult(name, folder, key, True, 0.0, done.get("summary", {}), float(done.get("seconds", 0.0)))
    t0 = time.perf_counter()
    summary = fn(folder)
    save_config(cfg, folder)
    seconds = time.perf_counter() - t0
    atomic_write_text(marker, json.dumps({"key": key, "seconds": seconds, "summary": summary}, indent=2,
                                         default=str))
    return StageResult(name, folder, key, False, seconds, summary, seconds)


def _child_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def in_fresh_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new interpreter (spawned, not forked), its result or exception returned here,
    its logging at this process's level. For the stages that measure: the stages before them leave a trained
    model's heap, PyTorch's and TVM's thread pools and Inductor's workers behind, and eager PyTorch measured
    ~17% slower inside ``dse run`` after training than in a fresh ``dse bench`` of the same artifact."""
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_logging,
                             initargs=(level,)) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def stage_status(stage: dict[str, Any]) -> str:
    """One line for a stage of ``run_pipeline``'s summary: ran, reused, or skipped and why."""
    if "skipped" in stage.get("summary", {}):
        return f"skipped: {stage['summary']['skipped']}"
    if stage["reused"]:
        return f"reused (inputs unchanged; ran in {stage['ran_seconds']:.1f} s)"
    return "ran"


def section(cfg: Config, *names: str) -> dict[str, Any]:
    data = config_to_dict(cfg)
    return {n: data[n] for n in names}


__all__ = ["StageResult", "fingerprint", "run_stage", "section"]
