"""Trainer: exact resume, completion, preemption save, bad inputs, data parallelism, aux losses."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import flax.linen as nn
import jax.numpy as jnp

from memjax.config import load_config
from memjax.layers import MIXERS, initializers
from memjax.train.checkpoint import CheckpointError, Checkpointer
from memjax.train.metrics import read_metrics
from memjax.train.trainer import Preempted, TrainingDiverged, train

# Every test here runs the trainer end to end (make test-integration).
pytestmark = pytest.mark.integration

# Checkpoints every 7 steps and logs every 5, so a resume lands inside a logging window.
SMOKE = {"train.steps": 20, "train.checkpoint_every": 7, "train.log_every": 5,
         "train.eval_every": 10, "train.keep_checkpoints": 2}


def smoke_config(**overrides):
    return load_config("configs/mqar.py:smoke", SMOKE | overrides)


class Crash(Exception):
    pass


def crash_at(step_to_crash):
    def hook(step, state):
        if step == step_to_crash:
            raise Crash(f"simulated crash at step {step}")
    return hook


def deterministic_metrics(workdir):
    """metrics.jsonl without timing entries, which differ between any two runs."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(workdir)]


def final_params(workdir):
    from memjax.train.checkpoint import Checkpointer
    checkpoints = Checkpointer(workdir / "checkpoints", keep=2)
    step = checkpoints.latest_step()
    state = checkpoints.read_state(step)
    checkpoints.close()
    return step, state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    result = train(smoke_config(), workdir)
    return workdir, result


def as_numpy(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def assert_same_run(workdir_a, workdir_b, result_a, result_b):
    step_a, state_a = final_params(workdir_a)
    step_b, state_b = final_params(workdir_b)
    assert step_a == step_b == 20
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(as_numpy(a), as_numpy(b)), state_a, state_b)
    assert deterministic_metrics(workdir_a) == deterministic_metrics(workdir_b)
    keys = [k for k in result_a if k.startswith("test/")]
    assert keys and all(result_a[k] == result_b[k] for k in keys)


def test_crash_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    workdir_a, result_a = uninterrupted
    with pytest.raises(Crash):
        train(smoke_config(), tmp_path, hooks=[crash_at(17)])  # last checkpoint: step 14
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["14", "7"]
    result_b = train(smoke_config(), tmp_path)
    assert_same_run(workdir_a, tmp_path, result_a, result_b)


main_thread_only = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be installed from the main thread")


@pytest.fixture
def sentinel_handler():
    """A SIGTERM handler of the caller's: the trainer must put it back when it returns."""
    def handler(signum, frame):
        raise AssertionError("the trainer's handler should have caught this signal")

    previous = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, previous)


def sigterm_at(step_to_signal):
    def hook(step, state):
        if step == step_to_signal:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


@main_thread_only
@pytest.mark.parametrize("at", [12, 14])  # 14: a checkpoint step (checkpoint_every = 7)
def test_sigterm_saves_once_then_resume_equals_uninterrupted(uninterrupted, tmp_path, at,
                                                             sentinel_handler):
    workdir_a, result_a = uninterrupted
    with pytest.raises(Preempted, match=f"SIGTERM at step {at}: saved checkpoint"):
        train(smoke_config(), tmp_path, hooks=[sigterm_at(at)])
    assert str(at) in os.listdir(tmp_path / "checkpoints")
    assert signal.getsignal(signal.SIGTERM) is sentinel_handler
    result_b = train(smoke_config(), tmp_path)
    assert_same_run(workdir_a, tmp_path, result_a, result_b)


@main_thread_only
def test_sigterm_during_a_checkpoint_save_is_clean(uninterrupted, tmp_path, monkeypatch,
                                                   sentinel_handler):
    workdir_a, result_a = uninterrupted
    save = Checkpointer.save

    def save_then_signal(self, step, state, extras):
        save(self, step, state, extras)
        if step == 7:  # lands while step 7 (a checkpoint step) is being saved
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Checkpointer, "save", save_then_signal)
    with pytest.raises(Preempted, match="SIGTERM at step 7"):
        train(smoke_config(), tmp_path)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is sentinel_handler
    result_b = train(smoke_config(), tmp_path)
    assert_same_run(workdir_a, tmp_path, result_a, result_b)


