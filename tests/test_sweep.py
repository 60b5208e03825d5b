"""Sweeps run a study's grid, skip finished runs, and reports tabulate them."""

import csv

from memjax.report import write_report
from memjax.sweep import load_study, run_sweep

STUDY = '''
def runs(preset):
    steps = {"tiny": 4, "small": 6}[preset]
    return [{"name": f"{mixer}", "config": f"configs/mqar.py:model={mixer},smoke",
             "overrides": {"train.steps": steps, "train.warmup_steps": 1, "train.eval_every": steps}}
            for mixer in ("attention", "linear_attention")]
'''


def test_sweep_runs_missing_runs_then_reports(tmp_path, capsys):
    study = tmp_path / "study.py"
    study.write_text(STUDY)
    assert [r["name"] for r in load_study(str(study), "tiny")] == ["attention", "linear_attention"]
    sweep_dir = tmp_path / "sweep"
    infos = run_sweep(str(study), sweep_dir, "tiny", parallel=2)
    assert sorted(i["returncode"] for i in infos) == [0, 0]
    assert run_sweep(str(study), sweep_dir, "tiny") == []  # everything finished: nothing to run
    assert "2 complete, 0 to run" in capsys.readouterr().out

    rows = write_report(sweep_dir, tmp_path / "report")
    assert [r["mixer"] for r in rows] == ["attention", "linear_attention"]
    assert all(r["steps"] == 4 and 0 <= r["accuracy"] <= 1 and r["state_bytes"] > 0 for r in rows)
    with open(tmp_path / "report" / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "report" / "accuracy_vs_state.png").stat().st_size > 0
    assert "| attention |" in (tmp_path / "report" / "report.md").read_text()


def test_dry_run_prints_commands_without_running(tmp_path, capsys):
    study = tmp_path / "study.py"
    study.write_text(STUDY)
    run_sweep(str(study), tmp_path / "sweep", "small", dry_run=True)
    out = capsys.readouterr().out
    assert "--config.train.steps=6" in out and not (tmp_path / "sweep").exists()
