"""scripts/launch_pod.py: host counts, validation and the dry-run command sequence (in-process;
nothing is run)."""

import importlib.util
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("launch_pod", REPO / "scripts" / "launch_pod.py")
launch_pod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_pod)

BASE = ["--config", "configs/mqar.py:model=gated_deltanet", "--tpu", "memjax-v5e-64",
        "--zone", "us-west4-a", "--accelerator-type", "v5litepod-64",
        "--workdir", "gs://my-bucket/runs/mqar", "--dry-run"]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Config specs are relative to the repository, as on the command line; nothing is run."""
    monkeypatch.chdir(REPO)

    def no_run(*args, **kwargs):
        raise AssertionError(f"a dry run ran {args}")

    monkeypatch.setattr(launch_pod.subprocess, "run", no_run)


def dry_run(capsys, *extra, base=BASE):
    commands = launch_pod.main([*base, *extra])
    lines = capsys.readouterr().out.splitlines()
    printed = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert printed == commands  # each printed line is the command, quoted to survive the shell
    return commands, [line for line in lines if line.startswith("#")]


def remote(command: list[str]) -> list[str]:
    """The words of an ssh step's --command."""
    return shlex.split(command[command.index("--command") + 1])


@pytest.mark.parametrize("accelerator, chips, hosts", [
    ("v5litepod-1", 1, 1), ("v5litepod-4", 4, 1), ("v5litepod-8", 8, 1),
    ("v5litepod-16", 16, 4), ("v5litepod-64", 64, 16), ("v5litepod-256", 256, 64),
    ("v6e-8", 8, 1), ("v6e-64", 64, 16),
    ("v4-8", 4, 1), ("v4-16", 8, 2), ("v4-32", 16, 4), ("v5p-8", 4, 1), ("v5p-128", 64, 16),
])
def test_host_counts(accelerator, chips, hosts):
    tpu = launch_pod.parse_accelerator(accelerator)
    assert (tpu.chips, tpu.hosts) == (chips, hosts)


def test_default_runtimes():
    runtimes = {g: launch_pod.parse_accelerator(f"{g}-8").rule.runtime
                for g in ("v5litepod", "v4", "v5p", "v6e")}
    assert runtimes == {"v5litepod": "v2-alpha-tpuv5-lite", "v4": "tpu-ubuntu2204-base",
                        "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


@pytest.mark.parametrize("accelerator, match", [
    ("v5litepod", "is not <generation>-<count>"),
    ("tpu-64", "is not <generation>-<count>"),
    ("v9z-64", "unknown TPU generation 'v9z'"),
    ("v5e-64", "use v5litepod-64"),
    ("v4-7", "counts TensorCores, 2 per chip"),
    ("v5litepod-18", "18 chips do not fill hosts of 4 chips"),
])
def test_bad_accelerator_types(accelerator, match):
    with pytest.raises(ValueError, match=match):
        launch_pod.parse_accelerator(accelerator)


def test_dry_run_for_a_v5e_64_slice(capsys):
    commands, notes = dry_run(capsys)
    create, archive, scp, setup, train = commands
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "memjax-v5e-64",
                      "--zone", "us-west4-a", "--accelerator-type", "v5litepod-64",
                      "--version", "v2-alpha-tpuv5-lite"]
    assert archive[:4] == ["git", "-C", str(REPO), "archive"] and archive[-1] == "HEAD"
    tarball = archive[-2].removeprefix("--output=")
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball]
    assert "--worker=all" in scp and "--zone" in scp
    assert setup[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "memjax-v5e-64"]
    version = launch_pod.pinned_jax_version()
    script = setup[setup.index("--command") + 1]
    assert remote(setup)[-1] == f"jax[tpu]=={version}"  # pinned as in constraints.txt
    assert "make setup;" in script and script.startswith("set -e;")
    # A gs:// workdir: gcsfs (epath) and google-cloud-storage (TensorBoard) installed too.
    assert "make setup; .venv/bin/pip install -q -c constraints.txt -e '.[gcs]';" in script
    assert "--worker=all" in setup and "--worker=all" in train
    words = remote(train)
    assert words[:4] == ["cd", "memjax", "&&", "MEMJAX_DISTRIBUTED=1"]
    assert words[4:10] == ["nohup", ".venv/bin/python", "scripts/train.py", "--config",
                           "configs/mqar.py:model=gated_deltanet", "--workdir"]
    assert words[10:12] == ["gs://my-bucket/runs/mqar", "--config.mesh.data=-1"]
    assert words[-1] == "&" and ">" in words  # in the background, output to a log
    assert any("64 chips on 16 host(s)" in note for note in notes)
    assert not any("warning" in note for note in notes)  # gs:// is shared storage


def test_existing_skips_creation(capsys):
    commands, _ = dry_run(capsys, "--existing")
    assert [c[:2] for c in commands] == [["git", "-C"]] + [["gcloud", "compute"]] * 3
    assert not any("create" in c for c in commands)


def test_overrides_project_and_spot(capsys):
    commands, notes = dry_run(capsys, "--set", "train.steps=500", "--set",
                              "model.mixer.num_heads=2", "--project", "my-proj", "--spot")
    words = remote(commands[-1])
    assert "--config.train.steps=500" in words and "--config.model.mixer.num_heads=2" in words
    assert "--config.mesh.data=-1" in words
    assert commands[0][-1] == "--spot"
    assert all(c[c.index("--project") + 1] == "my-proj" for c in commands if c[0] == "gcloud")


def test_mesh_override_replaces_the_default(capsys):
    commands, _ = dry_run(capsys, "--set", "mesh.data=8")
    words = remote(commands[-1])
    assert "--config.mesh.data=8" in words and "--config.mesh.data=-1" not in words


def test_local_workdir_is_warned_about(capsys):
    base = [a if a != "gs://my-bucket/runs/mqar" else "runs/mqar" for a in BASE]
    commands, notes = dry_run(capsys, base=base)
    assert any(n.startswith("# warning: --workdir runs/mqar is a local path") for n in notes)
    assert ".[gcs]" not in remote(commands[3])  # no gs:// workdir, no GCS packages


@pytest.mark.parametrize("extra, message", [
    (["--config", "configs/missing.py:model=deltanet"], "no config file at 'configs/missing.py'"),
    (["--accelerator-type", "v5e-64"], "use v5litepod-64"),
    (["--accelerator-type", "v4-7"], "must be a positive multiple of 2"),
    (["--set", "train.stepz=5"], "config.train has no field 'stepz'"),
    (["--set", "train.steps"], "expected key=value"),
    (["--set", "train.steps=-5"], "config.train.steps = -5 is out of range"),
    (["--set", "mesh.data=128"], "v5litepod-64 has 64 devices"),
    (["--config", "configs/mqar.py:modle=deltanet"], "unknown config argument 'modle'"),
])
def test_errors_name_the_problem(capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        launch_pod.main([*BASE, *extra])  # later arguments win in argparse
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_failed_step_stops_the_launch(capsys, monkeypatch):
    calls = []

    class Done:
        def __init__(self, code):
            self.returncode = code

    def fake_run(argv):
        calls.append(argv)
        return Done(1 if len(calls) == 2 else 0)

    monkeypatch.setattr(launch_pod.subprocess, "run", fake_run)
    with pytest.raises(SystemExit) as exit_info:
        launch_pod.main([a for a in BASE if a != "--dry-run"])
    assert len(calls) == 2  # create, then the failing archive; nothing after
    assert "step 2/5 (pack the repository) failed with exit code 1" in str(exit_info.value.code)
