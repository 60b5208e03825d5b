"""Grain pipelines shared by every synthetic task.

A task is a list of *slices*: blocks of examples with one setting (one length, one number of
pairs, one needle depth, ...). Every example is a pure function of ``(seed, index)`` drawn from
``example_rng(seed, index)``, never from global state, so any example can be produced in any
order, by any worker, after any restart. Each slice gets its own seed from ``slice_seeds``; train
and test seeds come from disjoint ranges (``[0, 2**31)`` and ``[2**31, 2**32)``), so no test
example shares a random stream with a training example.

Training batches never mix slices (slices may differ in length); test sets are kept per slice so
that metrics are reported per slice.

Several processes (multi-host training) each need only their rows of every batch: ``with_rows``
turns the batches of ``train_dataset`` or ``test_datasets`` into this process's rows ``[start,
stop)`` of each, generating only those examples (a batch's indices are cut before its examples
are made). The batches follow in the same order and the iterator state is the same as the whole
batches', so every process holds one state and it resumes under any process count. A slice may
declare ``max_supervised``, the most supervised positions (labels other than ``IGNORE_INDEX``)
any of its examples has; its row batches carry it under ``MAX_SUPERVISED``, so processes can
agree on a batch's supervised width without seeing each other's rows (``memjax.train.step``).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Sequence

import grain
import numpy as np

# Label of unsupervised positions; the loss and the accuracy skip it (PyTorch's convention, kept so
# numbers compare with Zoology's).
IGNORE_INDEX = -100

# Seed ranges of the two splits. Disjoint by construction.
_SPLIT_RANGES = {"train": (0, 2**31), "test": (2**31, 2**32)}
# Mixed into the entropy of derived seeds so that the slice seeds of the two splits and the
# shuffle seed come from unrelated streams of the same master seed.
_SPLIT_CODES = {"train": 0, "test": 1}
_SHUFFLE_CODE = 2

BatchFn = Callable[[int, np.ndarray], dict[str, np.ndarray]]

# Key of the slice's ``max_supervised`` in the batches ``with_rows`` makes (when it is declared).
MAX_SUPERVISED = "max_supervised"


@dataclasses.dataclass(frozen=True)
class Slice:
    """A block of ``num_examples`` examples made by ``make_batch(seed, indices)``.

    ``make_batch`` returns a dict of arrays with leading dimension ``len(indices)``, row ``b`` a
    pure function of ``(seed, indices[b])``. ``name`` labels the slice's test metrics
    (``test/<name>/accuracy``).

    ``max_supervised`` (classification slices, optional): the most positions of one example whose
    label (under ``"labels"``, or every ``*_labels`` key of probe batches) is not
    ``IGNORE_INDEX``. Several processes size the supervised width of the slice's batches from it
    without seeing the other processes' rows; a row with more is an error there, and a slice
    without it gets the full length (correct, but computes every position).
    """

    name: str
    num_examples: int
    make_batch: BatchFn
    max_supervised: int | None = None

    def __post_init__(self):
        if as_int("num_examples", self.num_examples) < 1:
            raise ValueError(f"slice {self.name}: num_examples must be >= 1, got {self.num_examples}")
        if self.max_supervised is not None and as_int("max_supervised", self.max_supervised) < 0:
            raise ValueError(f"slice {self.name}: max_supervised must be >= 0 or None, got "
                             f"{self.max_supervised}")


def as_int(name: str, value: Any) -> int:
    """``value`` as a Python int (numpy ints accepted), else a ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def check_seed(name: str, seed: Any) -> int:
    seed = as_int(name, seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"{name} must be in [0, 2**32), got {name}={seed}")
    return seed


