"""Row blocks of batches (`memjax.tasks.data.with_rows`): what each process of a multi-host run
generates, and the supervised widths the processes agree on (`memjax.train.step.prepare_rows`).

The equalities here are what makes a P-process run see the batches of a one-process run: the
row blocks of P simulated processes, put together, are the whole batch; prepared with
`several=True` they have the width `prepare_batch` gives the whole batch.
"""

import grain
import numpy as np
import pytest

from memjax.config import load_config
from memjax.tasks import TASKS, data
from memjax.tasks.data import IGNORE_INDEX, MAX_SUPERVISED
from memjax.train.step import prepare_batch, prepare_rows, supervised_batch

PROCESSES = 4


def blocks(rows: int, processes: int = PROCESSES) -> list[slice]:
    """The row block of each of `processes` equal processes (`memjax.train.mesh.process_rows`)."""
    share = rows // processes
    return [slice(p * share, (p + 1) * share) for p in range(processes)]


def label_views(batch: dict) -> list[dict]:
    """One `{"inputs", "labels"[, MAX_SUPERVISED]}` per label array (probe batches have two), as
    the evaluators score them."""
    extra = {k: batch[k] for k in (MAX_SUPERVISED,) if k in batch}
    return [{"inputs": batch["inputs"], "labels": batch[key], **extra}
            for key in batch if key.endswith("labels")]


def assert_blocks_make_the_batch(whole: dict, parts: list[dict], loss: str):
    """The blocks are the batch's rows; prepared with `several` processes, their widths agree
    and equal the one-process width, and their rows are the prepared batch's rows."""
    assert set(whole) <= set(parts[0])
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    declared = {p.get(MAX_SUPERVISED) for p in parts}
    assert len(declared) == 1  # every block carries its slice's value (or none)
    if loss == "mse":
        views = [(whole, parts)]
    else:
        assert declared != {None}, "classification slices declare max_supervised"
        views = zip(label_views(whole), zip(*map(label_views, parts)))
    for whole_view, part_views in views:
        expected = prepare_batch(whole_view, loss)  # one process: the batch's own width
        prepared = [prepare_rows(p, loss, several=True) for p in part_views]
        for key, value in expected.items():
            assert {p[key].shape[1:] for p in prepared} == {value.shape[1:]}
            np.testing.assert_array_equal(np.concatenate([p[key] for p in prepared]), value)


TASK_CONFIGS = [
    "configs/mqar.py:smoke",
    "configs/mqar_variants.py:smoke",
    "configs/mqar_variants.py:variant=compositional,smoke",
    "configs/copying.py:smoke",
    "configs/copying.py:task=selective_copy,smoke",
    "configs/induction.py:smoke",
    "configs/passkey.py:smoke",
    "configs/state_tracking.py:smoke",
    "configs/state_tracking.py:task=modular_addition,supervise=last,smoke",
    "configs/seq_digits.py:smoke",
    "configs/regression.py:smoke",
]


@pytest.mark.parametrize("spec", TASK_CONFIGS)
def test_each_process_makes_its_rows_of_every_batch(spec):
    config = load_config(spec)
    task = TASKS.get(config.task.name)(config.task, config.seed)
    whole = iter(task.train)
    parts = [iter(data.with_rows(task.train, rows)) for rows in blocks(config.task.batch_size)]
    for _ in range(3):
        assert_blocks_make_the_batch(next(whole), [next(p) for p in parts], task.loss)
    assert all(p.get_state() == whole.get_state() for p in parts)
    for sets in (task.test, task.probe or {}):
        for batches in sets.values():
            local = [data.with_rows(batches, rows) for rows in blocks(config.task.eval_batch_size)]
            assert all(len(b) == len(batches) for b in local)
            for i in sorted({0, len(batches) - 1}):
                assert_blocks_make_the_batch(batches[i], [b[i] for b in local], task.loss)


# --- one synthetic slice: short last batches, empty blocks, resumption, checks ---

def _batch(seed, indices):
    """Example i: inputs `10 i + t`; its first `i % 3 + 1` positions supervised."""
    indices = np.asarray(indices)
    labels = np.full((len(indices), 8), IGNORE_INDEX, np.int32)
    for row, i in enumerate(indices.tolist()):
        labels[row, :i % 3 + 1] = (i + seed) % 1000
    return {"inputs": (10 * indices[:, None] + np.arange(8)).astype(np.int32), "labels": labels}


