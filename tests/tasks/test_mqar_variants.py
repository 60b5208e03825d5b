"""Tests for the MQAR variants: overwrites (latest value) and compositional (pair) keys."""

import numpy as np
import pytest
from task_checks import (
    assert_builder_follows_config,
    assert_example_is_pure,
    assert_smoke_training,
    task_config,
)

from memjax.config import load_config
from memjax.tasks import TASKS, mqar
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.mqar_variants import (
    BLANK,
    CompositionalSettings,
    OverwriteSettings,
    grid_shape,
    make_compositional_example,
    make_overwrite_example,
)

V = 256


# ----------------------------------------------------------------------------------- overwrite

def _check_overwrite(inputs, labels, s: OverwriteSettings):
    t, k, u, v = s.seq_len, s.num_keys, s.num_updates, s.vocab_size
    assert inputs.shape == labels.shape == (t,)
    assert inputs.dtype == labels.dtype == np.int32
    context = 2 * k * u
    keys, values = inputs[0:context:2], inputs[1:context:2]
    assert np.all((keys >= 1) & (keys < v // 2)) and np.all((values >= v // 2) & (values < v))
    assert len(set(values.tolist())) == k * u  # every assignment has its own value
    counts = {}
    latest = {}
    for key, value in zip(keys.tolist(), values.tolist()):  # replay the context in order
        counts[key] = counts.get(key, 0) + 1
        latest[key] = value
    assert len(counts) == k and set(counts.values()) == {u}
    assert np.all(labels[:context] == IGNORE_INDEX)
    (pos,) = np.nonzero(labels != IGNORE_INDEX)
    assert len(pos) == k and np.all((pos - context) % 2 == 0) and np.all(pos >= context)
    assert sorted(inputs[pos].tolist()) == sorted(latest)  # each key queried once
    for p in pos.tolist():
        assert labels[p] == latest[int(inputs[p])]
    filler = np.ones(t, bool)
    filler[:context] = False
    filler[pos] = False
    assert np.all(inputs[filler] == BLANK)


@pytest.mark.parametrize("args", [(128, 4, 4, 10, V), (128, 4, 12, 10, V), (64, 8, 1, 10, V),
                                  (4, 1, 1, 10, 4), (21, 2, 4, 10, 20), (200, 3, 2, 10, 8192)])
def test_overwrite_example(args):
    s = OverwriteSettings(*args)
    for index in range(20):
        ex = make_overwrite_example(s, 1, index)
        _check_overwrite(ex["inputs"], ex["labels"], s)


def test_overwrite_latest_value_is_not_always_the_last_assignment():
    # the interleaving is random: the latest assignment of a key may come early in the context
    s = OverwriteSettings(64, 4, 3, 10, V)
    last_keys, first_keys = set(), set()
    for index in range(50):
        inputs = make_overwrite_example(s, 0, index)["inputs"]
        last_keys.add(tuple(inputs[0:24:2][-4:].tolist()))
        first_keys.add(tuple(inputs[0:24:2][:4].tolist()))
    assert len(last_keys) > 40 and len(first_keys) > 40


def test_overwrite_interleaving_is_uniform():
    # K = 2 keys, U = 2 updates: the 6 orders of (a a b b) are equally likely
    s = OverwriteSettings(12, 2, 2, 10, V)
    counts = {}
    n = 3000
    for index in range(n):
        keys = make_overwrite_example(s, 0, index)["inputs"][0:8:2]
        pattern = tuple((keys == keys[0]).tolist())
        counts[pattern] = counts.get(pattern, 0) + 1
    assert len(counts) == 3  # patterns relative to the first key: aabb, abab, abba
    for pattern, count in counts.items():
        assert abs(count / n - 1 / 3) < 0.03, pattern


# ------------------------------------------------------------------------------- compositional

def _check_compositional(inputs, labels, s: CompositionalSettings):
    t, k, v = s.seq_len, s.num_pairs, s.vocab_size
    third = (v - 1) // 3
    r, c = s.grid
    assert inputs.shape == labels.shape == (t,)
    assert inputs.dtype == labels.dtype == np.int32
    a, b, values = inputs[0:3 * k:3], inputs[1:3 * k:3], inputs[2:3 * k:3]
    assert np.all((a >= 1) & (a < 1 + third))
    assert np.all((b >= 1 + third) & (b < 1 + 2 * third))
    assert np.all((values >= 1 + 2 * third) & (values < 1 + 3 * third))
    assert len(set(values.tolist())) == k
    value_of = dict(zip(zip(a.tolist(), b.tolist()), values.tolist()))
    assert len(value_of) == k  # distinct pairs
    firsts, seconds = set(a.tolist()), set(b.tolist())
    assert len(firsts) == r and len(seconds) == c
    assert set(value_of) == {(x, y) for x in firsts for y in seconds}  # the full grid
    # neither component alone determines the value
    for x in firsts:
        assert len({value_of[(x, y)] for y in seconds}) == c >= 2
    for y in seconds:
        assert len({value_of[(x, y)] for x in firsts}) == r >= 2

    assert np.all(labels[:3 * k] == IGNORE_INDEX)
    (pos,) = np.nonzero(labels != IGNORE_INDEX)
    assert len(pos) == k
    assert np.all(pos > 3 * k) and np.all((pos - 1 - 3 * k) % 3 == 0)
    queried = list(zip(inputs[pos - 1].tolist(), inputs[pos].tolist()))
    assert sorted(queried) == sorted(value_of)  # each pair queried once, labelled on b
    for p, pair in zip(pos.tolist(), queried):
        assert labels[p] == value_of[pair]
    filler = np.ones(t, bool)
    filler[:3 * k] = False
    filler[pos] = False
    filler[pos - 1] = False
    assert np.all(inputs[filler] == BLANK)


@pytest.mark.parametrize("args", [(64, 4, 10, V), (64, 8, 10, V), (128, 16, 10, V),
                                  (54, 9, 10, V), (36, 6, 10, 19), (24, 4, 10, 13)])
def test_compositional_example(args):
    s = CompositionalSettings(*args)
    for index in range(20):
        ex = make_compositional_example(s, 1, index)
        _check_compositional(ex["inputs"], ex["labels"], s)


def test_grid_shape():
    assert [grid_shape(k) for k in (4, 6, 8, 9, 12, 16, 18)] == [
        (2, 2), (2, 3), (2, 4), (3, 3), (3, 4), (4, 4), (3, 6)]
    assert [grid_shape(k) for k in (1, 2, 3, 5, 7, 13)] == [None] * 6


def test_compositional_settings_are_mqar_segments():
    s = CompositionalSettings(64, 4, 10, V)
    assert isinstance(s, mqar.Segment) and s.name == "T64_K4" and s.grid == (2, 2)
    assert CompositionalSettings(np.int64(64), 4, 10, V) == s


# --------------------------------------------------------------------------------------- shared

@pytest.mark.parametrize("make,settings", [
    (make_overwrite_example, OverwriteSettings(64, 4, 3, 10, V)),
    (make_compositional_example, CompositionalSettings(64, 4, 10, V)),
])
def test_examples_are_pure_functions_of_seed_and_index(make, settings):
    assert_example_is_pure(make, settings)


def test_overwrite_name():
    assert OverwriteSettings(128, 4, 4, 10, V).name == "T128_K4_U4"


@pytest.mark.parametrize("make,args,match", [
    (OverwriteSettings, (39, 4, 4, 10, V), "seq_len=39 too short for num_keys=4, num_updates=4"),
    (OverwriteSettings, (128, 0, 4, 10, V), "num_keys"),
    (OverwriteSettings, (128, 4, 0, 10, V), "num_updates"),
    (OverwriteSettings, (128, 4, 4, 0, V), "num_examples"),
    (OverwriteSettings, (128, 4, 4, 10, 8), "vocab_size=8 too small for num_keys=4"),
    (OverwriteSettings, (128, 4, 4, 10, 30), r"vocab_size=30 too small for num_keys\*num_updates=16"),
    (CompositionalSettings, (64, 7, 10, V), "num_pairs=7 must be a product"),
    (CompositionalSettings, (64, 2, 10, V), "num_pairs=2"),
    (CompositionalSettings, (47, 8, 10, V), "seq_len=47 too short for num_pairs=8"),
    (CompositionalSettings, (64, 8, 10, 24), "vocab_size=24 too small for num_pairs=8"),
    (CompositionalSettings, (64, 4, 10, 2.5), "vocab_size"),
    (CompositionalSettings, (64, 0, 10, V), "num_pairs"),
])
def test_impossible_settings_raise(make, args, match):
    with pytest.raises(ValueError, match=match):
        make(*args)


def test_builders():
    cfg = task_config("mqar_overwrite", vocab_size=V,
                      train_slices=((24, 2, 2, 40), (40, 2, 4, 16)),
                      test_slices=((24, 2, 1, 9), (64, 4, 3, 5)), batch_size=8, eval_batch_size=4)
    assert_builder_follows_config(
        cfg, [OverwriteSettings(24, 2, 2, 40, V), OverwriteSettings(40, 2, 4, 16, V)],
        [OverwriteSettings(24, 2, 1, 9, V), OverwriteSettings(64, 4, 3, 5, V)],
        make_overwrite_example)
    cfg = task_config("mqar_compositional", vocab_size=V,
                      train_slices=((24, 4, 40), (36, 6, 16)),
                      test_slices=((24, 4, 9), (64, 8, 5)), batch_size=8, eval_batch_size=4)
    assert_builder_follows_config(
        cfg, [CompositionalSettings(24, 4, 40, V), CompositionalSettings(36, 6, 16, V)],
        [CompositionalSettings(24, 4, 9, V), CompositionalSettings(64, 8, 5, V)],
        make_compositional_example)


def test_builder_errors_name_the_entry():
    cfg = task_config("mqar_overwrite", vocab_size=V, train_slices=((24, 2, 2, 40), (24, 2, 9, 40)),
                      test_slices=((24, 2, 1, 9),), batch_size=8, eval_batch_size=4)
    with pytest.raises(ValueError, match=r"task.train_slices\[1\] = \(24, 2, 9, 40\): seq_len=24"):
        TASKS.get("mqar_overwrite")(cfg, 0)
    cfg = task_config("mqar_compositional", vocab_size=V, train_slices=((24, 4, 40),),
                      test_slices=((24, 5, 9),), batch_size=8, eval_batch_size=4)
    with pytest.raises(ValueError, match=r"task.test_slices\[0\] = \(24, 5, 9\): num_pairs=5"):
        TASKS.get("mqar_compositional")(cfg, 0)


def test_config_variant_argument():
    for variant in ("overwrite", "compositional"):
        for arg in ("", ",smoke"):
            config = load_config(f"configs/mqar_variants.py:variant={variant}{arg}")
            assert config.task.name == f"mqar_{variant}"
            TASKS.get(config.task.name)(config.task, config.seed)  # every slice is valid
    with pytest.raises(ValueError, match="unknown variant 'forget'"):
        load_config("configs/mqar_variants.py:variant=forget")


@pytest.mark.integration
def test_smoke_training(tmp_path):
    result = assert_smoke_training("configs/mqar_variants.py:smoke", tmp_path)  # overwrite
    assert {"test/T24_K2_U1/accuracy", "test/T32_K2_U3/accuracy"} <= set(result)