def check_indices(indices) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D sequence of ints, got {indices!r}")
    if indices.size and indices.min() < 0:
        raise ValueError(f"indices must be >= 0, got min index {indices.min()}")
    return indices


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of example ``index`` of the slice with seed ``seed``."""
    return np.random.default_rng([seed, index])


def _stacked(make_example, seed, indices) -> dict[str, np.ndarray]:
    examples = [make_example(seed, i) for i in check_indices(indices).tolist()]
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def stacked(make_example: Callable[[int, int], dict[str, np.ndarray]]) -> BatchFn:
    """A batch function from a per-example function ``make_example(seed, index)``."""
    return functools.partial(_stacked, make_example)


def slice_seeds(master_seed: int, num_slices: int, split: str) -> list[int]:
    """Deterministic, distinct per-slice seeds for one split.

    ``"train"`` seeds lie in ``[0, 2**31)`` and ``"test"`` seeds in ``[2**31, 2**32)``. Seed ``i``
    depends only on ``(master_seed, split, i)`` (plus, in the astronomically rare case of a
    collision with an earlier slice, a retry counter), so adding slices at the end does not
    change the seeds of the earlier ones.
    """
    master_seed = as_int("master_seed", master_seed)
    num_slices = as_int("num_slices", num_slices)
    if master_seed < 0:
        raise ValueError(f"master_seed must be >= 0, got master_seed={master_seed}")
    if num_slices < 0:
        raise ValueError(f"num_slices must be >= 0, got num_slices={num_slices}")
    if split not in _SPLIT_RANGES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_RANGES)}, got split={split!r}")
    low, high = _SPLIT_RANGES[split]
    seeds: list[int] = []
    for i in range(num_slices):
        attempt = 0
        while True:
            word = np.random.SeedSequence([master_seed, _SPLIT_CODES[split], i, attempt])
            seed = low + int(word.generate_state(1, np.uint32)[0]) % (high - low)
            if seed not in seeds:
                break
            attempt += 1
        seeds.append(seed)
    return seeds


TRAIN_ORDERS = ("shuffled", "segments")


def _shuffle_seed(master_seed: int) -> int:
    return int(np.random.SeedSequence([master_seed, _SHUFFLE_CODE]).generate_state(1, np.uint32)[0])


def _check_batch_size(batch_size) -> int:
    batch_size = as_int("batch_size", batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    return batch_size


def _check_slices(slices: Sequence[Slice]) -> list[Slice]:
    slices = list(slices)
    if not slices:
        raise ValueError("slices must not be empty")
    for s in slices:
        if not isinstance(s, Slice):
            raise ValueError(f"slices must be Slice objects, got {s!r}")
    return slices


def _check_rows(rows, batch_size: int) -> slice | None:
    """``rows`` as ``slice(start, stop)`` with ``0 <= start <= stop <= batch_size``, or None."""
    if rows is None:
        return None
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise ValueError(f"rows must be a slice(start, stop) of a batch, got {rows!r}")
    start, stop = (0 if rows.start is None else as_int("rows.start", rows.start),
                   batch_size if rows.stop is None else as_int("rows.stop", rows.stop))
    if not 0 <= start <= stop <= batch_size:
        raise ValueError(f"rows {start}:{stop} are not within a batch of {batch_size} rows")
    return slice(start, stop)


def _make_rows(s: Slice, seed: int, rows: slice, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``rows`` of the batch of examples ``indices`` (fewer, or none, past a short last
    batch), plus ``MAX_SUPERVISED`` when the slice declares it."""
    local = indices[rows]
    if len(local):
        batch = dict(s.make_batch(seed, local))
    else:  # no example here; an empty batch of the right shapes (from the batch's first example)
        batch = {key: value[:0] for key, value in s.make_batch(seed, indices[:1]).items()}
    if s.max_supervised is not None:
        batch[MAX_SUPERVISED] = int(s.max_supervised)
    return batch


