"""Several processes: per-process batch rows, and scripts/train.py run as two CPU processes.

The slow tests start `scripts/train.py` twice on localhost (MEMJAX_COORDINATOR_ADDRESS,
MEMJAX_NUM_PROCESSES=2, MEMJAX_PROCESS_ID=0/1, one CPU device each, gloo collectives) and
compare with one process holding two devices: the same mesh (`data` = 2) and the same global
batches, so the runs agree to float rounding.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from memjax.config import load_config, to_dict
from memjax.models import build_model
from memjax.tasks import TASKS
from memjax.train import evaluators
from memjax.train import mesh as mesh_lib
from memjax.train import trainer
from memjax.train.metrics import read_metrics
from memjax.train.trainer import train

REPO = Path(__file__).resolve().parents[2]


# --- per-process rows (in this process: 8 simulated devices, conftest.py) ---

class OneProcessOf:
    """A batch sharding as process `index` of a `len(devices_per_process)`-process run sees it:
    only `addressable_devices_indices_map` is used by `process_rows`."""

    def __init__(self, sharding, devices_per_process, index):
        self.sharding = sharding
        start = sum(devices_per_process[:index])
        self.devices = set(sharding.mesh.devices.flat[start:start + devices_per_process[index]])

    def addressable_devices_indices_map(self, shape):
        return {d: i for d, i in self.sharding.devices_indices_map(shape).items()
                if d in self.devices}


@pytest.mark.parametrize("sizes, processes", [
    ({"data": 8}, 2), ({"data": 8}, 4), ({"data": 2, "fsdp": 4}, 4), ({"data": 4, "tensor": 2}, 2)])
def test_each_process_gets_its_block_of_rows(sizes, processes):
    sharding = mesh_lib.batch_sharded(mesh_lib.build_mesh(sizes))
    rows = 32
    blocks = [mesh_lib.process_rows(OneProcessOf(sharding, [8 // processes] * processes, p), rows)
              for p in range(processes)]
    share = rows // processes
    assert blocks == [slice(p * share, (p + 1) * share) for p in range(processes)]


def test_processes_that_are_tensor_replicas_get_the_same_rows():
    # One device per process: the two devices of each tensor pair (one data shard) belong to
    # two processes, which both need that shard's rows.
    sharding = mesh_lib.batch_sharded(mesh_lib.build_mesh({"data": 4, "tensor": 2}))
    assert [mesh_lib.process_rows(OneProcessOf(sharding, [1] * 8, p), 8) for p in range(8)] == \
        [slice(2 * (p // 2), 2 * (p // 2) + 2) for p in range(8)]


def test_scattered_rows_are_rejected():
    sharding = mesh_lib.batch_sharded(mesh_lib.build_mesh({"data": 4}))

    class Scattered(OneProcessOf):
        def __init__(self):
            self.sharding = sharding
            self.devices = {sharding.mesh.devices.flat[0], sharding.mesh.devices.flat[2]}

    with pytest.raises(ValueError, match="not one contiguous block"):
        mesh_lib.process_rows(Scattered(), 8)


def test_one_process_hands_over_the_whole_batch():
    sharding = mesh_lib.batch_sharded(mesh_lib.build_mesh({"data": 4}))
    batch = {"inputs": np.arange(32, dtype=np.int32).reshape(8, 4),
             "mask": np.ones((8, 4), np.float32)}
    assert mesh_lib.process_rows(sharding, 8) == slice(0, 8)
    placed = mesh_lib.global_batch(batch, sharding)
    for name, value in batch.items():
        assert placed[name].sharding == sharding and placed[name].shape == value.shape
        np.testing.assert_array_equal(np.asarray(placed[name]), value)
        assert placed[name].addressable_shards[1].data.shape == (2, 4)


def test_a_process_hands_over_its_block_of_rows():
    # One process holds every row, so its block is the whole batch: `rows=B` takes the block
    # as generated (memjax.tasks.data.with_rows) instead of cutting it from the whole batch.
    sharding = mesh_lib.batch_sharded(mesh_lib.build_mesh({"data": 4}))
    batch = {"inputs": np.arange(32, dtype=np.int32).reshape(8, 4)}
    placed = mesh_lib.global_batch(batch, sharding, rows=8)
    assert placed["inputs"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(placed["inputs"]), batch["inputs"])
    with pytest.raises(ValueError, match="holds rows 0:16 of the 16-row batch but was given 8"):
        mesh_lib.global_batch(batch, sharding, rows=16)


def smoke():
    return load_config("configs/mqar.py:smoke", {"train.steps": 10})


def test_evaluation_with_the_widths_of_several_processes(monkeypatch):
    # Several processes size the supervised width from each slice's declared count
    # (memjax.train.step.prepare_rows); MQAR's is every batch's own, so the metrics (test
    # accuracy and the probe, a short last batch included: 64 = 24 + 24 + 16) are the same.
    config = smoke()
    config.task.eval_batch_size = 24
    task = TASKS.get(config.task.name)(config.task, config.seed)
    model = build_model(to_dict(config.model))
    params = model.init(jax.random.key(0), np.zeros((1, task.sample_length), np.int32))["params"]
    sharding = mesh_lib.batch_sharded(mesh_lib.build_mesh({"data": 8}))

    def evaluate():
        return evaluators.build_evaluators(None, task, model, 24, sharding)(params)

    one = evaluate()
    assert "probe/swapped_accuracy" in one
    monkeypatch.setattr(evaluators.jax, "process_count", lambda: 2)
    assert evaluate() == one


def test_batch_not_divisible_by_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match=r"task.batch_size = 16 is not divisible by the 3 processes"):
        train(smoke(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mesh_must_reach_every_process(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.jax, "process_count", lambda: 2)  # all 8 devices are process 0's
    with pytest.raises(ValueError, match=r"no device of process\(es\) \[1\] of 2.*mesh.data=-1"):
        train(smoke(), tmp_path / "run")


def test_one_process_agrees_with_itself():
    assert trainer._agreed_signal(None) is None
    assert trainer._agreed_signal("SIGTERM") == "SIGTERM on process 0"


# --- scripts/train.py as two processes ---

STEPS = 40
OVERRIDES = {"train.steps": STEPS, "train.log_every": 2, "train.eval_every": 20,
             "train.checkpoint_every": 10, "mesh.data": -1}
TIMEOUT = 600  # seconds per run, on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(workdir: Path, processes: int, devices: int) -> list[subprocess.Popen]:
    """`processes` copies of scripts/train.py on `workdir`, each with `devices` CPU devices;
    each one's stdout and stderr go to `workdir.<p>.out` and `workdir.<p>.err`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMJAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if processes > 1:
        env.update(MEMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
                   MEMJAX_NUM_PROCESSES=str(processes))
    argv = [sys.executable, "scripts/train.py", "--config=configs/mqar.py:smoke",
            f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
    children = []
    for p in range(processes):
        extra = {"MEMJAX_PROCESS_ID": str(p)} if processes > 1 else {}
        with open(f"{workdir}.{p}.out", "w") as out, open(f"{workdir}.{p}.err", "w") as err:
            children.append(subprocess.Popen(argv, cwd=REPO, env={**env, **extra},
                                             stdout=out, stderr=err))
    return children


def wait(children, workdir: Path) -> list[tuple[int, str, str]]:
    """`(exit code, stdout, stderr)` of each child; any still running at the deadline (or
    when this fails) is killed."""
    deadline = time.monotonic() + TIMEOUT
    try:
        for child in children:
            child.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return [(child.returncode, Path(f"{workdir}.{p}.out").read_text(),
             Path(f"{workdir}.{p}.err").read_text()) for p, child in enumerate(children)]


def run(workdir: Path, processes: int, devices: int) -> list[tuple[int, str, str]]:
    return wait(launch(workdir, processes, devices), workdir)


def assert_finished(outcomes):
    for p, (code, out, err) in enumerate(outcomes):
        assert code == 0, f"process {p} exited with {code}:\n{err[-3000:]}"
    # Only process 0 prints the result (and writes the files).
    assert [f"step {STEPS} (stopped by steps)" in out for _, out, _ in outcomes] == \
        [True] + [False] * (len(outcomes) - 1)


def deterministic(workdir):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(workdir)]


