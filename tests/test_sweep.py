"""Sweeps run a study's grid, skip finished runs, and reports tabulate them."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memjax.report import write_report
from memjax.config import load_config
from memjax.sweep import load_study, load_study_module, run_sweep

STUDY = '''
def runs(preset):
    steps = {"tiny": 4, "small": 6}[preset]
    return [{"name": f"{mixer}", "config": f"configs/mqar.py:model={mixer},smoke",
             "overrides": {"train.steps": steps, "train.warmup_steps": 1, "train.eval_every": steps}}
            for mixer in ("attention", "linear_attention")]
'''


@pytest.mark.integration
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


def test_only_selects_and_orders_runs(tmp_path, capsys):
    study = tmp_path / "study.py"
    study.write_text(STUDY)
    run_sweep(str(study), tmp_path / "sweep", "small", dry_run=True,
              only=("linear_attention", "attention"))
    commands = [line for line in capsys.readouterr().out.splitlines() if "--workdir" in line]
    assert ["model=linear_attention" in commands[0], "model=attention," in commands[1]] == [True, True]
    with pytest.raises(ValueError, match="no run.*'gla'.*its runs: attention, linear_attention"):
        run_sweep(str(study), tmp_path / "sweep", "small", dry_run=True, only=("gla",))


KILLABLE_STUDY = '''
def runs(preset):
    overrides = {"train.steps": 1000, "train.warmup_steps": 1, "train.eval_every": 1000,
                 "train.checkpoint_every": 20, "train.log_every": 20}
    return [{"name": name, "config": "configs/mqar.py:smoke", "overrides": overrides}
            for name in ("first", "second")]
'''


@pytest.mark.integration
def test_killed_sweep_resumes_only_missing_runs(tmp_path):
    """SIGTERM mid-run: the running run checkpoints, the restart finishes only what is missing."""
    study, sweep_dir = tmp_path / "study.py", tmp_path / "sweep"
    study.write_text(KILLABLE_STUDY)
    cmd = [sys.executable, "scripts/sweep.py", str(study), "--sweep-dir", str(sweep_dir)]
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((sweep_dir / "second" / "checkpoints").glob("[0-9]*")):
        assert sweep.poll() is None and time.time() < deadline, sweep.communicate()[0]
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode != 0 and "stopped by SIGTERM" in out
    assert (sweep_dir / "first" / "result.json").exists()
    assert not (sweep_dir / "second" / "result.json").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 complete, 1 to run" in again.stdout
    launches = {name: json.loads((sweep_dir / name / "sweep_run.json").read_text())["launches"]
                for name in ("first", "second")}
    assert launches == {"first": 1, "second": 2}
    assert "resumed from" in (sweep_dir / "second" / "log.txt").read_text()
    assert json.loads((sweep_dir / "second" / "result.json").read_text())["step"] == 1000


# Only sweep studies (a runs() grid); standalone scripts such as experiments/hippo_approx.py are skipped.
@pytest.mark.parametrize("study", sorted(p for p in Path("experiments").glob("*.py") if "\ndef runs(" in p.read_text()),
                         ids=lambda p: p.stem)
def test_every_study_run_is_a_valid_config(study):
    """Each study names its presets; every run of every preset loads (keys and types checked)."""
    presets = load_study_module(study).PRESETS
    for preset in presets:
        for run in load_study(str(study), preset):
            load_config(run["config"], {k: v for k, v in run.get("overrides", {}).items()})
    with pytest.raises(ValueError, match="unknown preset"):
        load_study(str(study), "no-such-preset")
