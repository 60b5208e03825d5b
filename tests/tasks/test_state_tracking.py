"""Tests for the state-tracking tasks: labels recomputed independently, group axioms, Dyck
invariants, determinism, train/test separation, sizes, errors, config, and one smoke training."""

import itertools
import math

import numpy as np
import pytest

from memjax.config import load_config
from memjax.tasks import TASKS, data
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.state_tracking import (EMPTY, Dyck, ModularAddition, Parity, Permutation,
                                         symmetric_group)

SEED = 17


def _batch(setting, n=32, seed=SEED):
    batch = setting.make_examples(seed, np.arange(n))
    inputs, labels = batch["inputs"], batch["labels"]
    assert inputs.shape == labels.shape == (n, setting.seq_len)
    assert inputs.dtype == labels.dtype == np.int32
    assert inputs.min() >= 0 and inputs.max() < setting.vocab_size
    supervised = labels[labels != IGNORE_INDEX]
    assert supervised.min() >= 0 and supervised.max() < setting.vocab_size
    return inputs, labels


def _check_supervision(labels, supervise):
    if supervise == "all":
        assert (labels != IGNORE_INDEX).all()
    else:
        assert (labels[:, :-1] == IGNORE_INDEX).all() and (labels[:, -1] != IGNORE_INDEX).all()


def _assert_targets(labels, expected, supervise):
    _check_supervision(labels, supervise)
    if supervise == "all":
        np.testing.assert_array_equal(labels, expected)
    else:
        np.testing.assert_array_equal(labels[:, -1], expected[:, -1])


@pytest.mark.parametrize("supervise", ["all", "last"])
def test_parity_labels(supervise):
    inputs, labels = _batch(Parity(40, 10, supervise))
    assert set(np.unique(inputs)) == {0, 1}
    expected = np.array([[sum(row[: t + 1]) % 2 for t in range(len(row))] for row in inputs.tolist()])
    _assert_targets(labels, expected, supervise)


@pytest.mark.parametrize("supervise", ["all", "last"])
@pytest.mark.parametrize("modulus", [2, 3, 7])
def test_modular_addition_labels(modulus, supervise):
    setting = ModularAddition(30, 10, supervise, modulus=modulus)
    assert setting.vocab_size == modulus
    inputs, labels = _batch(setting)
    assert set(np.unique(inputs)) == set(range(modulus))
    expected = np.zeros_like(inputs)
    for row, tokens in enumerate(inputs.tolist()):
        total = 0
        for t, x in enumerate(tokens):
            total = (total + x) % modulus
            expected[row, t] = total
    _assert_targets(labels, expected, supervise)


@pytest.mark.parametrize("supervise", ["all", "last"])
@pytest.mark.parametrize("degree", [3, 5])
def test_permutation_labels_compose_in_reading_order(degree, supervise):
    perms = [np.array(p) for p in itertools.permutations(range(degree))]
    index = {tuple(p.tolist()): i for i, p in enumerate(perms)}
    setting = Permutation(25, 10, supervise, degree=degree)
    assert setting.vocab_size == math.factorial(degree)
    inputs, labels = _batch(setting)
    expected = np.zeros_like(inputs)
    for row, tokens in enumerate(inputs.tolist()):
        product = np.arange(degree)  # identity; product[i] = image of i
        for t, x in enumerate(tokens):
            product = perms[x][product]  # apply the running product first, then x_t
            expected[row, t] = index[tuple(product.tolist())]
    _assert_targets(labels, expected, supervise)


@pytest.mark.parametrize("degree", [2, 3, 4, 5])
def test_group_axioms(degree):
    perms, table = symmetric_group(degree)
    order = math.factorial(degree)
    assert perms.shape == (order, degree) and table.shape == (order, order)
    assert [tuple(p) for p in perms.tolist()] == list(itertools.permutations(range(degree)))
    for i, j in itertools.product(range(order), repeat=2):  # the table is composition
        np.testing.assert_array_equal(perms[table[i, j]], perms[j][perms[i]])
    e = np.arange(order)
    np.testing.assert_array_equal(table[0], e)  # identity, both sides
    np.testing.assert_array_equal(table[:, 0], e)
    for row in (table, table.T):  # Latin square: every element once per row and column
        assert (np.sort(row, axis=1) == e).all()
    inverse = np.argmax(table == 0, axis=1)  # inverses, both sides
    assert (table[e, inverse] == 0).all() and (table[inverse, e] == 0).all()
    a, b, c = np.meshgrid(e, e, e, indexing="ij")  # associativity over all triples
    np.testing.assert_array_equal(table[table[a, b], c], table[a, table[b, c]])
    assert (table != table.T).any() == (degree >= 3)  # S_n is non-abelian from n = 3
    assert not perms.flags.writeable and not table.flags.writeable


