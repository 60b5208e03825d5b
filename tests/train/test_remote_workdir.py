"""Remote workdirs (`gs://bucket/run`, `memjax.paths`): the trainer, metric writer, result and
config JSON, sweeps and reports go through etils.epath.

No network here: `gs://` is served by an in-memory fsspec file system laid out as gcsfs lays out
a bucket (`bucket/path` keys, no append), through epath's own fsspec backend. Anything that
treated the workdir as a local pathlib path would write a local `gs:` directory instead (checked
absent) and leave the in-memory bucket without the file. Orbax's arrays go through TensorStore,
which would reach the real GCS, so the trainer's checkpoints here go to a local directory; the
checkpointer with a real `gs://` directory, and GCS itself, are untested.
"""

import importlib
import json
import sys
from pathlib import Path

import fsspec
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from tensorboardX import record_writer

from memjax import paths, report, sweep
from memjax.config import load_config
from memjax.train import trainer
from memjax.train.checkpoint import Checkpointer
from memjax.train.metrics import MetricWriter, read_metrics, tensorboard_writer

REPO = Path(__file__).resolve().parents[2]


class InMemoryGCS(MemoryFileSystem):
    """`gs://` in memory: keys `bucket/path` as gcsfs has them; objects cannot be appended to."""

    protocol = ("gs", "gcs")
    root_marker = ""
    store = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.rstrip("/")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"gs:// objects cannot be appended to ({path})")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """gs:// in memory for one test (empty at the start); the test runs in an empty directory,
    where no `gs:` folder may appear."""
    from etils.epath import backend

    monkeypatch.setattr(InMemoryGCS, "store", {})
    monkeypatch.setattr(InMemoryGCS, "pseudo_dirs", [""])
    registry = importlib.import_module("fsspec.registry")._registry
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, InMemoryGCS)
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    # The client library tensorboardX needs for gs:// is not installed here; make it so anyway.
    monkeypatch.setattr(record_writer, "GCS_ENABLED", False)
    monkeypatch.chdir(tmp_path)
    yield InMemoryGCS.store
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    assert not list(tmp_path.glob("gs*")), "something wrote gs:// paths as local paths"


def test_paths():
    assert str(paths.as_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(paths.as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert str(paths.as_path(epath.Path("gs://bucket/run"))) == "gs://bucket/run"
    assert paths.as_path("runs/x").is_absolute() and str(paths.as_path("runs/x")).endswith("runs/x")
    assert paths.is_remote("s3://b/x") and not paths.is_remote("/tmp/x")
    assert paths.scheme("gs://b") == "gs" and paths.scheme("runs/gs:x") is None
    with pytest.raises(ValueError, match="ftp:// paths are not supported"):
        paths.as_path("ftp://host/run")


def test_metric_writer_rewrites_a_remote_file_and_skips_tensorboard(gcs, capsys):
    writer = MetricWriter("gs://bucket/run", resume_step=0)
    assert "warning: no TensorBoard in gs://bucket/run/tensorboard: tensorboardX needs " \
           "google-cloud-storage" in capsys.readouterr().err
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": 1.0 / step})
    writer.close()
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1, 2, 3]
    assert set(gcs) == {"bucket/run/metrics.jsonl"}  # no TensorBoard files, nothing local
    MetricWriter("gs://bucket/run", resume_step=2).close()  # a resume drops records after it
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1, 2]


def test_tensorboard_needs_a_writer_for_the_scheme(tmp_path, capsys, monkeypatch):
    assert tensorboard_writer("az://container/run/tensorboard", 0) is None
    assert "tensorboardX cannot write az://" in capsys.readouterr().err
    local = tensorboard_writer(tmp_path / "tb", 0)
    local.close()
    assert list((tmp_path / "tb").iterdir())  # a local directory still gets its event file


@pytest.mark.integration
def test_training_in_a_gs_workdir_then_reporting_it(gcs, tmp_path, capsys, monkeypatch):
    # Checkpoint arrays would go through TensorStore to the real GCS: a local directory here.
    local = tmp_path / "checkpoints"
    monkeypatch.setattr(trainer, "Checkpointer",
                        lambda directory, keep: Checkpointer(local, keep))
    config = load_config(f"{REPO}/configs/mqar.py:smoke", {
        "train.steps": 4, "train.warmup_steps": 1, "train.eval_every": 4, "train.log_every": 2})
    result = trainer.train(config, "gs://bucket/sweep/run")
    assert result["workdir"] == "gs://bucket/sweep/run" and result["step"] == 4
    assert {"bucket/sweep/run/config.json", "bucket/sweep/run/metrics.jsonl",
            "bucket/sweep/run/result.json"} <= set(gcs)
    assert json.loads(gcs["bucket/sweep/run/result.json"].getvalue())["step"] == 4
    assert [r["step"] for r in read_metrics("gs://bucket/sweep/run")] == [2, 4, 4]
    capsys.readouterr()
    assert trainer.train(config, "gs://bucket/sweep/run")["step"] == 4  # read back: complete
    assert "gs://bucket/sweep/run is already complete" in capsys.readouterr().out

    assert sweep.is_complete("gs://bucket/sweep/run")
    rows = report.write_report("gs://bucket/sweep")
    assert [row["run"] for row in rows] == ["run"] and rows[0]["steps"] == 4
    for name in ("report.md", "report.csv", "accuracy_vs_state.png"):
        assert gcs[f"bucket/sweep/{name}"].getvalue()
    assert gcs["bucket/sweep/accuracy_vs_state.png"].getvalue().startswith(b"\x89PNG")


def test_a_sweep_run_logs_to_a_remote_workdir(gcs, monkeypatch):
    monkeypatch.setattr(sweep, "command", lambda run, workdir: [
        sys.executable, "-c", f"print('training in {workdir}')"])
    run = {"name": "run", "config": "configs/mqar.py:smoke"}
    for launch in (1, 2):
        info = sweep.launch(run, "gs://bucket/sweep/run")
        assert info["returncode"] == 0 and info["launches"] == launch
    log = gcs["bucket/sweep/run/log.txt"].getvalue().decode()
    assert log == "training in gs://bucket/sweep/run\n" * 2  # appended after each run
    assert json.loads(gcs["bucket/sweep/run/sweep_run.json"].getvalue())["launches"] == 2
