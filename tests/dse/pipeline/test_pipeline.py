"""`dse run` end to end on a tiny config: every stage writes its folder, the report's figures are the ones
in the files the stages wrote, and a rerun reuses every stage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import models
from dse.pipeline.run import _skip_finetune, accuracy_table
from models.assignment import Assignment

TINY = [
    "model.kwargs={depth: 2, embed_dim: 48, num_heads: 2}", "data.img_size=16", "data.augment=false",
    "pretrain.epochs=2", "pretrain.warmup_epochs=0", "profile.repeat=2", "profile.min_repeat_ms=1",
    "profile.torch_threads=1", "profile.busy_load_per_core=1000", "search.trials=60", "search.population=20", "search.stage_b_candidates=1",
    "search.stage_b_epochs=1", "search.sensitivity_samples=64", "finetune.epochs=1", "finetune.warmup_epochs=0",
    "export.val_images=32", "export.repeat=3", "export.cuda_arch=null", "bench.repeat=3", "bench.warmup=1",
    "bench.torch_compile=false",
]
STAGES = ["pretrain", "profile", "search", "finetune", "export", "bench"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, run_cli):
    root = tmp_path_factory.mktemp("pipeline")
    args = ["run", "--out", str(root / "run"), *[a for s in [*TINY, f"profile.dir={root / 'profiles'}"]
                                                  for a in ("--set", s)]]
    first = run_cli(*args, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    return root / "run", args, first


def test_every_stage_ran_and_wrote_its_folder(run):
    out, _, _ = run
    summary = json.loads((out / "run.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert all(not s["reused"] for s in summary["stages"])
    for stage in summary["stages"]:
        assert (out / stage["folder"].split("/")[-1] / "resolved_config.yaml").is_file() or stage["name"] == "profile"
    assert (out / "export" / "artifact" / "manifest.yaml").is_file() and (out / "search" / "pareto.csv").is_file()


def test_report_figures_come_from_the_stage_files(run):
    out, _, _ = run
    report = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html  # self-contained
    for png in (out / "plots").glob("*.png"):
        assert png.stat().st_size > 1000
    from dse.pipeline.report import _fmt  # the report's own number format

    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.setdefault(cells[0], cells[1:])
    dense = pd.read_csv(out / "dense" / "metrics.csv")["val_acc"].iloc[-1]
    dense_chosen = Assignment.from_yaml(out / "search" / "best_assignment.yaml").is_dense()
    chosen = dense if dense_chosen else pd.read_csv(out / "finetune" / "metrics.csv")["val_acc"].iloc[-1]
    assert rows["dense"][0] == _fmt(float(dense)) and rows["chosen"][0] == _fmt(float(chosen))
    pareto = pd.read_csv(out / "search" / "pareto.csv")
    for name in ("recipe", "all-shift"):  # stage B fine-tuned both baselines; their accuracy is reported
        acc = pareto[(pareto["baseline"] == name) & pareto["accuracy"].notna()]["accuracy"]
        assert len(acc) == 1 and rows[name][0] == _fmt(float(acc.iloc[0])), name
    bench = json.loads((out / "bench" / "bench.json").read_text())
    for row in bench["rows"]:
        assert rows[row["model"]][0] == _fmt(float(row["median_ms"])), row["model"]
    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["search"]["trials"] == 60


def test_the_exported_design_is_the_chosen_one_and_only_a_shiftadd_design_is_fine_tuned(run):
    out, _, _ = run
    chosen = Assignment.from_yaml(out / "search" / "best_assignment.yaml")
    exported = Assignment.from_yaml(out / "export" / "artifact" / "assignment.yaml")
    for kind in ("attention", "linear"):
        names = {*getattr(chosen, kind), *getattr(exported, kind)}
        assert {n: exported.choice(n, kind) for n in names} == {n: chosen.choice(n, kind) for n in names}
    finetune = next(s for s in json.loads((out / "run.json").read_text())["stages"] if s["name"] == "finetune")
    assert ("skipped" in finetune["summary"]) == chosen.is_dense()
    assert (out / "finetune" / "weights.pt").exists() != chosen.is_dense()


def test_a_dense_choice_reports_the_dense_accuracy_and_leaves_no_stale_fine_tune(tmp_path):
    (tmp_path / "dense").mkdir()
    pd.DataFrame({"epoch": [1, 2], "val_acc": [90.0, 97.5]}).to_csv(tmp_path / "dense" / "metrics.csv")
    ft = tmp_path / "finetune"
    ft.mkdir()
    pd.DataFrame({"epoch": [1], "val_acc": [99.0]}).to_csv(ft / "metrics.csv")  # an earlier run's
    (ft / "weights.pt").write_bytes(b"old")
    assert accuracy_table(tmp_path)["chosen"]["acc"] == 99.0
    summary = _skip_finetune(ft)
    assert "dense" in summary["skipped"] and not (ft / "weights.pt").exists() and not (ft / "metrics.csv").exists()
    table = accuracy_table(tmp_path, dense_chosen=True)
    assert table["chosen"]["acc"] == table["dense"]["acc"] == 97.5


def test_rerun_reuses_every_stage(run, run_cli):
    out, args, _ = run
    again = run_cli(*args, "--json", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert [s["name"] for s in summary["stages"] if s["reused"]] == STAGES
    assert all(s["ran_seconds"] > 0 for s in summary["stages"])  # the report still says what each took


def test_report_profile_table_is_this_models_rows(run):
    """The device's profile may hold other models' and calibration rows; the report shows the plan's."""
    from dse.config import load_config
    from dse.profiling.inventory import inventory_for_config
    from dse.profiling.profiler import plan
    from dse.profiling.store import load_profile, row_key

    out, _, _ = run
    summary = json.loads((out / "run.json").read_text())
    mine = pd.read_csv(summary["model_rows_csv"])
    whole = load_profile(summary["profile_csv"]).frame
    keys = {row_key(r) for r in mine.to_dict("records")}
    assert len(keys) == len(mine) and keys <= {row_key(r) for r in whole.to_dict("records")}
    inv = inventory_for_config(load_config(out / "resolved_config.yaml"))
    assert keys == {s.key for s in plan(inv)}
    assert f"the {len(mine)} rows that price this model" in (out / "report.md").read_text()


