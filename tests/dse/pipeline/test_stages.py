"""Stage reuse: a stage reruns when its inputs change, and when its own result asked not to be reused."""

from __future__ import annotations

from dse.config import Config
from dse.pipeline.stages import run_stage


def test_a_stage_is_reused_unless_its_key_changed_or_it_asked_for_a_rerun(tmp_path):
    runs = []

    def fn(summary):
        def run(folder):
            runs.append(folder)
            (folder / "out.txt").write_text("x")
            return summary
        return run

    cfg = Config()
    assert not run_stage("s", tmp_path, "k1", ["out.txt"], cfg, fn({})).reused
    assert run_stage("s", tmp_path, "k1", ["out.txt"], cfg, fn({})).reused
    assert not run_stage("s", tmp_path, "k2", ["out.txt"], cfg, fn({"rerun": "rows measured under load"})).reused
    assert not run_stage("s", tmp_path, "k2", ["out.txt"], cfg, fn({})).reused  # it asked: ran again
    assert run_stage("s", tmp_path, "k2", ["out.txt"], cfg, fn({})).reused
    assert len(runs) == 3
