"""``dse run``: every stage in order, each in its own subfolder, reusing what has not changed.

    dense (pretrain) -> profile -> search -> finetune (chosen) -> export (+ CUDA compile-only) -> bench -> report

(bench also builds, once, the dense checkpoint compiled by TVM next to the artifact: ``export/artifact-dense-tvm``.)

A stage's fingerprint covers the config sections it reads and its upstream stages' fingerprints (and,
for the profile, the content of the measured CSV), so a rerun redoes exactly the stages whose inputs
changed. The report is always rebuilt from the files the stages wrote.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from dse.checkpoints import build_dense
from dse.config import Config, save_config
from dse.deploy.bench import bench
from dse.deploy.calibrate import ensure_calibration
from dse.deploy.export import export
from dse.fileio import atomic_write_text, content_digest, sha256_file
from dse.hardware.envinfo import environment
from dse.pipeline.report import write_report
from dse.pipeline.stages import StageResult, fingerprint, in_fresh_process, run_stage, section
from dse.profiling.inventory import inventory_for_config
from dse.profiling.profiler import Settings, load_warning, profile_model, write_model_rows
from dse.search.driver import run_search
from dse.training.finetune import finetune
from dse.training.pretrain import pretrain
from models.assignment import Assignment

log = logging.getLogger(__name__)


def _with(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with some fields of some sections replaced."""
    changes = {name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(cfg, **changes)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _profile(cfg: Config, cfg_d: Config, progress: bool) -> dict[str, Any]:
    """The profile stage: the model's rows (the store skips those already measured), then its calibration."""
    inv = inventory_for_config(cfg_d, batch=cfg.profile.batch)
    run = profile_model(inv, Settings.from_config(cfg.profile), cfg.profile.dir, progress=progress)
    busy = load_warning(run.rows, run.cores, cfg.profile.busy_load_per_core)  # rows reused from a loaded run too
    if busy:
        log.warning("profile: %s", busy)
    cal = ensure_calibration(cfg, run.path, inv, refit=run.measured > 0)
    if cal.fitted is not None:
        log.info("profile: %s%s", cal.fitted.describe(), "" if cal.fresh else " (stored)")
    return {"profile_csv": str(Path(run.path).resolve()), "measured": run.measured, "reused": run.present,
            "calibration": None if cal.fitted is None else cal.fitted.as_meta(),
            "seconds": round(run.seconds, 1), "energy_source": run.energy_source, "load_warning": busy,
            "rerun": busy}  # the next run measures the loaded rows again (dse.profiling.profiler.busy)


def run_pipeline(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    build_dense(cfg)  # an unknown model or bad model arguments fail here, before anything is written
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    _write_json(root / "env.json", environment(check_targets=False))
    results: list[StageResult] = []

    # 1. dense baseline

    # the inputs' content, not only their paths: other weights or images under the same name rerun every stage
    inputs = {"checkpoint": content_digest(cfg.model.checkpoint), "data": content_digest(cfg.data.path)}
    dense_key = fingerprint("pretrain", inputs, section(cfg, "seed", "model", "data", "pretrain"))
    dense = run_stage("pretrain", root / "dense", dense_key, ["weights.pt", "metrics.csv"], cfg,
                      lambda out: pretrain(cfg, out, resume=True, progress=progress))
    results.append(dense)
    dense_ckpt = (root / "dense" / "weights.pt").resolve()
    cfg_d = _with(cfg, model={"checkpoint": str(dense_ckpt)})

    # 2. profile (the store itself skips rows already measured)

    inv = inventory_for_config(cfg_d, batch=cfg.profile.batch)  # the model's rows: profiled, and reported

    def do_profile(out: Path) -> dict[str, Any]:
        return in_fresh_process(_profile, cfg, cfg_d, progress)

    prof_key = fingerprint("profile", section(cfg, "model", "data", "profile"))
    prof = run_stage("profile", root / "profile", prof_key, [], cfg, do_profile)
    profile_csv = Path(prof.summary["profile_csv"])
    if prof.reused and not profile_csv.exists():  # the store was cleaned: measure again
        prof = run_stage("profile", root / "profile", prof_key + "-remeasure", [], cfg, do_profile)
        profile_csv = Path(prof.summary["profile_csv"])
    results.append(prof)
    # what prices the model: the rows and the in-context factors fitted on them
    profile_digest = fingerprint(sha256_file(profile_csv), prof.summary.get("calibration"))
    # the store also holds other models' and calibration rows; the report shows this model's
    model_rows = write_model_rows(profile_csv, inv, root / "profile" / "model_rows.csv")

    # 3. search (stage A on the cost model, stage B on short fine-tunes)

    search_key = fingerprint("search", dense_key, profile_digest, section(cfg, "search", "cost", "finetune"))
    # one study per set of inputs: a rerun after a change starts afresh, an interrupted one continues
    cfg_s = _with(cfg_d, search={"profile": str(profile_csv), "study_name": f"{cfg.search.study_name}-{search_key}"})
    search = run_stage("search", root / "search", search_key, ["best_assignment.yaml", "pareto.csv"], cfg_s,
                       lambda out: run_search(cfg_s, out))
    results.append(search)
    chosen = root / "search" / "best_assignment.yaml"

    # 4. fine-tune the chosen assignment; the dense design needs none (its accuracy is the dense model's)

    dense_chosen = Assignment.from_yaml(chosen).is_dense()
    ft_key = fingerprint("finetune", search_key, sha256_file(chosen), section(cfg, "finetune", "cost"))
    if dense_chosen:
        ft = run_stage("finetune", root / "finetune", ft_key, [], cfg_d, _skip_finetune)
        weights, plan = dense_ckpt, chosen  # the dense weights, exported as the all-mult design
    else:
        ft = run_stage("finetune", root / "finetune", ft_key, ["weights.pt", "metrics.csv"], cfg_d,
                       lambda out: finetune(cfg_d, out, checkpoint=dense_ckpt, assignment=chosen,
                                            profile=profile_csv, resume=True, progress=progress))
        weights, plan = root / "finetune" / "weights.pt", None  # the fine-tuned weights carry their design
    results.append(ft)

    # 5. export (and a compile-only CUDA artifact)

    ex_key = fingerprint("export", ft_key, profile_digest, section(cfg, "export", "bench"))
    ex = run_stage("export", root / "export", ex_key, ["artifact/manifest.yaml"], cfg_d,
                   lambda out: export(cfg_d, weights, out / "artifact", target=cfg.export.target,
                                      assignment=plan, profile=profile_csv))
    results.append(ex)

    # 6. bench: exported model vs dense PyTorch (eager and torch.compile), side by side

    def do_bench(out: Path) -> dict[str, Any]:
        res = in_fresh_process(bench, cfg_d, root / "export" / "artifact", dense=dense_ckpt, profile=profile_csv)
        _write_json(out / "bench.json", res)
        # the dense model compiled by TVM (bench.dense_tvm) and the exported design's speed-ups stay in the summary
        return {k: res[k] for k in ("rows", "device", "dense_tvm", "speedup_vs_dense_tvm", "speedup_vs_eager",
                                    "speedup_vs_compiled")}

    bench_key = fingerprint("bench", ex_key, section(cfg, "bench"))
    bn = run_stage("bench", root / "bench", bench_key, ["bench.json"], cfg_d, do_bench)
    results.append(bn)

    # 7. report, always rebuilt from files
    summary = {
        "folder": str(root),
        "stages": [dataclasses.asdict(r) for r in results],
        "profile_csv": str(profile_csv),
        "model_rows_csv": str(model_rows),
        "accuracy": accuracy_table(root, dense_chosen=dense_chosen),
    }

    summary["report"] = {k: str(v) for k, v in write_report(root, summary).items()}
    _write_json(root / "run.json", summary)
    return summary


def _skip_finetune(out: Path) -> dict[str, Any]:
    """The finetune stage when the search chose the dense design: nothing to train, and no earlier run's
    weights left in the folder to be mistaken for this one's."""
    for name in ("weights.pt", "checkpoint.pt", "metrics.csv"):
        (out / name).unlink(missing_ok=True)
    return {"skipped": "the chosen design is the dense model: no fine-tuning, the export takes the dense weights"}


def accuracy_table(root: Path, *, dense_chosen: bool = False) -> dict[str, dict[str, Any]]:
    """Validation top-1 of dense / recipe / all-shift / chosen, each from the file its stage wrote (the
    chosen design's is the dense model's when the search chose the dense design)."""
    import pandas as pd

    table: dict[str, dict[str, Any]] = {}
    dense = root / "dense" / "metrics.csv"
    if dense.exists():
        m = pd.read_csv(dense)
        table["dense"] = {"acc": float(m["val_acc"].iloc[-1]), "epochs": int(m["epoch"].iloc[-1]),
                          "source": "dense/metrics.csv"}
    pareto = root / "search" / "pareto.csv"
    if pareto.exists():
        p = pd.read_csv(pareto)
        for name in ("recipe", "all-shift", "all-mult"):
            rows = p[(p["baseline"] == name) & p["accuracy"].notna()] if "baseline" in p else p.iloc[0:0]
            if len(rows):
                table[name] = {"acc": float(rows["accuracy"].iloc[0]), "epochs": "stage B",
                               "source": "search/pareto.csv"}
    ft = root / "finetune" / "metrics.csv"
    if dense_chosen and "dense" in table:
        table["chosen"] = {**table["dense"], "source": "dense/metrics.csv (the chosen design is the dense model)"}
    elif ft.exists():
        m = pd.read_csv(ft)
        table["chosen"] = {"acc": float(m["val_acc"].iloc[-1]), "epochs": int(m["epoch"].iloc[-1]),
                           "source": "finetune/metrics.csv"}
    return table