def test_a_given_checkpoint_is_evaluated_once_and_new_weights_under_its_name_rerun_every_stage(
        run, run_cli, tmp_path):

    out, args, _ = run
    ckpt = tmp_path / "user.pt"
    weights = torch.load(out / "dense" / "weights.pt", weights_only=True)
    torch.save(weights, ckpt)
    mine = ["run", "--out", str(tmp_path / "run"), *args[3:], "--set", f"model.checkpoint={ckpt}", "--json"]

    def stages() -> dict[str, bool]:
        done = run_cli(*mine, timeout=1500)
        assert done.returncode == 0, done.stderr[-3000:]
        return {s["name"]: s["reused"] for s in json.loads((tmp_path / "run" / "run.json").read_text())["stages"]}

    assert not any(stages().values())
    metrics = pd.read_csv(tmp_path / "run" / "dense" / "metrics.csv")
    assert list(metrics["epoch"]) == [0]  # evaluated, not trained
    report = (tmp_path / "run" / "report.md").read_text()
    assert "dense/metrics.csv" in report
    assert all(stages().values())  # nothing changed: the evaluation is not repeated
    state = weights["model"]
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 0.01  # other weights under the same file name
    torch.save(weights, ckpt)
    assert stages() == {"pretrain": False, "profile": True, "search": False, "finetune": False, "export": False,
                        "bench": False}


def _image_folder(root, rng) -> None:
    """Two classes of 16-px PNGs (bright top half vs bright bottom half), 6 train and 3 val images each."""
    for split, count in (("train", 6), ("val", 3)):
        for label in ("top", "bottom"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
                rows = slice(0, 8) if label == "top" else slice(8, 16)
                img[rows] += 150
                Image.fromarray(img).save(folder / f"{i}.png")


def test_imagefolder_with_a_user_checkpoint_end_to_end_and_a_changed_image_reruns_what_depends_on_it(
        tmp_path, run_cli):
    """A user's ImageFolder and checkpoint through every stage; then one changed image (same file name) reruns
    every stage that reads the data, and only those."""
    _image_folder(tmp_path / "data", np.random.default_rng(0))
    ckpt = tmp_path / "user.pt"
    torch.manual_seed(0)
    torch.save({"model": models.create("vit_digits", img_size=16, depth=2, embed_dim=48, num_heads=2,
                                       num_classes=2).state_dict()}, ckpt)
    sets = [*TINY, f"profile.dir={tmp_path / 'profiles'}", "data.name=imagefolder", f"data.path={tmp_path / 'data'}",
            "data.workers=0", "model.num_classes=2", f"model.checkpoint={ckpt}", "export.val_images=null"]
    args = ["run", "--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)], "--json"]

    def stages() -> dict[str, bool]:
        done = run_cli(*args, timeout=1500)
        assert done.returncode == 0, done.stderr[-3000:]
        return {s["name"]: s["reused"] for s in json.loads((tmp_path / "run" / "run.json").read_text())["stages"]}

    assert not any(stages().values())
    metrics = pd.read_csv(tmp_path / "run" / "dense" / "metrics.csv")
    assert list(metrics["epoch"]) == [0] and 0.0 <= metrics["val_acc"][0] <= 100.0  # evaluated on the 6 val images
    manifest = yaml.safe_load((tmp_path / "run" / "export" / "artifact" / "manifest.yaml").read_text())
    assert manifest["accuracy"]["val_images"] == 6 and manifest["accuracy"]["top1_agreement"] == 1.0
    assert manifest["input"]["shape"][1:] == [3, 16, 16]
    img = tmp_path / "data" / "val" / "top" / "0.png"
    Image.fromarray(255 - np.asarray(Image.open(img))).save(img)  # other pixels, same name and size class
    assert stages() == {"pretrain": False, "profile": True, "search": False, "finetune": False, "export": False,
                        "bench": False}