def _batched(s: Slice, seed: int, batch_size: int, drop_remainder: bool,
             rows: slice | None = None) -> grain.MapDataset:
    """Batches of one slice, each generated in one ``make_batch`` call (only rows ``rows`` of it,
    if given)."""
    batches = grain.MapDataset.range(s.num_examples).batch(batch_size, drop_remainder=drop_remainder)
    if rows is None:
        return batches.map(functools.partial(s.make_batch, seed))
    return batches.map(functools.partial(_make_rows, s, seed, rows))


def batches_per_epoch(slices: Sequence[Slice], batch_size: int) -> int:
    """Number of training batches in one epoch: ``sum(num_examples // batch_size)``."""
    batch_size = _check_batch_size(batch_size)
    return sum(s.num_examples // batch_size for s in slices)


def train_dataset(
    slices: Sequence[Slice], batch_size: int, seed: int, *, prefetch: int = 0,
    order: str = "shuffled",
) -> TrainBatches:
    """Endless training batches, each from one slice.

    Slice ``i`` uses ``slice_seeds(seed, len(slices), "train")[i]`` and is cut into
    ``num_examples // batch_size`` batches (the remainder is dropped), so each slice contributes
    batches in proportion to its size. One epoch is all those batches in an order shuffled from
    ``seed``; epochs repeat forever with a different order each (Grain's index shuffle reseeds per
    epoch). The examples themselves are the same in every epoch (a fixed training set).

    The iterator supports ``get_state()`` / ``set_state(state)``; the state is a small
    JSON-serialisable dict (``{"next_index": n}``), and restoring it yields exactly the batches
    that would have followed. ``with_rows(rows)`` on the result gives only some rows of every
    batch, with the same states (``TrainBatches``).

    Args:
      prefetch: batches to prepare ahead in one background thread; 0 (default) generates each
        batch synchronously in ``next()``. Either way the batches and states are identical.
      order: ``"shuffled"`` (default): each epoch's batches in one order shuffled over all slices.
        ``"segments"``: Zoology's loader order, every epoch the slices one after another in the
        given order, each slice's batches shuffled within it (one permutation per slice, the same
        every epoch), so the curriculum of easy-to-hard segments repeats each epoch.

    Raises:
      ValueError: no slices, or a slice with fewer examples than ``batch_size`` (it would
        contribute no batch).
    """
    slices = _check_slices(slices)
    batch_size = _check_batch_size(batch_size)
    seed = check_seed("seed", seed)
    prefetch = as_int("prefetch", prefetch)
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got prefetch={prefetch}")
    for s in slices:
        if s.num_examples < batch_size:
            raise ValueError(f"slice {s.name} has num_examples={s.num_examples} < "
                             f"batch_size={batch_size}; it would contribute no batch")
    if order not in TRAIN_ORDERS:
        raise ValueError(f"unknown training order {order!r}; known: {', '.join(TRAIN_ORDERS)}")
    return TrainBatches(slices, batch_size, seed, prefetch, order)


class TrainBatches(grain.IterDataset):
    """``train_dataset``'s batches: a Grain ``IterDataset`` that can also make row blocks.

    ``with_rows(slice(start, stop))`` is the same stream of batches cut to rows ``[start, stop)``
    of each: only those examples are generated, each batch carries its slice's
    ``max_supervised`` under ``MAX_SUPERVISED`` (when declared), and iterator states are those of
    the whole batches (one state restores either, under any row block).
    """

    def __init__(self, slices: list[Slice], batch_size: int, seed: int, prefetch: int, order: str,
                 rows: slice | None = None):
        self._args = (slices, batch_size, seed, prefetch, order)
        self.rows = rows
        seeds = slice_seeds(seed, len(slices), "train")
        batched = [_batched(s, sd, batch_size, True, rows) for s, sd in zip(slices, seeds)]
        if order == "segments":
            epoch = grain.MapDataset.concatenate(
                [b.shuffle(seed=_shuffle_seed(sd)) for b, sd in zip(batched, seeds)])
            stream = epoch.repeat(None)
        else:
            # shuffle() permutes within each epoch of length len(epoch) and derives the
            # permutation from seed + epoch number; repeat(None) feeds it indices across epochs,
            # so every epoch differs.
            stream = grain.MapDataset.concatenate(batched).shuffle(
                seed=_shuffle_seed(seed)).repeat(None)
        read_options = grain.ReadOptions(num_threads=1 if prefetch else 0,
                                         prefetch_buffer_size=prefetch)
        self._stream = stream.to_iter_dataset(read_options)
        super().__init__(self._stream)

    def __iter__(self):
        return self._stream.__iter__()

    def __str__(self) -> str:
        return "TrainBatches" + ("" if self.rows is None else f"(rows={self.rows})")

    def with_rows(self, rows: slice) -> TrainBatches:
        """These batches cut to rows ``rows`` (``slice(start, stop)``) of each (class doc)."""
        return TrainBatches(*self._args, rows=_check_rows(rows, self._args[1]))


class SliceBatches(grain.MapDataset):
    """One slice's evaluation batches in example order (``test_datasets``): a Grain
    ``MapDataset`` that can also make row blocks.

    ``with_rows(slice(start, stop))`` is the same batches cut to rows ``[start, stop)`` of each:
    only those examples are generated (fewer past the end of the last, shorter batch; none when
    it ends before ``start``), and each batch carries the slice's ``max_supervised`` under
    ``MAX_SUPERVISED`` (when declared).
    """

    def __init__(self, s: Slice, seed: int, batch_size: int, rows: slice | None = None):
        self.source, self.seed, self.batch_size, self.rows = s, seed, batch_size, rows
        self._batches = _batched(s, seed, batch_size, False, rows)
        super().__init__(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._batches[index]

    def __str__(self) -> str:
        rows = "" if self.rows is None else f", rows={self.rows}"
        return f"SliceBatches({self.source.name}{rows})"

    def with_rows(self, rows: slice) -> SliceBatches:
        """These batches cut to rows ``rows`` (``slice(start, stop)``) of each (class doc)."""
        return SliceBatches(self.source, self.seed, self.batch_size,
                            _check_rows(rows, self.batch_size))


def test_datasets(slices: Sequence[Slice], batch_size: int, seed: int) -> dict[str, SliceBatches]:
    """Evaluation batches per slice: ``{slice.name: SliceBatches}`` in the order of ``slices``.

    Each ``SliceBatches`` (a ``MapDataset``) has ``ceil(num_examples / batch_size)`` batches in
    example order; the last may be smaller so every test example is scored once. Slice ``i`` uses
    ``slice_seeds(seed, len(slices), "test")[i]``, disjoint from every training seed.
    """
    slices = _check_slices(slices)
    batch_size = _check_batch_size(batch_size)
    seed = check_seed("seed", seed)
    names = [s.name for s in slices]
    if len(set(names)) != len(names):
        raise ValueError(f"slices must have distinct names for evaluation, got {names}")
    seeds = slice_seeds(seed, len(slices), "test")
    return {s.name: SliceBatches(s, sd, batch_size) for s, sd in zip(slices, seeds)}


def with_rows(dataset, rows: slice):
    """``dataset``'s batches cut to rows ``rows`` (``slice(start, stop)``) of each.

    Batches of ``train_dataset`` and ``test_datasets`` are generated row by row (their
    ``with_rows``). Any other Grain dataset of batch dicts (a task built without this module) is
    generated whole and cut, without ``MAX_SUPERVISED``; its iterator state is unchanged.
    """
    if isinstance(dataset, (TrainBatches, SliceBatches)):
        return dataset.with_rows(rows)
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise ValueError(f"rows must be a slice(start, stop) of a batch, got {rows!r}")
    return dataset.map(functools.partial(_cut_rows, rows))


def _cut_rows(rows: slice, batch: dict) -> dict:
    return {key: value[rows] for key, value in batch.items()}


# Its name starts with "test_"; keep pytest from collecting it when a test module imports it.
test_datasets.__test__ = False
