"""Tests for the induction-head task: trigger, target, label, vocabulary, seeds, slices, errors."""

import numpy as np
import pytest
from task_checks import (
    assert_builder_follows_config,
    assert_example_is_pure,
    assert_smoke_training,
    task_config,
)

from memjax.tasks import TASKS, induction
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.induction import InductionSettings, make_example

V = 32


@pytest.mark.parametrize("seq_len,vocab_size", [(128, V), (3, 3), (16, 5), (1000, 200)])
def test_example(seq_len, vocab_size):
    s = InductionSettings(seq_len, 10, vocab_size)
    trigger = vocab_size - 1
    assert induction.trigger_token(vocab_size) == trigger
    trigger_positions = set()
    for index in range(30):
        ex = make_example(s, 2, index)
        inputs, labels = ex["inputs"], ex["labels"]
        assert inputs.shape == labels.shape == (seq_len,)
        assert inputs.dtype == labels.dtype == np.int32
        assert np.all((inputs >= 0) & (inputs <= trigger))
        (where,) = np.nonzero(inputs == trigger)
        assert len(where) == 2 and where[1] == seq_len - 1  # once inside, once at the end
        p = int(where[0])
        assert p <= seq_len - 3  # the target follows the trigger, before the final trigger
        trigger_positions.add(p)
        (supervised,) = np.nonzero(labels != IGNORE_INDEX)
        assert supervised.tolist() == [seq_len - 1]
        assert labels[-1] == inputs[p + 1] and labels[-1] != trigger
    if seq_len > 3:
        assert len(trigger_positions) > 1


def test_trigger_position_and_target_are_uniform():
    s = InductionSettings(8, 10, 6)
    n = 3000
    positions, targets = [], []
    for index in range(n):
        ex = make_example(s, 0, index)
        positions.append(int(np.argmax(ex["inputs"] == 5)))
        targets.append(int(ex["labels"][-1]))
    np.testing.assert_allclose(np.bincount(positions, minlength=6) / n, 1 / 6, atol=0.03)
    np.testing.assert_allclose(np.bincount(targets, minlength=5) / n, 1 / 5, atol=0.03)


def test_example_is_pure_function_of_seed_and_index():
    assert_example_is_pure(make_example, InductionSettings(64, 10, V))


def test_settings():
    assert InductionSettings(256, 10, V).name == "T256"
    assert InductionSettings(np.int32(16), 10, V) == InductionSettings(16, 10, V)


@pytest.mark.parametrize("args,param", [
    ((2, 10, V), "seq_len"),
    ((16, 0, V), "num_examples"),
    ((16, 10, 2), "vocab_size"),
    (("16", 10, V), "seq_len"),
])
def test_impossible_settings_raise(args, param):
    with pytest.raises(ValueError, match=param):
        InductionSettings(*args)


def test_builder():
    cfg = task_config("induction", vocab_size=V, train_slices=((16, 40), (32, 24)),
                      test_slices=((16, 9), (64, 5)), batch_size=8, eval_batch_size=4)
    assert_builder_follows_config(
        cfg, [InductionSettings(16, 40, V), InductionSettings(32, 24, V)],
        [InductionSettings(16, 9, V), InductionSettings(64, 5, V)], make_example)


def test_builder_errors_name_the_entry():
    cfg = task_config("induction", vocab_size=V, train_slices=((16, 40), (2, 40)),
                      test_slices=((16, 9),), batch_size=8, eval_batch_size=4)
    with pytest.raises(ValueError, match=r"task.train_slices\[1\] = \(2, 40\): seq_len"):
        TASKS.get("induction")(cfg, 0)
    cfg.train_slices = ((16, 40, 3),)
    with pytest.raises(ValueError, match=r"expected \(seq_len, num_examples\)"):
        TASKS.get("induction")(cfg, 0)


@pytest.mark.integration
def test_smoke_training(tmp_path):
    result = assert_smoke_training("configs/induction.py:smoke", tmp_path)
    assert {"test/T16/accuracy", "test/T32/accuracy"} <= set(result)