def _replay_dyck(tokens, num_types, max_depth):
    """Stack replay: (labels, max depth reached, final depth); asserts a valid bounded prefix."""
    stack, labels, deepest = [], [], 0
    for x in tokens:
        if 1 <= x <= num_types:
            stack.append(x - 1)
        else:
            assert num_types < x <= 2 * num_types and stack, "close without a matching open"
            assert stack.pop() == x - 1 - num_types, "closing bracket of the wrong type"
        deepest = max(deepest, len(stack))
        assert len(stack) <= max_depth
        labels.append(1 + stack[-1] if stack else EMPTY)
    return labels, deepest, len(stack)


@pytest.mark.parametrize("num_types,max_depth,balanced,seq_len,supervise",
                         [(2, 4, True, 64, "all"), (3, 2, True, 30, "all"), (1, 1, True, 8, "all"),
                          (2, 6, False, 41, "all"), (2, 3, False, 20, "last")])
def test_dyck_labels_and_invariants(num_types, max_depth, balanced, seq_len, supervise):
    setting = Dyck(seq_len, 10, supervise, num_types=num_types, max_depth=max_depth,
                   balanced=balanced)
    assert setting.vocab_size == 2 * num_types + 1
    inputs, labels = _batch(setting, n=200)
    assert (inputs != EMPTY).all()  # EMPTY is a label only
    expected, deepest, finals = [], [], []
    for tokens in inputs.tolist():
        lab, d, final = _replay_dyck(tokens, num_types, max_depth)
        expected.append(lab)
        deepest.append(d)
        finals.append(final)
    _assert_targets(labels, np.array(expected), supervise)
    assert max(deepest) == max_depth  # the bound is reached, never exceeded
    if balanced:
        assert set(finals) == {0}
    else:
        assert max(finals) > 0
    opened = np.unique(inputs[(inputs >= 1) & (inputs <= num_types)])
    np.testing.assert_array_equal(opened, np.arange(1, num_types + 1))  # every type is used


def test_dyck_top_of_stack_needs_memory():
    # The label after a closing bracket is often a non-empty top opened far back.
    inputs, labels = _batch(Dyck(64, 10, num_types=2, max_depth=4), n=100)
    after_close = labels[inputs > 2]
    assert (after_close != EMPTY).mean() > 0.3 and len(np.unique(after_close)) == 3


SETTINGS = [Parity(32, 5), ModularAddition(32, 5, modulus=5), Permutation(32, 5, degree=5),
            Dyck(32, 5, num_types=2, max_depth=4), Dyck(33, 5, "last", num_types=2, max_depth=3,
                                                       balanced=False)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: type(s).__name__)
def test_example_is_pure_function_of_seed_and_index(setting):
    batch = setting.make_examples(5, [7, 0, 3, 7])
    np.random.seed(0)  # the global RNG plays no part
    np.random.rand(10)
    for row, index in enumerate([7, 0, 3, 7]):
        alone = setting.make_example(5, index)  # nor the other rows of a batch
        np.testing.assert_array_equal(batch["inputs"][row], alone["inputs"])
        np.testing.assert_array_equal(batch["labels"][row], alone["labels"])
    a = setting.make_example(5, 7)["inputs"]
    assert not np.array_equal(a, setting.make_example(5, 8)["inputs"])
    assert not np.array_equal(a, setting.make_example(6, 7)["inputs"])


def test_slice_names():
    assert Parity(256, 1).name == "T256"
    assert Parity(256, 1, "last").name == "T256_last"
    assert Permutation(np.int64(8), 2, degree=np.int64(3)) == Permutation(8, 2, degree=3)


@pytest.mark.parametrize("make,param", [
    (lambda: Parity(0, 5), "seq_len"),
    (lambda: Parity(8, 0), "num_examples"),
    (lambda: Parity(8.5, 5), "seq_len"),
    (lambda: Parity(8, 5, "first"), "supervise"),
    (lambda: ModularAddition(8, 5, modulus=1), "modulus"),
    (lambda: Permutation(8, 5, degree=1), "degree"),
    (lambda: Permutation(8, 5, degree=7), "degree"),
    (lambda: Dyck(8, 5, num_types=0, max_depth=2), "num_types"),
    (lambda: Dyck(8, 5, num_types=2, max_depth=0), "max_depth"),
    (lambda: Dyck(9, 5, num_types=2, max_depth=2), "seq_len"),
    (lambda: Dyck(8, 5, "last", num_types=2, max_depth=2), "supervise='last' with balanced"),
    (lambda: Dyck(8, 5, num_types=2, max_depth=2, balanced=1), "balanced"),
    (lambda: Parity(8, 5).make_example(-1, 0), "seed"),
])
def test_impossible_settings_raise(make, param):
    with pytest.raises(ValueError, match=param):
        make()


def _task_config(arg, **overrides):
    return load_config(f"configs/state_tracking.py:{arg}", overrides)


