"""Checks shared by the tests of the task modules built with `memjax.tasks.common.build_task`.

Imported by the test files of this folder (pytest puts the folder on `sys.path`); its name does
not start with `test_`, so it is not collected itself.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from memjax.config import load_config
from memjax.tasks import TASKS, data
from memjax.train.trainer import train


def assert_example_is_pure(make_example, settings, seed=11, index=3):
    """Same (seed, index) -> same example whatever ran before; other index or seed -> another."""
    a = make_example(settings, seed, index)
    np.random.seed(0)  # the global RNG must play no part
    np.random.rand(10)
    make_example(settings, seed, index + 1)  # nor the order of calls
    b = make_example(settings, seed, index)
    assert set(a) == {"inputs", "labels"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    for other in (make_example(settings, seed, index + 1), make_example(settings, seed + 1, index)):
        assert not np.array_equal(a["inputs"], other["inputs"])


def task_config(name: str, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, **fields})


def _rows(batch) -> list[bytes]:
    return [i.tobytes() + l.tobytes() for i, l in zip(batch["inputs"], batch["labels"])]


def assert_builder_follows_config(cfg, train_settings, test_settings, make_example, seed=5):
    """Builds `cfg` with its registered builder and checks the data against `make_example`.

    `train_settings` / `test_settings`: the settings objects the builder should make from
    `cfg.train_slices` / `cfg.test_slices`, in order.

    * test: one dataset per slice, named by the settings, in order; its batches (the last one
      possibly smaller) are exactly examples 0 .. n-1 of the slice's test seed, each once;
    * train: one epoch holds exactly the first `n // B * B` examples of each slice's train seed,
      in batches of shape `[B, seq_len]` that never mix slices; no training example equals a
      test example (the seeds are disjoint);
    * `sample_length` is the longest training length.
    """
    task = TASKS.get(cfg.name)(cfg, seed)
    assert task.sample_length == max(s.seq_len for s in train_settings)

    test_seeds = data.slice_seeds(seed, len(test_settings), "test")
    assert list(task.test) == [s.name for s in test_settings]
    test_rows = set()
    for s, sd, batches in zip(test_settings, test_seeds, task.test.values()):
        got = [batches[i] for i in range(len(batches))]
        assert len(got) == -(-s.num_examples // cfg.eval_batch_size)
        assert all(b["inputs"].shape[0] == cfg.eval_batch_size for b in got[:-1])
        inputs = np.concatenate([b["inputs"] for b in got])
        labels = np.concatenate([b["labels"] for b in got])
        assert inputs.shape == labels.shape == (s.num_examples, s.seq_len)
        assert inputs.dtype == labels.dtype == np.int32
        for j in range(s.num_examples):
            ex = make_example(s, sd, j)
            np.testing.assert_array_equal(inputs[j], ex["inputs"])
            np.testing.assert_array_equal(labels[j], ex["labels"])
        test_rows.update(_rows({"inputs": inputs, "labels": labels}))

    train_seeds = data.slice_seeds(seed, len(train_settings), "train")
    batch_size = cfg.batch_size
    expected = {}  # row -> slice
    for k, (s, sd) in enumerate(zip(train_settings, train_seeds)):
        for j in range(s.num_examples // batch_size * batch_size):
            ex = make_example(s, sd, j)
            expected[ex["inputs"].tobytes() + ex["labels"].tobytes()] = k
    per_epoch = sum(s.num_examples // batch_size for s in train_settings)
    it = iter(task.train)
    seen = []
    for _ in range(per_epoch):
        batch = next(it)
        rows = _rows(batch)
        (k,) = {expected[r] for r in rows}  # every row is a training example of one slice
        assert batch["inputs"].shape == (batch_size, train_settings[k].seq_len)
        seen += rows
    assert sorted(seen) == sorted(expected)  # one epoch is every training example once
    assert not set(seen) & test_rows


def assert_smoke_training(spec: str, workdir) -> dict:
    """`load_config(spec)` trains to the end and reports the accuracy of every test slice."""
    config = load_config(spec)
    result = train(config, workdir)
    assert result["step"] == config.train.steps
    task = TASKS.get(config.task.name)(config.task, config.seed)
    for name in task.test:
        assert 0.0 <= result[f"test/{name}/accuracy"] <= 1.0
    assert 0.0 <= result["test/accuracy"] <= 1.0
    return result
