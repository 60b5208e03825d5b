"""Multi-query associative recall (MQAR) as Grain datasets.

MQAR (Arora, Eyuboglu et al., "Zoology", ICLR 2024) asks a causal model to store K key-value pairs
shown at the start of a sequence and to recall each value when its key appears again later.

Construction of one example (vocabulary V, length T, K pairs), following Zoology's generator:

1. Keys: K distinct tokens from ``[1, V//2)``; values: K distinct tokens from ``[V//2, V)``.
2. Context (positions ``0 .. 2K-1``): ``k1 v1 k2 v2 ... kK vK``.
3. Query region (positions ``2K .. T-1``): ``space = (T - 2K) / 2`` two-token slots. K distinct
   slots ("gaps") ``g_j`` in ``[0, space)`` are drawn without replacement with probability
   proportional to ``a * i**(a - 1)`` for ``i = g + 1`` (``a = power_a``; 0.01 gives roughly
   ``1/i``, so queries cluster near the start of the query region, 1.0 gives a uniform draw).
   Key ``k_j`` is written at position ``2K + 2 g_j``.
4. Labels are ``IGNORE_INDEX`` everywhere except at each query position ``2K + 2 g_j``, whose label
   is ``v_j``: the next-token target after the query key. Zoology builds a length ``T + 1``
   sequence with the value at ``2K + 2 g_j + 1`` and shifts it (``inputs = seq[:-1]``,
   ``labels = seq[1:]``); writing the label directly at the key's position is the same thing.
   As in Zoology, the value is *not* written into the inputs after the query key: that slot is
   filler like the rest of the query region.
5. Filler: every other position of the inputs is 0, or, with ``random_filler`` (Zoology's
   ``random_non_queries=True``, the default), every 0 in the inputs is replaced by a uniform token
   from ``[0, V)``. Random filler may repeat keys or values and acts as distractors.

Every example is a pure function of ``(seed, index)``: it is drawn from its own
``np.random.default_rng([seed, index])``, never from global state, so any example can be produced
in any order, by any worker, after any restart. Train and test segments get seeds from disjoint
ranges (``[0, 2**31)`` and ``[2**31, 2**32)``), as Zoology does.

Public API:
  ``IGNORE_INDEX``, ``Segment``, ``check_settings``, ``make_example``, ``make_examples``,
  ``segment_seeds``, ``segment_dataset``, ``batches_per_epoch``, ``train_dataset``,
  ``test_datasets``, ``probe_datasets``, ``zoology_train_segments``, ``zoology_test_segments``.

The task built for ``config.task.name = "mqar"`` also carries the key-swap recall probe
(``TaskData.probe``, from ``probe_datasets``; the swap rule is in ``memjax.tasks.recall_probe``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import grain
import numpy as np

from memjax.tasks import data, recall_probe
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.registry import TASKS, TaskData, parse_settings

# Per-segment seeds: train in [0, 2**31), test in [2**31, 2**32) (see memjax.tasks.data).
segment_seeds = data.slice_seeds

# Test examples per segment that the key-swap recall probe perturbs: the first 250 of the test
# set. The probe scores each of them twice (two label arrays), so probing all 1000 test examples
# made evaluation 2.4x slower (Based, d_model 64, T64_K4 on the 2-core CPU: 2.5 s -> 6.0 s);
# 250 keeps it near 1.5x and still resolves accuracies to about +-0.03 (one standard error).
PROBE_EXAMPLES = 250

__all__ = [
    "IGNORE_INDEX",
    "Segment",
    "batches_per_epoch",
    "check_settings",
    "make_example",
    "make_examples",
    "probe_datasets",
    "segment_dataset",
    "segment_seeds",
    "test_datasets",
    "train_dataset",
    "zoology_test_segments",
    "zoology_train_segments",
]


@dataclasses.dataclass(frozen=True)
class Segment:
    """One block of MQAR examples sharing a length and a number of pairs.

    Attributes:
      seq_len: T, the length of ``inputs`` and ``labels``.
      num_pairs: K, the number of key-value pairs (and of supervised positions) per example.
      num_examples: number of examples in the segment.
    """

    seq_len: int
    num_pairs: int
    num_examples: int

    def __post_init__(self):
        for field in ("seq_len", "num_pairs", "num_examples"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"Segment.{field} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"Segment.{field} must be >= 1, got {value}")
            # Normalise numpy integers so segments hash, compare and print like plain ints.
            object.__setattr__(self, field, int(value))

    @property
    def name(self) -> str:
        """Slice name used for per-segment metrics, e.g. ``"T64_K4"``."""
        return f"T{self.seq_len}_K{self.num_pairs}"


def check_settings(vocab_size: int, seq_len: int, num_pairs: int) -> None:
    """Raises ValueError, naming the parameter, if (V, T, K) cannot produce an MQAR example.

    Zoology's asserts with one pass: T even, V > T, ``2K + 2K <= T`` (context of 2K tokens plus a
    query region with at least K two-token slots). Keys are drawn from ``[1, V//2)``, so also
    ``K <= V//2 - 1`` (implied by the others, checked anyway so the message is clear).
    """
    vocab_size = data.as_int("vocab_size", vocab_size)
    seq_len = data.as_int("seq_len", seq_len)
    num_pairs = data.as_int("num_pairs", num_pairs)
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got num_pairs={num_pairs}")
    if seq_len < 2 or seq_len % 2:
        raise ValueError(f"seq_len must be even and >= 2, got seq_len={seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(
            f"vocab_size must be > seq_len (Zoology's V > T), got vocab_size={vocab_size}, "
            f"seq_len={seq_len}"
        )
    if 4 * num_pairs > seq_len:
        raise ValueError(
            f"num_pairs too large for seq_len: need 4*num_pairs <= seq_len (2K context tokens plus "
            f"K two-token query slots), got num_pairs={num_pairs}, seq_len={seq_len}"
        )
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(
            f"num_pairs must be <= vocab_size//2 - 1 (distinct keys come from [1, vocab_size//2)), "
            f"got num_pairs={num_pairs}, vocab_size={vocab_size}"
        )


def _check_power_a(power_a: float) -> float:
    power_a = float(power_a)
    if not (math.isfinite(power_a) and power_a > 0):
        raise ValueError(f"power_a must be a finite number > 0, got power_a={power_a}")
    return power_a


@functools.lru_cache(maxsize=64)
def _gap_weights(space: int, power_a: float) -> np.ndarray:
    """Unnormalised gap probabilities ``a * i**(a-1)``, i = 1..space (read-only, cached)."""
    w = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
    w.flags.writeable = False
    return w


def _draw(rng: np.random.Generator, vocab_size, seq_len, num_pairs, power_a, random_filler):
    """All random draws of one example, in a fixed order: keys, values, gaps, filler."""
    half = vocab_size // 2
    keys = rng.choice(half - 1, size=num_pairs, replace=False) + 1
    values = rng.choice(vocab_size - half, size=num_pairs, replace=False) + half
    # Weighted sampling without replacement by exponential keys (Efraimidis & Spirakis): the slots
    # with the K smallest E_i / w_i, in increasing order, have the law of successive draws that
    # each pick slot i with probability w_i / (sum of w over slots not yet drawn), which is what
    # Zoology's np.random.choice(space, K, replace=False, p=p) samples. Vectorised, no loop.
    space = (seq_len - 2 * num_pairs) // 2
    scores = rng.exponential(size=space) / _gap_weights(space, power_a)
    gaps = np.argsort(scores)[:num_pairs]
    filler = rng.integers(0, vocab_size, size=seq_len) if random_filler else None
    return keys, values, gaps, filler


def make_examples(
    vocab_size: int,
    seq_len: int,
    num_pairs: int,
    seed: int,
    indices: Sequence[int] | np.ndarray,
    *,
    power_a: float = 0.01,
    random_filler: bool = True,
) -> dict[str, np.ndarray]:
    """A batch of MQAR examples: row ``b`` equals ``make_example(..., seed, indices[b])``.

    Returns ``{"inputs": int32[N, T], "labels": int32[N, T]}`` with ``N = len(indices)``. The random
    draws are per example (one generator per index); only the assembly is vectorised.
    """
    check_settings(vocab_size, seq_len, num_pairs)
    seed = data.check_seed("seed", seed)
    power_a = _check_power_a(power_a)
    indices = data.check_indices(indices)

    n, k = len(indices), num_pairs
    keys = np.empty((n, k), np.int32)
    values = np.empty((n, k), np.int32)
    gaps = np.empty((n, k), np.int64)
    filler = np.empty((n, seq_len), np.int32) if random_filler else None
    for row, index in enumerate(indices.tolist()):
        rng = data.example_rng(seed, index)
        keys[row], values[row], gaps[row], f = _draw(
            rng, vocab_size, seq_len, num_pairs, power_a, random_filler
        )
        if random_filler:
            filler[row] = f

    inputs = np.zeros((n, seq_len), np.int32)
    inputs[:, 0 : 2 * k : 2] = keys
    inputs[:, 1 : 2 * k : 2] = values
    query_pos = 2 * k + 2 * gaps  # position of each query key; at most T - 2
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    labels = np.full((n, seq_len), IGNORE_INDEX, np.int32)
    np.put_along_axis(labels, query_pos, values, axis=1)
    if random_filler:
        # Keys are >= 1 and values >= V//2 >= 1, so the zeros are exactly the filler.
        inputs = np.where(inputs == 0, filler, inputs)
    return {"inputs": inputs, "labels": labels}


def make_example(
    vocab_size: int,
    seq_len: int,
    num_pairs: int,
    seed: int,
    index: int,
    *,
    power_a: float = 0.01,
    random_filler: bool = True,
) -> dict[str, np.ndarray]:
    """One MQAR example, a pure function of ``(seed, index)`` (see the module docstring).

    Returns ``{"inputs": int32[T], "labels": int32[T]}``; ``labels`` is ``IGNORE_INDEX`` except at
    the K query positions ``p`` (all ``>= 2K``), where ``inputs[p]`` is a key and ``labels[p]`` its
    value from the context.
    """
    index = data.as_int("index", index)
    batch = make_examples(
        vocab_size, seq_len, num_pairs, seed, [index], power_a=power_a, random_filler=random_filler
    )
    return {name: array[0] for name, array in batch.items()}


def segment_dataset(
    vocab_size: int,
    segment: Segment,
    seed: int,
    *,
    power_a: float = 0.01,
    random_filler: bool = True,
) -> grain.MapDataset:
    """``MapDataset`` of ``segment.num_examples`` examples, element i ``make_example(.., seed, i)``.

    Elements are ``{"inputs": int32[T], "labels": int32[T]}``. Like every ``MapDataset``, indices
    past the end wrap around.
    """
    (segment_slice,) = _slices(vocab_size, [segment], power_a, random_filler)
    seed = data.check_seed("seed", seed)
    return grain.MapDataset.range(segment.num_examples).map(
        functools.partial(_one_example, segment_slice.make_batch, seed))


def _one_example(make_batch, seed, index) -> dict[str, np.ndarray]:
    return {name: array[0] for name, array in make_batch(seed, [index]).items()}


def _slices(vocab_size, segments, power_a, random_filler) -> list[data.Slice]:
    segments = list(segments)
    if not segments:
        raise ValueError("segments must not be empty")
    for seg in segments:
        if not isinstance(seg, Segment):
            raise ValueError(f"segments must be Segment objects, got {seg!r}")
        check_settings(vocab_size, seg.seq_len, seg.num_pairs)
    power_a = _check_power_a(power_a)
    # Supervised: the K query positions.
    return [data.Slice(seg.name, seg.num_examples,
                       functools.partial(_segment_batch, vocab_size, seg, power_a, bool(random_filler)),
                       max_supervised=seg.num_pairs)
            for seg in segments]


def _segment_batch(vocab_size, segment, power_a, random_filler, seed, indices):
    return make_examples(vocab_size, segment.seq_len, segment.num_pairs, seed, np.atleast_1d(indices),
                         power_a=power_a, random_filler=random_filler)


def batches_per_epoch(segments: Sequence[Segment], batch_size: int) -> int:
    """Number of training batches in one epoch: ``sum(num_examples // batch_size)``."""
    return data.batches_per_epoch(segments, batch_size)


def train_dataset(
    vocab_size: int,
    segments: Sequence[Segment],
    batch_size: int,
    seed: int,
    *,
    power_a: float = 0.01,
    random_filler: bool = True,
    prefetch: int = 0,
    order: str = "shuffled",
) -> grain.IterDataset:
    """Endless training batches ``{"inputs": int32[B, T], "labels": int32[B, T]}``.

    ``memjax.tasks.data.train_dataset`` over one slice per segment: segment ``i`` uses
    ``segment_seeds(seed, len(segments), "train")[i]``, a batch never mixes segments, each segment
    contributes ``num_examples // batch_size`` batches per epoch in a shuffled order, and the
    iterator state (``{"next_index": n}``) restores exactly. The examples are the same in every
    epoch, as with Zoology's fixed training set. ``order="segments"`` trains the segments one
    after another each epoch, as Zoology's loader does (``memjax.tasks.data.train_dataset``).

    Raises:
      ValueError: an impossible (V, T, K) setting, or a segment with fewer examples than
        ``batch_size`` (it would contribute no batch).
    """
    slices = _slices(vocab_size, segments, power_a, random_filler)
    return data.train_dataset(slices, batch_size, seed, prefetch=prefetch, order=order)


def test_datasets(
    vocab_size: int,
    segments: Sequence[Segment],
    batch_size: int,
    seed: int,
    *,
    power_a: float = 0.01,
    random_filler: bool = True,
) -> dict[str, grain.MapDataset]:
    """Evaluation batches per segment: ``{segment.name: MapDataset}`` in the order of ``segments``.

    Each ``MapDataset`` has ``ceil(num_examples / batch_size)`` elements
    ``{"inputs": int32[b, T], "labels": int32[b, T]}`` in example order; the last batch may be
    smaller (``b < batch_size``) so every test example is scored once. Segment ``i`` uses
    ``segment_seeds(seed, len(segments), "test")[i]``, disjoint from every training seed.
    """
    slices = _slices(vocab_size, segments, power_a, random_filler)
    return data.test_datasets(slices, batch_size, seed)


def probe_datasets(
    vocab_size: int,
    segments: Sequence[Segment],
    batch_size: int,
    seed: int,
    *,
    power_a: float = 0.01,
    random_filler: bool = True,
    max_examples: int | None = PROBE_EXAMPLES,
) -> dict[str, grain.MapDataset]:
    """Key-swap recall probe batches per segment (``memjax.tasks.recall_probe``).

    ``{segment.name: MapDataset}`` of batches ``{"inputs", "swapped_labels", "original_labels"}``,
    each ``int32[b, T]``: the first ``min(num_examples, max_examples)`` examples of the segment's
    test set (same seeds and indices as ``test_datasets(vocab_size, segments, batch_size, seed)``,
    so the probe perturbs exactly the examples the test accuracy is measured on), probed. Segments
    with one pair admit no swap and are left out. ``max_examples=None`` probes every example.
    """
    slices = _slices(vocab_size, segments, power_a, random_filler)
    if max_examples is not None and data.as_int("max_examples", max_examples) < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    probes = [
        data.Slice(s.name, min(s.num_examples, max_examples or s.num_examples),
                   functools.partial(_probe_batch, s.make_batch, seg.num_pairs),
                   max_supervised=seg.num_pairs)
        for s, seg in zip(slices, segments)
    ]
    # All segments go in, so segment i keeps test seed i; the one-pair ones are dropped after.
    datasets = data.test_datasets(probes, batch_size, seed)
    return {seg.name: datasets[seg.name] for seg in segments if seg.num_pairs > 1}


def _probe_batch(make_batch, num_pairs, seed, indices):
    indices = np.atleast_1d(indices)
    return recall_probe.probe_examples(make_batch(seed, indices), num_pairs, seed, indices)


def zoology_train_segments() -> list[Segment]:
    """Zoology's current MQAR training mixture (Based-era standard, V = 8192, batch 256)."""
    return [
        Segment(64, 4, 100_000),
        Segment(128, 8, 20_000),
        Segment(256, 16, 20_000),
        Segment(256, 32, 20_000),
        Segment(256, 64, 20_000),
    ]


def zoology_test_segments() -> list[Segment]:
    """Zoology's current MQAR test segments: K up to T/4 and lengths up to 1024, 1000 each."""
    return [
        Segment(seq_len, num_pairs, 1_000)
        for seq_len, num_pairs in [
            (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)
        ]
    ]


def _parse_segment(vocab_size: int, entry: tuple) -> Segment:
    if len(entry) != 3:
        raise ValueError("expected (seq_len, num_pairs, num_examples)")
    segment = Segment(*map(int, entry))
    check_settings(vocab_size, segment.seq_len, segment.num_pairs)
    return segment


@TASKS.register("mqar")
def build(cfg, seed: int) -> TaskData:
    """MQAR from `config.task`: vocab_size, train_segments and test_segments (tuples
    `(seq_len, num_pairs, num_examples)`), power_a, random_filler, batch_size, eval_batch_size,
    train_order (`"shuffled"` or Zoology's segment-by-segment `"segments"`).

    The task carries the key-swap recall probe (`TaskData.probe`): the first `PROBE_EXAMPLES` test
    examples of every test segment with at least two pairs (`probe_datasets`)."""
    parse = functools.partial(_parse_segment, cfg.vocab_size)
    train_segments = parse_settings(cfg, "train_segments", parse)
    test_segments = parse_settings(cfg, "test_segments", parse)
    options = dict(power_a=cfg.power_a, random_filler=cfg.random_filler)
    train = train_dataset(cfg.vocab_size, train_segments, cfg.batch_size, seed,
                          order=cfg.train_order, **options)
    test = test_datasets(cfg.vocab_size, test_segments, cfg.eval_batch_size, seed, **options)
    probe = probe_datasets(cfg.vocab_size, test_segments, cfg.eval_batch_size, seed, **options)
    return TaskData(train=train, test=test, sample_length=max(s.seq_len for s in train_segments),
                    probe=probe or None)  # None when every test segment has one pair


# Its name starts with "test_"; keep pytest from collecting it when a test module imports it.
test_datasets.__test__ = False
