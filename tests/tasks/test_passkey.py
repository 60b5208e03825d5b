"""Tests for passkey retrieval: needle placement by depth, answer labels, vocabulary, seeds,
slices (length extrapolation, depths), errors."""

import numpy as np
import pytest
from task_checks import (
    assert_builder_follows_config,
    assert_example_is_pure,
    assert_smoke_training,
    task_config,
)

from memjax.config import load_config
from memjax.tasks import TASKS
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.passkey import NEEDLE, QUERY, PasskeySettings, make_example

V = 64


def _parts(inputs, passkey_len, num_digits):
    """Locates the needle and the query independently of the generator."""
    (needles,) = np.nonzero(inputs == NEEDLE)
    (queries,) = np.nonzero(inputs == QUERY)
    assert len(needles) == 1 and len(queries) == 1
    start, query = int(needles[0]), int(queries[0])
    passkey = inputs[start + 1:start + 1 + passkey_len]
    return start, query, passkey


@pytest.mark.parametrize("seq_len,depth,n,digits,vocab_size", [
    (128, 0.0, 5, 10, V), (128, 1.0, 5, 10, V), (128, 0.5, 5, 10, V), (512, 0.25, 3, 10, V),
    (11, 0.5, 5, 10, 13), (3, 1.0, 1, 2, 5), (200, "random", 8, 4, 20),
])
def test_example(seq_len, depth, n, digits, vocab_size):
    s = PasskeySettings(seq_len, depth, 10, vocab_size, passkey_len=n, num_digits=digits)
    last_start = seq_len - 2 * n - 1
    starts = set()
    for index in range(30):
        ex = make_example(s, 4, index)
        inputs, labels = ex["inputs"], ex["labels"]
        assert inputs.shape == labels.shape == (seq_len,)
        assert inputs.dtype == labels.dtype == np.int32
        start, query, passkey = _parts(inputs, n, digits)
        starts.add(start)
        assert query == seq_len - n
        if depth != "random":  # depth 0: first position; depth 1: needle ends before the query
            assert start == int(np.floor(depth * last_start + 0.5))
        assert 0 <= start <= last_start and start + n < query
        # passkey digits only in the needle and the answer; filler everywhere else
        assert np.all((passkey >= 2) & (passkey < 2 + digits))
        filler = np.ones(seq_len, bool)
        filler[start:start + n + 1] = False
        filler[query:] = False
        assert np.all((inputs[filler] >= 2 + digits) & (inputs[filler] < vocab_size))
        # answer: teacher-forced passkey after the query marker, labelled with the next digit
        np.testing.assert_array_equal(inputs[query + 1:], passkey[:-1])
        assert np.all(labels[:query] == IGNORE_INDEX)
        np.testing.assert_array_equal(labels[query:], passkey)
    if depth == "random":
        assert len(starts) > 10
    else:
        assert len(starts) == 1


def test_depth_endpoints():
    n = 5
    assert _parts(make_example(PasskeySettings(100, 0, 1, V), 0, 0)["inputs"], n, 10)[0] == 0
    ex = make_example(PasskeySettings(100, 1, 1, V), 0, 0)["inputs"]
    start, query, _ = _parts(ex, n, 10)
    assert start + n + 1 == query  # the needle block ends right before the query marker


def test_random_depth_is_uniform():
    s = PasskeySettings(13, "random", 1, V, passkey_len=2)  # starts 0 .. 8
    starts = [_parts(make_example(s, 1, i)["inputs"], 2, 10)[0] for i in range(2700)]
    np.testing.assert_allclose(np.bincount(starts, minlength=9) / 2700, 1 / 9, atol=0.025)


def test_same_stream_for_every_depth():
    # passkey and filler are drawn first, so only the needle moves with the depth
    a = make_example(PasskeySettings(64, 0.0, 1, V), 9, 2)["labels"]
    b = make_example(PasskeySettings(64, 0.7, 1, V), 9, 2)["labels"]
    np.testing.assert_array_equal(a, b)


