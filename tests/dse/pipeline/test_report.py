"""report.md / report.html open with a verdict of at most five lines, computed from the run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

DEVICE = {"kind": "cpu", "name": "Test CPU 9000", "slug": "test-cpu-9000"}
ATTENTION = ["blocks.0.attn", "blocks.1.attn"]
LINEAR = [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
PARETO_COLUMNS = ["trial", "source", "baseline", "latency_ms", "energy_mj", "risk", "accuracy", "chosen",
                  "n_msa", "n_hamming", "n_mult", "n_shift", "n_moe"]


def _bench_json(medians: dict[str, float], energy: dict[str, float | None], source: str = "rapl") -> dict:
    """A bench.json as `dse bench` writes it: rows per contestant and the exported design's speed-ups."""
    labels = {"tvm": "ShiftAddViT (TVM, llvm-test)", "dense_tvm": "dense (TVM)", "eager": "dense (PyTorch eager)",
              "compiled": "dense (torch.compile)"}
    rows = [{"model": labels[name], "median_ms": ms, "p90_ms": ms * 1.1, "speedup_vs_eager": medians["eager"] / ms,
             "energy_mj": energy.get(name), "energy_source": source, "predicted_ms": None,
             "prediction_error_pct": None, "contestant": name} for name, ms in medians.items()]
    return {"rows": rows, "batch": 8, "device": DEVICE,
            "speedup_vs_eager": medians["eager"] / medians["tvm"],
            "speedup_vs_compiled": medians["compiled"] / medians["tvm"] if "compiled" in medians else None,
            "speedup_vs_dense_tvm": medians["dense_tvm"] / medians["tvm"] if "dense_tvm" in medians else None,
            "dense_tvm": {"median_ms": medians["dense_tvm"]} if "dense_tvm" in medians else None}


def _pareto_row(trial: int, latency: float, energy: float, attention: str, linear: str, *, baseline: str = "",
                chosen: bool = False) -> dict:
    n = {c: 0 for c in ("msa", "hamming", "mult", "shift", "moe")}
    n[attention] += len(ATTENTION)
    n[linear] += len(LINEAR)
    return {"trial": trial, "source": "front", "baseline": baseline, "latency_ms": latency, "energy_mj": energy,
            "risk": 0.0, "accuracy": None, "chosen": chosen, **{f"n_{c}": v for c, v in n.items()}}


def _run_folder(root: Path, *, bench: dict, pareto: list[dict], attention: str, linear: str) -> Path:
    """A hand-written `dse run` folder: just the files the report reads."""
    for sub in ("bench", "search"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "bench" / "bench.json").write_text(json.dumps(bench))
    lines = [",".join(PARETO_COLUMNS)]
    lines += [",".join("" if r[c] is None else str(r[c]) for c in PARETO_COLUMNS) for r in pareto]
    (root / "search" / "pareto.csv").write_text("\n".join(lines) + "\n")
    plan = {"attention": dict.fromkeys(ATTENTION, attention), "linear": dict.fromkeys(LINEAR, linear)}
    (root / "search" / "best_assignment.yaml").write_text(yaml.safe_dump(plan))
    return root


def _summary(dense_acc: float, chosen_acc: float, energy_source: str = "rapl") -> dict:
    return {"accuracy": {"dense": {"acc": dense_acc, "epochs": 2, "source": "dense/metrics.csv"},
                         "chosen": {"acc": chosen_acc, "epochs": 1, "source": "finetune/metrics.csv"}},
            "stages": [{"name": "profile", "reused": False, "seconds": 1.0, "ran_seconds": 1.0,
                        "summary": {"energy_source": energy_source}}]}


def _verdict(root: Path, summary: dict) -> tuple[list[str], str, str]:
    """(the verdict's lines, report.md, report.html) after writing the report."""
    from dse.pipeline.report import write_report

    paths = write_report(root, summary)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    sections = md.split("\n## ")
    assert sections[1].startswith("Verdict\n"), "the verdict is the report's first section"
    lines = [ln for ln in sections[1].splitlines()[1:] if ln.strip()]
    assert 1 <= len(lines) <= 5
    assert page.index("<h2>Verdict</h2>") < page.index("<h2>", page.index("<h2>Verdict</h2>") + 1)
    assert page.count("<h2>") > 1 and page.index("<h2>") == page.index("<h2>Verdict</h2>")
    return lines, md, page


