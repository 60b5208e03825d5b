"""Tests for copying and selective copying: layout, labels, vocabulary, seeds, slices, errors."""

import numpy as np
import pytest
from task_checks import (
    assert_builder_follows_config,
    assert_example_is_pure,
    assert_smoke_training,
    task_config,
)

from memjax.config import load_config
from memjax.tasks import TASKS, copying
from memjax.tasks.copying import BLANK, CopySettings
from memjax.tasks.data import IGNORE_INDEX

V = 16
MAKERS = {"copy": copying.make_copy_example, "selective_copy": copying.make_selective_copy_example}


@pytest.mark.parametrize("seq_len,num_tokens,vocab_size",
                         [(64, 16, V), (32, 16, V), (2, 1, 4), (100, 7, 50)])
def test_copy_example(seq_len, num_tokens, vocab_size):
    s = CopySettings(seq_len, num_tokens, 10, vocab_size)
    sep = vocab_size - 1
    for index in range(20):
        ex = copying.make_copy_example(s, 3, index)
        inputs, labels = ex["inputs"], ex["labels"]
        assert inputs.shape == labels.shape == (seq_len,)
        assert inputs.dtype == labels.dtype == np.int32
        data_tokens = inputs[:num_tokens]
        assert np.all((data_tokens >= 1) & (data_tokens < sep))
        # delay of blanks, then one separator, then the copy fed back (teacher forcing)
        start = seq_len - num_tokens
        assert np.all(inputs[num_tokens:start] == BLANK)
        assert inputs[start] == sep and np.sum(inputs == sep) == 1
        np.testing.assert_array_equal(inputs[start + 1:], data_tokens[:-1])
        # labels: the data tokens, in order, exactly on the last L positions
        assert np.all(labels[:start] == IGNORE_INDEX)
        np.testing.assert_array_equal(labels[start:], data_tokens)
        # the next-token target: the label at p is what the copy puts at p + 1
        np.testing.assert_array_equal(labels[start:-1], inputs[start + 1:])


@pytest.mark.parametrize("seq_len,num_tokens,vocab_size", [(64, 8, V), (16, 8, V), (2, 1, 4)])
def test_selective_copy_example(seq_len, num_tokens, vocab_size):
    s = CopySettings(seq_len, num_tokens, 10, vocab_size)
    marker = vocab_size - 1
    first_positions = set()
    for index in range(50):
        ex = copying.make_selective_copy_example(s, 3, index)
        inputs, labels = ex["inputs"], ex["labels"]
        assert inputs.shape == labels.shape == (seq_len,)
        assert inputs.dtype == labels.dtype == np.int32
        region = inputs[: seq_len - num_tokens]
        (where,) = np.nonzero(region != BLANK)
        assert len(where) == num_tokens  # exactly L data tokens among blanks
        tokens = region[where]
        assert np.all((tokens >= 1) & (tokens < marker))
        assert np.all(inputs[seq_len - num_tokens:] == marker)
        assert np.all(labels[: seq_len - num_tokens] == IGNORE_INDEX)
        np.testing.assert_array_equal(labels[seq_len - num_tokens:], tokens)  # in order
        first_positions.add(int(where[0]))
    if seq_len > 2 * num_tokens:
        assert len(first_positions) > 1  # the positions are random


def test_data_tokens_cover_the_data_range():
    s = CopySettings(64, 16, 10, V)
    tokens = np.concatenate([copying.make_copy_example(s, 0, i)["inputs"][:16] for i in range(50)])
    assert set(tokens.tolist()) == set(range(1, V - 1))


@pytest.mark.parametrize("task", list(MAKERS))
def test_examples_are_pure_functions_of_seed_and_index(task):
    assert_example_is_pure(MAKERS[task], CopySettings(32, 8, 10, V))


def test_settings_name_and_normalisation():
    assert CopySettings(256, 16, 10, V).name == "T256_L16"
    assert CopySettings(np.int64(64), 8, 10, V) == CopySettings(64, 8, 10, V)
    assert type(CopySettings(np.int64(64), 8, 10, V).seq_len) is int


@pytest.mark.parametrize("args,param", [
    ((31, 16, 10, V), "num_tokens"),  # more tokens than fit: 2L > T
    ((32, 0, 10, V), "num_tokens"),
    ((32, 8, 0, V), "num_examples"),
    ((32, 8, 10, 3), "vocab_size"),
    ((32.0, 8, 10, V), "seq_len"),
    ((32, True, 10, V), "num_tokens"),
])
def test_impossible_settings_raise(args, param):
    with pytest.raises(ValueError, match=param):
        CopySettings(*args)


@pytest.mark.parametrize("task", list(MAKERS))
def test_builder(task):
    cfg = task_config(task, vocab_size=V, train_slices=((16, 4, 40), (24, 6, 20)),
                      test_slices=((16, 4, 10), (32, 8, 7)), batch_size=8, eval_batch_size=4)
    assert_builder_follows_config(
        cfg, [CopySettings(16, 4, 40, V), CopySettings(24, 6, 20, V)],
        [CopySettings(16, 4, 10, V), CopySettings(32, 8, 7, V)], MAKERS[task])


def test_builder_errors_name_the_entry():
    cfg = task_config("copy", vocab_size=V, train_slices=((16, 4, 40),),
                      test_slices=((16, 4, 10), (16, 9, 10)), batch_size=8, eval_batch_size=4)
    with pytest.raises(ValueError, match=r"task.test_slices\[1\] = \(16, 9, 10\): num_tokens=9"):
        TASKS.get("copy")(cfg, 0)
    cfg.test_slices = ((16, 4),)
    with pytest.raises(ValueError, match=r"task.test_slices\[0\].*expected \(seq_len, num_tokens"):
        TASKS.get("copy")(cfg, 0)


@pytest.mark.integration
def test_smoke_training(tmp_path):
    result = assert_smoke_training("configs/copying.py:smoke", tmp_path)
    assert {"test/T16_L4/accuracy", "test/T24_L6/accuracy"} <= set(result)


def test_config_task_argument():
    for task in MAKERS:
        config = load_config(f"configs/copying.py:task={task},smoke")
        assert config.task.name == task
        data = TASKS.get(task)(config.task, config.seed)
        assert list(data.test) == ["T16_L4", "T24_L6"]
        assert next(iter(data.train))["inputs"].shape == (16, 16)
    assert load_config("configs/copying.py:task=selective_copy").task.train_slices == ((64, 8, 20_000),)
    with pytest.raises(ValueError, match="unknown task 'copyy'"):
        load_config("configs/copying.py:task=copyy")