def test_digits_and_filler_cover_their_ranges():
    s = PasskeySettings(64, 0.5, 10, 20, passkey_len=5, num_digits=4)
    inputs = np.concatenate([make_example(s, 0, i)["inputs"] for i in range(40)])
    assert set(inputs.tolist()) == set(range(20))


@pytest.mark.parametrize("depth", [0.3, "random"])
def test_example_is_pure_function_of_seed_and_index(depth):
    assert_example_is_pure(make_example, PasskeySettings(64, depth, 10, V))


def test_settings_names():
    assert PasskeySettings(1024, 0.5, 10, V).name == "T1024_d0.5"
    assert PasskeySettings(1024, 0, 10, V).name == "T1024_d0"
    assert PasskeySettings(1024, 1.0, 10, V).name == "T1024_d1"
    assert PasskeySettings(256, "random", 10, V).name == "T256_drandom"
    assert PasskeySettings(np.int64(64), np.float32(0.25), 10, V) == PasskeySettings(64, 0.25, 10, V)


@pytest.mark.parametrize("args,kwargs,match", [
    ((64, 1.5, 10, V), {}, r"depth must be in \[0, 1\], got depth=1.5"),
    ((64, -0.1, 10, V), {}, "depth"),
    ((64, float("nan"), 10, V), {}, "depth"),
    ((64, "middle", 10, V), {}, "depth.*'random'"),
    ((64, True, 10, V), {}, "depth"),
    ((10, 0.5, 10, V), {}, "seq_len=10 too short for passkey_len=5"),
    ((64, 0.5, 0, V), {}, "num_examples"),
    ((64, 0.5, 10, 12), {}, "vocab_size=12 too small for num_digits=10"),
    ((64, 0.5, 10, V), {"passkey_len": 0}, "passkey_len"),
    ((64, 0.5, 10, V), {"num_digits": 1}, "num_digits"),
])
def test_impossible_settings_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PasskeySettings(*args, **kwargs)


def test_builder():
    cfg = task_config("passkey", vocab_size=V, passkey_len=3, num_digits=10,
                      train_slices=((16, "random", 40), (32, 0.5, 16)),
                      test_slices=((16, 0.0, 9), (64, 1.0, 5), (64, 0.5, 4)),
                      batch_size=8, eval_batch_size=4)
    options = {"vocab_size": V, "passkey_len": 3, "num_digits": 10}
    assert_builder_follows_config(
        cfg, [PasskeySettings(16, "random", 40, **options), PasskeySettings(32, 0.5, 16, **options)],
        [PasskeySettings(16, 0.0, 9, **options), PasskeySettings(64, 1.0, 5, **options),
         PasskeySettings(64, 0.5, 4, **options)], make_example)


def test_builder_errors_name_the_entry():
    cfg = task_config("passkey", vocab_size=V, passkey_len=3, num_digits=10,
                      train_slices=((16, "random", 40),), test_slices=((16, 0.0, 9), (32, 2.0, 9)),
                      batch_size=8, eval_batch_size=4)
    with pytest.raises(ValueError, match=r"task.test_slices\[1\] = \(32, 2.0, 9\): depth"):
        TASKS.get("passkey")(cfg, 0)
    cfg.test_slices = ((16, 0.0, 9), (16, 0.0, 5))
    with pytest.raises(ValueError, match="distinct names"):
        TASKS.get("passkey")(cfg, 0)


def test_config_tests_longer_lengths_and_several_depths():
    config = load_config("configs/passkey.py")
    train_len = max(t for t, _, _ in config.task.train_slices)
    lengths = {t for t, _, _ in config.task.test_slices}
    depths = {d for _, d, _ in config.task.test_slices}
    assert max(lengths) == 4 * train_len and len(lengths) >= 3
    assert {0.0, 0.5, 1.0} <= depths
    task = TASKS.get("passkey")(config.task, config.seed)  # every slice is valid
    assert len(task.test) == len(lengths) * len(depths)


@pytest.mark.integration
def test_smoke_training(tmp_path):
    result = assert_smoke_training("configs/passkey.py:smoke", tmp_path)
    assert {"test/T16_d0/accuracy", "test/T32_d0.5/accuracy", "test/T32_d1/accuracy"} <= set(result)