def test_verdict_when_shiftadd_pays(tmp_path):
    from dse.pipeline.report import fmt_change, fmt_ms, fmt_x

    medians = {"tvm": 2.0, "dense_tvm": 3.0, "eager": 5.0, "compiled": 4.0}
    energy = {"tvm": 0.8, "dense_tvm": 1.0, "eager": 2.0, "compiled": 1.8}
    bench = _bench_json(medians, energy)
    pareto = [_pareto_row(0, 2.1, 0.9, "hamming", "shift", chosen=True),
              _pareto_row(1, 3.2, 1.1, "msa", "mult", baseline="all-mult")]
    root = _run_folder(tmp_path / "run", bench=bench, pareto=pareto, attention="hamming", linear="shift")
    lines, md, page = _verdict(root, _summary(dense_acc=97.5, chosen_acc=96.75))

    # the figures, computed here from the bench's medians and the accuracy table
    vs_dense, vs_eager = 3.0 / 2.0, 5.0 / 2.0
    assert bench["speedup_vs_dense_tvm"] == pytest.approx(vs_dense)
    assert fmt_x(vs_dense) == "1.50×" and fmt_x(vs_eager) == "2.50×" and fmt_change(96.75 - 97.5) == "−0.75"
    assert lines[0] == ("On Test CPU 9000, ShiftAddViT pays: 1.50× faster than the dense model compiled by TVM "
                        "(2.00 ms vs 3.00 ms), 2.50× vs PyTorch eager; accuracy −0.75 points.")
    assert lines[1] == "Chosen design: attention hamming 2; linear shift 8."
    assert f"{fmt_x(vs_dense)} vs dense (TVM)" in lines[2] and f"{fmt_x(5.0 / 2.0)} vs PyTorch eager" in lines[2]
    assert f"{fmt_x(4.0 / 2.0)} vs torch.compile" in lines[2] and f"({fmt_ms(2.0)} ms, batch 8)" in lines[2]
    assert f"vs dense (TVM) at {fmt_ms(3.0)} ms (the reparameterisation's own gain)" in lines[2]
    assert lines[3] == "Accuracy vs dense: −0.75 points (chosen 96.75% vs dense 97.50%)."
    change = 100.0 * (0.8 / 1.0 - 1.0)  # measured by the bench against dense (TVM)
    assert lines[4].startswith(f"Energy vs dense (TVM): {fmt_change(change, 1, '%')}") and "source: rapl" in lines[4]
    assert "−20.0%" in lines[4]
    assert "ShiftAddViT pays: 1.50× faster" in page  # the HTML page says the same


def test_verdict_when_dense_wins(tmp_path):
    from dse.pipeline.report import fmt_change, fmt_ms, fmt_x

    medians = {"tvm": 1.9, "dense_tvm": 2.0, "eager": 4.0}  # the exported design is the fine-tuned dense one
    bench = _bench_json(medians, {})  # no energy measured: the verdict uses the search's prediction
    dense_ms, fastest_ms = 1.6, 2.4
    pareto = [_pareto_row(3, dense_ms, 0.5, "msa", "mult", baseline="all-mult", chosen=True),
              _pareto_row(4, fastest_ms, 0.45, "msa", "shift", baseline="all-shift"),
              _pareto_row(5, 3.0, 0.4, "hamming", "moe", baseline="recipe")]
    root = _run_folder(tmp_path / "run", bench=bench, pareto=pareto, attention="msa", linear="mult")
    lines, _, _ = _verdict(root, _summary(dense_acc=97.0, chosen_acc=97.25, energy_source="model"))

    slower = fastest_ms / dense_ms
    assert fmt_x(slower) == "1.50×"
    assert lines[0] == (f"On Test CPU 9000, reparameterisation does not pay for this model: best is the dense model "
                        f"compiled ({fmt_ms(dense_ms)} ms); the fastest ShiftAdd design is {fmt_ms(fastest_ms)} ms "
                        f"({fmt_x(slower)} slower; search predictions).")
    assert lines[1] == "Chosen design: dense (all-mult)."
    assert f"{fmt_x(2.0 / 1.9)} vs dense (TVM)" in lines[2] and f"{fmt_x(4.0 / 1.9)} vs PyTorch eager" in lines[2]
    assert "torch.compile" not in lines[2]
    assert lines[3] == f"Accuracy vs dense: {fmt_change(97.25 - 97.0)} points (chosen 97.25% vs dense 97.00%)."
    assert lines[3].startswith("Accuracy vs dense: +0.25 points")
    assert lines[4] == "Energy vs dense: +0.0% per batch, predicted by the search (profile energy source: model)."


def test_verdict_when_a_faster_shiftadd_design_lost_on_accuracy(tmp_path):
    from dse.pipeline.report import fmt_ms, fmt_x

    bench = _bench_json({"tvm": 2.0, "dense_tvm": 2.0, "eager": 4.0}, {})
    pareto = [_pareto_row(0, 2.0, 0.5, "msa", "mult", baseline="all-mult", chosen=True),
              _pareto_row(4, 1.6, 0.45, "msa", "shift", baseline="all-shift")]
    root = _run_folder(tmp_path / "run", bench=bench, pareto=pareto, attention="msa", linear="mult")
    lines, _, _ = _verdict(root, _summary(dense_acc=97.0, chosen_acc=97.0, energy_source="model"))
    assert lines[0] == (f"On Test CPU 9000, reparameterisation does not pay for this model: best is the dense model "
                        f"compiled ({fmt_ms(2.0)} ms); the fastest ShiftAdd design is predicted {fmt_x(2.0 / 1.6)} "
                        f"faster ({fmt_ms(1.6)} ms) but costs more accuracy (or risk) than search.max_accuracy_drop "
                        "allows.")