def assert_same_run(workdir, reference, rtol=1e-5):
    """Metrics and final results equal the reference run's to float rounding."""
    got, want = deterministic(workdir), deterministic(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=rtol, atol=1e-6)
    result, expected = (json.loads((w / "result.json").read_text()) for w in (workdir, reference))
    metrics = [k for k in expected if k.startswith(("test/", "probe/"))]
    assert metrics and result["step"] == expected["step"] == STEPS
    np.testing.assert_allclose([result[k] for k in metrics], [expected[k] for k in metrics],
                               atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, two devices: the run the two-process runs must reproduce."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    assert_finished(run(workdir, processes=1, devices=2))
    return workdir


@pytest.mark.slow
def test_two_processes_train_like_one(reference, tmp_path):
    workdir = tmp_path / "two"
    assert_finished(run(workdir, processes=2, devices=1))
    assert_same_run(workdir, reference)
    # One writer: one TensorBoard event file (each writer makes its own), and each metrics
    # record once (assert_same_run compares the records with the one-process run's).
    assert len(list((workdir / "tensorboard").iterdir())) == 1
    assert os.listdir(workdir / "checkpoints") and \
        sorted(os.listdir(workdir / "checkpoints")) == sorted(os.listdir(reference / "checkpoints"))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_then_resumes(reference, tmp_path):
    workdir = tmp_path / "two"
    children = launch(workdir, processes=2, devices=1)
    try:
        # The first metrics record: both processes are in the loop, their handlers installed.
        deadline = time.monotonic() + TIMEOUT
        while not ((workdir / "metrics.jsonl").exists()
                   and (workdir / "metrics.jsonl").read_text().strip()):
            assert time.monotonic() < deadline and all(c.poll() is None for c in children)
            time.sleep(0.05)
        children[1].send_signal(signal.SIGTERM)
    finally:
        outcomes = wait(children, workdir)
    stops = []
    for p, (code, _, err) in enumerate(outcomes):
        assert code == 143, f"process {p} exited with {code}:\n{err[-3000:]}"
        stops.append(int(re.search(r"SIGTERM on process 1 at step (\d+): saved checkpoint",
                                   err).group(1)))
    assert stops[0] == stops[1] < STEPS
    assert str(stops[0]) in os.listdir(workdir / "checkpoints")
    assert not (workdir / "result.json").exists()

    # The saved checkpoint restores under another process count: one process, one device.
    shutil.copytree(workdir, tmp_path / "one")
    assert_finished(run(tmp_path / "one", processes=1, devices=1))
    assert_same_run(tmp_path / "one", reference, rtol=1e-4)
    # And resumes with the two processes that wrote it, as if never interrupted.
    assert_finished(run(workdir, processes=2, devices=1))
    assert_same_run(workdir, reference)