def test_completed_run_is_reported_not_retrained(uninterrupted, capsys):
    workdir, result = uninterrupted
    before = (workdir / "metrics.jsonl").read_text()
    again = train(smoke_config(), workdir)
    assert "already complete" in capsys.readouterr().out
    assert again == result
    assert (workdir / "metrics.jsonl").read_text() == before


def test_result_reports_per_segment_accuracy_and_state_size(uninterrupted):
    workdir, result = uninterrupted
    assert set(result) >= {"test/T16_K2/accuracy", "test/T32_K4/accuracy", "test/accuracy",
                           "state_size_bytes", "num_params"}
    assert json.loads((workdir / "result.json").read_text()) == result
    # Attention's state is its KV cache at the training length (16) plus the conv buffers, and
    # an int32 position count per attention layer and for the model.
    d, layers, conv = 16, 2, 4
    assert result["state_size_bytes"] == 4 + layers * (2 * d * 16 * 4 + 4 + (conv - 1) * d * 4)


def test_recall_probe_is_logged_beside_test_accuracy(uninterrupted):
    workdir, result = uninterrupted
    probe = {"probe/T16_K2/swapped_accuracy", "probe/T16_K2/original_accuracy",
             "probe/T32_K4/swapped_accuracy", "probe/T32_K4/original_accuracy",
             "probe/swapped_accuracy", "probe/original_accuracy"}
    assert set(result) >= probe and all(0 <= result[k] <= 1 for k in probe)
    evaluations = [r for r in read_metrics(workdir) if "test/accuracy" in r]
    assert len(evaluations) == 2 and all(set(r) >= probe for r in evaluations)


def snapshot(directory):
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in directory.rglob("*") if p.is_file()}


def test_train_step_compiles_once_across_metric_reads(tmp_path, caplog):
    """Each log step reads and renews the on-device metric buffer; the step must not compile
    again for the renewed buffer (it did once: ~5 s per run, 9% of a 90-step `make run` config run)."""
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        train(smoke_config(), tmp_path)  # 20 steps, 4 metric reads
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(compiles) == 1


def test_incompatible_checkpoint_is_rejected_and_kept(tmp_path):
    with pytest.raises(Crash):
        train(smoke_config(), tmp_path, hooks=[crash_at(8)])
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.d_model: checkpoint has 16, config has 32"):
        train(smoke_config(**{"model.d_model": 32}), tmp_path)
    assert snapshot(tmp_path) == before


def corrupt(checkpoint_dir):
    """Overwrites the array files of one checkpoint (its metadata stays readable)."""
    for f in (checkpoint_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
            f.write_bytes(b"garbage")


def test_corrupt_checkpoint_is_reported(tmp_path):
    with pytest.raises(Crash):
        train(smoke_config(), tmp_path, hooks=[crash_at(8)])
    corrupt(tmp_path / "checkpoints" / "7")
    with pytest.raises(CheckpointError, match="checkpoints/7.*\n.*No older checkpoint is readable"):
        train(smoke_config(), tmp_path)


def test_corrupt_latest_checkpoint_names_the_previous_one_then_falls_back(uninterrupted, tmp_path):
    workdir_a, result_a = uninterrupted
    with pytest.raises(Crash):
        train(smoke_config(), tmp_path, hooks=[crash_at(15)])  # checkpoints 7 and 14
    corrupt(tmp_path / "checkpoints" / "14")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=(
            r"checkpoints/14 .*\n.*newest readable checkpoint is \S+/checkpoints/7 \(step 7\)"
            r".*--config.train.restore_fallback=True")):
        train(smoke_config(), tmp_path)
    assert snapshot(tmp_path) == before
    result_b = train(smoke_config(**{"train.restore_fallback": True}), tmp_path)
    assert (tmp_path / "unreadable_checkpoints" / "14").is_dir()
    assert_same_run(workdir_a, tmp_path, result_a, result_b)