def test_verdict_calls_a_gain_inside_the_timing_spread_nothing_measurable(tmp_path):
    from dse.pipeline.report import fmt_ms, fmt_x

    medians = {"tvm": 1.78, "dense_tvm": 1.80, "eager": 4.71}  # p90 = 1.1 x median: a 10% spread
    pareto = [_pareto_row(2, 1.80, 0.9, "msa", "shift", chosen=True),
              _pareto_row(0, 1.85, 1.0, "msa", "mult", baseline="all-mult")]
    root = _run_folder(tmp_path / "run", bench=_bench_json(medians, {}), pareto=pareto, attention="msa",
                       linear="shift")
    lines, _, _ = _verdict(root, _summary(dense_acc=98.06, chosen_acc=98.06))
    assert lines[0] == (f"On Test CPU 9000, ShiftAddViT and the dense model compiled by TVM measure the same within "
                        f"the timing spread ({fmt_ms(1.78)} ms vs {fmt_ms(1.80)} ms, {fmt_x(1.80 / 1.78)}; p90 spread "
                        f"10%): the reparameterisation buys nothing measurable here; {fmt_x(4.71 / 1.78)} vs PyTorch "
                        "eager; accuracy +0.00 points.")


def test_verdict_without_dense_tvm_says_the_gain_includes_the_compiler(tmp_path):
    from dse.pipeline.report import fmt_x

    bench = _bench_json({"tvm": 2.0, "eager": 5.0}, {})
    pareto = [_pareto_row(0, 2.1, 0.9, "msa", "shift", chosen=True),
              _pareto_row(1, 3.2, 1.1, "msa", "mult", baseline="all-mult")]
    root = _run_folder(tmp_path / "run", bench=bench, pareto=pareto, attention="msa", linear="shift")
    lines, _, _ = _verdict(root, _summary(dense_acc=97.0, chosen_acc=96.0))
    assert lines[0].startswith(f"On Test CPU 9000, ShiftAddViT runs {fmt_x(2.5)} vs PyTorch eager")
    assert "not measured" in lines[0] and "compiler's gain" in lines[0] and "accuracy −1.00 points" in lines[0]
    assert lines[4] == "Energy vs dense: −18.2% per batch, predicted by the search (profile energy source: rapl)."


def test_verdict_when_the_chosen_design_measures_slower_than_dense_tvm(tmp_path):
    from dse.pipeline.report import fmt_ms, fmt_x

    medians = {"tvm": 2.5, "dense_tvm": 2.0, "eager": 5.0}
    pareto = [_pareto_row(0, 1.8, 0.9, "msa", "moe", chosen=True),
              _pareto_row(1, 2.0, 1.1, "msa", "mult", baseline="all-mult")]
    root = _run_folder(tmp_path / "run", bench=_bench_json(medians, {}), pareto=pareto, attention="msa", linear="moe")
    lines, _, _ = _verdict(root, _summary(dense_acc=97.0, chosen_acc=96.5))
    assert lines[0] == (f"On Test CPU 9000, ShiftAddViT does not pay as measured: {fmt_x(2.5 / 2.0)} slower than the "
                        f"dense model compiled by TVM ({fmt_ms(2.5)} ms vs {fmt_ms(2.0)} ms; the search chose it on "
                        f"predictions), {fmt_x(5.0 / 2.5)} vs PyTorch eager; accuracy −0.50 points.")
    assert lines[1] == "Chosen design: attention msa 2; linear moe 8."


def test_a_profile_measured_under_load_is_flagged_in_the_report(tmp_path):
    from dse.profiling.profiler import load_warning

    rows = [{"primitive": "matmul", "backend": "tvm", "batch": 1, "m": 8, "k": 8, "n": 8, "latency_ms": 0.1,
             "load_1m": load} for load in (0.4, 3.6, 1.0)]
    assert load_warning(rows, cores=4) is None  # 3.6 < 1.25 x 4: the profiler's own threads
    busy = load_warning(rows, cores=2)
    assert busy.startswith("the 1-min load average reached 3.6 on 2 cores while 1 of these 3 rows")
    root = _run_folder(tmp_path, bench=_bench_json({"tvm": 1.0, "dense_tvm": 1.2, "eager": 2.0}, {}),
                       pareto=[_pareto_row(0, 1.2, 1.0, "msa", "mult", baseline="all-mult")],
                       attention="hamming", linear="shift")
    (root / "profile").mkdir()
    rows_csv = root / "profile" / "model_rows.csv"
    rows_csv.write_text("primitive,backend,batch,m,k,n,latency_ms,load_1m\n"
                        + "".join(f"matmul,tvm,1,8,8,8,0.1,{r['load_1m']}\n" for r in rows))
    summary = _summary(98.0, 97.5)
    summary["stages"][0]["summary"]["load_warning"] = busy
    summary.update(profile_csv=str(rows_csv), model_rows_csv=str(rows_csv))
    _, md, _ = _verdict(root, summary)
    assert f"**Warning:** {busy}." in md