def test_builder_sizes_and_disjoint_streams():
    cfg = _task_config("task=parity,train_len=64,test_lens=64/128",
                       **{"task.batch_size": 16,
                          "task.eval_batch_size": 30,
                          "task.train_slices": ((32, 40, "all"), (64, 48, "all")),
                          "task.test_slices": ((64, 50, "all"), (128, 20, "last"))}).task
    task = TASKS.get("parity")(cfg, SEED)
    assert task.sample_length == 64
    assert list(task.test) == ["T64", "T128_last"]
    assert [len(ds) for ds in task.test.values()] == [2, 1]
    assert [b["inputs"].shape for b in task.test["T64"]] == [(30, 64), (20, 64)]
    assert task.test["T128_last"][0]["labels"].shape == (20, 128)
    train_rows = set()
    it = iter(task.train)
    shapes = []
    for _ in range(2 + 3):  # one epoch: 40 // 16 + 48 // 16 batches
        batch = next(it)
        shapes.append(batch["inputs"].shape)
        train_rows |= {row.tobytes() for row in batch["inputs"]}
    assert sorted(shapes) == [(16, 32)] * 2 + [(16, 64)] * 3  # batches never mix slices
    test_rows = {row.tobytes() for b in task.test["T64"] for row in b["inputs"]}
    assert len(test_rows) == 50 and not train_rows & test_rows
    # the same training slice in training and testing uses disjoint seeds
    train_seed = data.slice_seeds(SEED, 2, "train")[1]
    test_seed = data.slice_seeds(SEED, 2, "test")[0]
    np.testing.assert_array_equal(task.test["T64"][1]["inputs"][3],
                                  Parity(64, 1).make_example(test_seed, 33)["inputs"])
    assert train_seed != test_seed


@pytest.mark.parametrize("override,message", [
    ({"task.train_slices": ((64, 10, "some"),)}, r"task.train_slices\[0\] = \(64, 10, 'some'\): supervise"),
    ({"task.test_slices": ((64, 10), (0, 10))}, r"task.test_slices\[1\] = \(0, 10\): seq_len"),
    ({"task.train_slices": ((64,),)}, r"task.train_slices\[0\] = \(64,\): expected"),
    ({"task.vocab_size": 1}, "vocab_size"),
    ({"task.train_slices": ()}, "task.train_slices is empty"),
])
def test_builder_errors_name_the_entry(override, message):
    cfg = _task_config("task=parity", **override).task
    with pytest.raises(ValueError, match=message):
        TASKS.get("parity")(cfg, SEED)


def test_builder_passes_task_settings():
    for arg, name, vocab in [("task=modular_addition,modulus=7", "modular_addition", 7),
                             ("task=s3", "permutation", 6), ("task=s5", "permutation", 120),
                             ("task=dyck,num_types=3", "dyck", 7)]:
        cfg = _task_config(arg, **{"task.train_slices": ((16, 64, "all"),),
                                   "task.test_slices": ((32, 10, "all"),)}).task
        assert cfg.name == name and cfg.vocab_size == vocab
        task = TASKS.get(name)(cfg, SEED)
        batch = task.test["T32"][0]
        assert batch["inputs"].max() < vocab and batch["labels"].max() < vocab
    cfg = _task_config("task=dyck,max_depth=0").task
    with pytest.raises(ValueError, match=r"task.train_slices\[0\] = .*max_depth"):
        TASKS.get("dyck")(cfg, SEED)


def test_config_arguments():
    config = load_config("configs/state_tracking.py:task=parity,train_len=32,test_lens=64/128,"
                         "model=gated_deltanet_neg,layers=1,d_model=32")
    assert config.task.train_slices == ((32, 50_000, "all"),)
    assert config.task.test_slices == ((64, 500, "all"), (64, 500, "last"), (128, 500, "all"),
                                       (128, 500, "last"))
    assert config.model.num_layers == 1 and config.model.d_model == 32
    assert config.model.vocab_size == 2
    assert config.model.mixer.name == "gated_deltanet" and config.model.mixer.allow_neg_eigval
    default = load_config("configs/state_tracking.py:train_len=16")
    assert [t for t, _, _ in default.task.test_slices[::2]] == [16, 32, 64, 128]
    last = load_config("configs/state_tracking.py:task=s5,supervise=last,train_len=64,test_lens=16")
    assert last.task.train_slices == tuple((t, 6250, "last") for t in range(8, 65, 8))
    assert last.task.test_slices == ((16, 500, "last"),)
    dyck = load_config("configs/state_tracking.py:task=dyck,test_lens=64/128")
    assert dyck.task.test_slices == ((64, 500, "all"), (128, 500, "all"))  # no trivial _last
    with pytest.raises(ValueError, match="unknown task"):
        load_config("configs/state_tracking.py:task=s4")
    with pytest.raises(ValueError, match="test_lens"):
        load_config("configs/state_tracking.py:test_lens=a/b")


@pytest.mark.integration
def test_smoke_training_reports_every_test_slice(tmp_path):
    from memjax.train.trainer import train

    config = load_config("configs/state_tracking.py:smoke")
    result = train(config, tmp_path)
    assert config.task.test_slices == ((16, 32, "all"), (16, 32, "last"), (32, 32, "all"),
                                       (32, 32, "last"))
    for name in ["T16", "T16_last", "T32", "T32_last"]:
        assert 0.0 <= result[f"test/{name}/accuracy"] <= 1.0
    assert result["step"] == config.train.steps