def test_corrupt_checkpoint_exits_with_the_message_only(tmp_path):
    """scripts/train.py: exit code 2 and the message, no tracebacks (Orbax's event loop)."""
    with pytest.raises(Crash):
        train(smoke_config(), tmp_path, hooks=[crash_at(15)])
    corrupt(tmp_path / "checkpoints" / "14")
    overrides = [f"--config.{k}={v}" for k, v in SMOKE.items()]
    run = subprocess.run([sys.executable, "scripts/train.py", "--config=configs/mqar.py:smoke",
                          f"--workdir={tmp_path}", *overrides],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "newest readable checkpoint" in run.stderr
    assert "Traceback" not in run.stderr and "Event loop is closed" not in run.stderr, run.stderr


def test_non_finite_loss_stops_without_saving(tmp_path):
    config = smoke_config(**{"train.lr": 1000.0, "train.grad_clip": 0.0,  # the largest valid lr
                             "train.checkpoint_every": 1})
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(\S+\) at step (\d+)") as info:
        train(config, tmp_path)
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved and max(saved) == bad_step - 1
    assert not (tmp_path / "result.json").exists()


@pytest.mark.parametrize("segment, problem", [
    ((16, 5, 512), "num_pairs"),
    ((15, 2, 512), "seq_len"),
    ((16, 2, 8), "batch"),
])
def test_impossible_mqar_settings_fail_before_writing(tmp_path, segment, problem):
    config = smoke_config(**{"task.train_segments": (segment,)})
    with pytest.raises(ValueError, match=problem):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_vocab_smaller_than_length_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"task.train_segments\[0\].*vocab_size"):
        train(smoke_config(**{"task.vocab_size": 16}), tmp_path / "run")


def test_data_parallel_on_8_devices_matches_one_device(tmp_path):
    assert jax.device_count() >= 8
    overrides = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 6,
                 "train.checkpoint_every": 6}
    seen = {}

    def record_sharding(step, state):
        seen[step] = jax.tree.leaves(state.params)[0].sharding.mesh.devices.size

    one = train(smoke_config(**overrides, **{"mesh.data": 1}), tmp_path / "one")
    eight = train(smoke_config(**overrides, **{"mesh.data": 8}), tmp_path / "eight",
                  hooks=[record_sharding])
    assert set(seen.values()) == {8}
    losses_one = [r["train/loss"] for r in read_metrics(tmp_path / "one") if "train/loss" in r]
    losses_eight = [r["train/loss"] for r in read_metrics(tmp_path / "eight") if "train/loss" in r]
    assert len(losses_one) == 6
    np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
    assert abs(one["test/accuracy"] - eight["test/accuracy"]) < 1e-6


def test_batch_not_divisible_by_devices(tmp_path):
    with pytest.raises(ValueError, match=r"task.batch_size = 16 is not divisible by the 3 devices"):
        train(smoke_config(**{"mesh.data": 3}), tmp_path / "run")


class SowsPenalty(nn.Module):
    """A test mixer: a Dense map whose output's mean square is sown as the loss `penalty`."""

    d_model: int

    @nn.compact
    def __call__(self, x, cache=None):
        y = initializers.dense(self.d_model, "proj")(x)
        self.sow("losses", "penalty", jnp.mean(jnp.square(y)))
        self.sow("metrics", "rms", jnp.sqrt(jnp.mean(jnp.square(y))))
        return y if cache is None else (y, cache)

    def init_cache(self, batch_size, max_len):
        return {}

    def state_size(self, seq_len):
        return 0


@pytest.fixture
def sowing_mixer():
    MIXERS.register("test_sows_penalty")(SowsPenalty)
    yield "test_sows_penalty"
    MIXERS._entries.pop("test_sows_penalty")  # keep other tests' view of the registry intact