def _slice(num_examples=10, max_supervised=3, name="s"):
    return data.Slice(name, num_examples, _batch, max_supervised=max_supervised)


def test_blocks_of_a_short_last_batch_and_empty_blocks():
    (batches,) = data.test_datasets([_slice()], 4, seed=1).values()
    assert isinstance(batches, data.SliceBatches) and len(batches) == 3
    assert batches[2]["inputs"].shape == (2, 8)  # examples 8 and 9
    first, second = (batches.with_rows(rows) for rows in blocks(4, 2))
    assert first[2]["inputs"].shape == (2, 8) and first[2][MAX_SUPERVISED] == 3
    empty = second[2]  # rows 2:4 of a 2-row batch: no example, the batch's shapes and dtypes
    assert {k: (v.shape, v.dtype) for k, v in empty.items() if k != MAX_SUPERVISED} == \
        {"inputs": ((0, 8), np.int32), "labels": ((0, 8), np.int32)}
    prepared = prepare_rows(empty, "cross_entropy", several=True)
    assert prepared["positions"].shape == (0, 4)  # the width of the others (3 -> 4)
    assert_blocks_make_the_batch(batches[2], [first[2], second[2]], "cross_entropy")
    assert [second[i]["inputs"][:, 0].tolist() for i in range(3)] == [[20, 30], [60, 70], []]
    assert list(batches[1:3]) and len(batches[1:3]) == 2  # Grain slicing still works


def test_row_iterators_share_one_state_that_resumes_any_block():
    train = data.train_dataset([_slice(40), _slice(24, name="t")], 8, seed=3)
    whole = iter(train)
    head = [next(whole) for _ in range(7)]
    state = whole.get_state()
    block = iter(train.with_rows(slice(2, 6)))
    for batch in head:
        np.testing.assert_array_equal(next(block)["inputs"], batch["inputs"][2:6])
    assert block.get_state() == state
    # Saved by one block, restored by another block and by the whole batches.
    other, again = iter(train.with_rows(slice(6, 8))), iter(train)
    other.set_state(state)
    again.set_state(state)
    for _ in range(5):
        expected = next(whole)
        np.testing.assert_array_equal(next(other)["labels"], expected["labels"][6:8])
        np.testing.assert_array_equal(next(again)["labels"], expected["labels"])


def test_width_of_several_processes():
    whole = _slice().make_batch(0, np.arange(4))  # 1, 2, 3, 1 supervised positions
    assert prepare_batch(whole, "cross_entropy")["positions"].shape == (4, 4)
    one = {"inputs": whole["inputs"][:1], "labels": whole["labels"][:1]}
    # One process: its batch's own width; several: the declared count's, or T without one.
    assert prepare_rows({**one, MAX_SUPERVISED: 3}, "cross_entropy", False)["mask"].shape == (1, 1)
    assert prepare_rows({**one, MAX_SUPERVISED: 3}, "cross_entropy", True)["mask"].shape == (1, 4)
    assert prepare_rows(one, "cross_entropy", True)["mask"].shape == (1, 8)
    with pytest.raises(ValueError, match=r"a row has 3 supervised positions .*more than the 2"):
        supervised_batch(whole, most=2)


def test_with_rows_of_other_datasets_cuts_whole_batches():
    source = grain.MapDataset.range(6).batch(4).map(lambda i: _batch(0, i))
    cut = data.with_rows(source, slice(1, 3))
    np.testing.assert_array_equal(cut[0]["inputs"], source[0]["inputs"][1:3])
    assert MAX_SUPERVISED not in cut[0]  # no slice to declare it: several processes use T
    stream = iter(data.with_rows(source.to_iter_dataset(), slice(0, 2)))
    next(stream)
    assert stream.get_state() == {"next_index": 1}


@pytest.mark.parametrize("rows, message", [
    (slice(0, 9), "not within a batch of 8 rows"), (slice(4, 2), "not within"),
    (slice(0, 8, 2), "must be a slice"), ((0, 4), "must be a slice")])
def test_bad_rows(rows, message):
    train = data.train_dataset([_slice(16)], 8, seed=0)
    with pytest.raises(ValueError, match=message):
        train.with_rows(rows)


def test_max_supervised_must_be_a_count():
    with pytest.raises(ValueError, match="max_supervised must be >= 0"):
        _slice(max_supervised=-1)