def test_sown_loss_changes_training_and_is_logged(sowing_mixer, tmp_path, capsys):
    def run(weight, name):
        config = load_config(f"configs/mqar.py:smoke,model={sowing_mixer}",
                             SMOKE | {"train.steps": 10, "train.aux_loss_weights": f"penalty={weight}",
                                      "train.progress_bar": True})
        train(config, tmp_path / name)
        return read_metrics(tmp_path / name)

    weighted, ignored = run(10.0, "weighted"), run(0.0, "ignored")
    logged = [r for r in weighted if "train/loss" in r]
    assert [r["step"] for r in logged] == [5, 10]
    aux = {k for k in logged[0] if k.startswith("train/aux/")}
    assert {k.rsplit("/", 1)[-1] for k in aux} == {"penalty", "rms"} and len(aux) == 4  # 2 layers
    assert all(r[k] > 0 for r in logged for k in aux)
    # The penalty pulls the mixers' outputs down only when it is weighted.
    penalty = [k for k in aux if k.endswith("penalty")][0]
    assert logged[-1][penalty] < [r for r in ignored if penalty in r][-1][penalty]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and all(line.startswith(("step 5/10 loss", "step 10/10 loss"))
                                   for line in lines)  # one line per log step, no bar


def test_evals_from_config_replace_the_task_defaults(tmp_path):
    config = smoke_config(**{"train.steps": 10})
    with config.unlocked():
        config.evals = {"held_out": {"type": "accuracy"}}
    result = train(config, tmp_path)
    assert "held_out/accuracy" in result and "held_out/T16_K2/accuracy" in result
    assert not any(k.startswith(("test/", "probe/")) for k in result)
    config.evals = {"held_out": {"type": "mse"}}
    with pytest.raises(ValueError, match=r"evals.held_out \(type 'mse'\): .*loss mse"):
        train(config, tmp_path / "bad")


def strip_model_settings(checkpoint_dir, names):
    """Rewrites a checkpoint's saved config as code older than the settings `names` wrote it."""
    extras_file = checkpoint_dir / "extras" / "metadata"  # Orbax JsonSave's file
    extras = json.loads(extras_file.read_text())
    extras["model"] = {k: v for k, v in extras["model"].items() if k not in names}
    extras_file.write_text(json.dumps(extras))


def test_checkpoint_from_before_a_setting_existed_resumes_with_its_legacy_value(tmp_path):
    """A saved config without model.layers/mixers/stack_short_convs reads as the code that wrote
    it behaved (no per-layer pattern, the block convolution stacked on a mixer's own)."""
    legacy = smoke_config(**{"model.stack_short_convs": True})
    with pytest.raises(Crash):
        train(legacy, tmp_path, hooks=[crash_at(8)])
    strip_model_settings(tmp_path / "checkpoints" / "7", {"layers", "mixers", "stack_short_convs"})
    with pytest.raises(CheckpointError,
                       match=r"model\.stack_short_convs: checkpoint has True, config has False"):
        train(smoke_config(), tmp_path)
    assert train(legacy, tmp_path)["step"] == SMOKE["train.steps"]


def test_checkpoint_resumes_under_another_operator_form(tmp_path):
    """impl and chunk_size say how a mixer computes, not what: a checkpoint resumes with other
    values, or written before the mixer had them."""
    with pytest.raises(Crash):
        train(smoke_config(), tmp_path, hooks=[crash_at(8)])
    extras_file = tmp_path / "checkpoints" / "7" / "extras" / "metadata"
    extras = json.loads(extras_file.read_text())
    del extras["model"]["mixer"]["impl"]
    extras_file.write_text(json.dumps(extras))
    other_form = smoke_config(**{"model.mixer.impl": "reference", "model.mixer.chunk_size": 8})
    assert train(other_form, tmp_path)["step"] == SMOKE["train.steps"]
