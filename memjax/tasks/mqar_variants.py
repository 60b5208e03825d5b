"""Two variants of multi-query associative recall (MQAR, see `memjax.tasks.mqar`).

Both keep MQAR's shape: a context of key-value assignments, then a query region where keys come
back and the label at a query is its value (the next-token target; the value is not written into
the inputs). Unlike MQAR's default, the filler of the query region is the blank token 0, and the
query slots are drawn uniformly without replacement (MQAR's ``power_a = 1``).

``mqar_overwrite`` -- key overwrites / proactive interference
-------------------------------------------------------------
Each of K keys is assigned U times (``num_updates``); the answer to a query is the key's *latest*
value, so the U - 1 earlier values interfere. Vocabulary as MQAR: blank 0, keys ``[1, V//2)``,
values ``[V//2, V)``; the K keys are distinct and all K*U values are distinct (so a value
identifies its assignment, and the latest value always differs from the earlier ones).

* Context (positions ``0 .. 2KU-1``): the K*U assignments ``key value`` in a uniformly random
  interleaving of the keys (every key appears U times, in any order).
* Query region: ``(T - 2KU) // 2`` two-token slots after the context; K distinct slots ``g_j``
  are drawn uniformly and key ``j`` is written at ``2KU + 2 g_j``, labelled with its latest value.
  Everything else is blank (0). Needs ``2KU + 2K <= T``.

With U = 1 this is MQAR with blank filler and uniform queries. Slices:
`OverwriteSettings` ``(seq_len, num_keys, num_updates, num_examples)``, named ``T128_K4_U4``.

``mqar_compositional`` -- compound keys
---------------------------------------
Each key is a pair of tokens ``(a, b)``; the K pairs form a full ``r x c`` grid (``r * c = K``,
``r, c >= 2``, the factorisation closest to square: ``r`` is the largest divisor of K not above
``sqrt(K)``), so every ``a`` appears in c pairs and every ``b`` in r pairs, each with a different
value: neither token alone identifies the value, only the pair does. Vocabulary in thirds
(``third = (V - 1) // 3``): blank 0, first components ``[1, 1 + third)``, second components
``[1 + third, 1 + 2 third)``, values ``[1 + 2 third, 1 + 3 third)``; the r first components, c
second components and K values are distinct.

* Context (positions ``0 .. 3K-1``): the K triples ``a b v`` in random order.
* Query region: ``(T - 3K) // 3`` three-token slots; K distinct slots ``g_j`` are drawn uniformly
  and pair ``j`` is written as ``a b`` at ``3K + 3 g_j``; the label is on the second query token
  ``b`` (position ``3K + 3 g_j + 1``) and is the pair's value. Everything else is blank (0).
  Needs ``6K <= T`` and K not prime (K = 4, 6, 8, 9, ...).

Slices: `CompositionalSettings` ``(seq_len, num_pairs, num_examples)`` (a `mqar.Segment` plus the
vocabulary size), named like MQAR's segments, ``T64_K4``.

Every example is a pure function of ``(seed, index)`` drawn from ``data.example_rng(seed, index)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from memjax.tasks import data, mqar
from memjax.tasks.common import build_task, check_ints
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.registry import TASKS, TaskData

__all__ = ["BLANK", "CompositionalSettings", "OverwriteSettings", "grid_shape",
           "make_compositional_example", "make_overwrite_example"]

BLANK = 0


# ----------------------------------------------------------------------------------- overwrite

@dataclasses.dataclass(frozen=True)
class OverwriteSettings:
    """One slice of ``mqar_overwrite`` examples.

    Attributes:
      seq_len: T.
      num_keys: K, distinct keys (and queries) per example.
      num_updates: U, assignments per key; the answer is the U-th (latest) value.
      num_examples: examples in the slice.
      vocab_size: V.
    """

    seq_len: int
    num_keys: int
    num_updates: int
    num_examples: int
    vocab_size: int

    def __post_init__(self):
        check_ints(self, seq_len=1, num_keys=1, num_updates=1, num_examples=1, vocab_size=4)
        t, k, u, v = self.seq_len, self.num_keys, self.num_updates, self.vocab_size
        if 2 * k * u + 2 * k > t:
            raise ValueError(
                f"seq_len={t} too short for num_keys={k}, num_updates={u}: need "
                f"2*num_keys*num_updates + 2*num_keys <= seq_len (context, then a query slot per key)")
        if k > v // 2 - 1:
            raise ValueError(f"vocab_size={v} too small for num_keys={k}: distinct keys come from "
                             f"[1, vocab_size//2), so need num_keys <= vocab_size//2 - 1")
        if k * u > v - v // 2:
            raise ValueError(
                f"vocab_size={v} too small for num_keys*num_updates={k * u} distinct values "
                f"(from [vocab_size//2, vocab_size))")

    @property
    def name(self) -> str:
        return f"T{self.seq_len}_K{self.num_keys}_U{self.num_updates}"


def make_overwrite_example(settings: OverwriteSettings, seed: int, index: int
                           ) -> dict[str, np.ndarray]:
    """One ``mqar_overwrite`` example ``{"inputs": int32[T], "labels": int32[T]}``.

    Draws, in order: keys, values (``[K, U]``: row j holds key j's values in assignment order),
    the interleaving, the query slots.
    """
    s, rng = settings, data.example_rng(seed, index)
    t, k, u, half = s.seq_len, s.num_keys, s.num_updates, s.vocab_size // 2
    keys = rng.choice(half - 1, size=k, replace=False) + 1
    values = (rng.choice(s.vocab_size - half, size=k * u, replace=False) + half).reshape(k, u)
    order = rng.permutation(np.repeat(np.arange(k), u))  # key of each assignment, in context order
    # Occurrence number of each assignment among those of its key (0 .. U-1).
    occurrence = np.empty(k * u, np.int64)
    occurrence[np.argsort(order, kind="stable")] = np.tile(np.arange(u), k)
    context = k * u * 2
    slots = rng.choice((t - context) // 2, size=k, replace=False)

    inputs = np.full(t, BLANK, np.int32)
    inputs[0:context:2] = keys[order]
    inputs[1:context:2] = values[order, occurrence]
    query = context + 2 * slots
    inputs[query] = keys
    labels = np.full(t, IGNORE_INDEX, np.int32)
    labels[query] = values[:, -1]
    return {"inputs": inputs, "labels": labels}


def _parse_overwrite(vocab_size: int, entry: tuple) -> OverwriteSettings:
    if len(entry) != 4:
        raise ValueError("expected (seq_len, num_keys, num_updates, num_examples)")
    return OverwriteSettings(*entry, vocab_size=vocab_size)


@TASKS.register("mqar_overwrite")
def build_overwrite(cfg, seed: int) -> TaskData:
    """MQAR with overwrites from `config.task`: vocab_size, train_slices and test_slices (tuples
    `(seq_len, num_keys, num_updates, num_examples)`), batch_size, eval_batch_size."""
    return build_task(cfg, seed, functools.partial(_parse_overwrite, cfg.vocab_size),
                      lambda s: data.stacked(functools.partial(make_overwrite_example, s)),
                      max_supervised=lambda s: s.num_keys)  # one query per key


# ------------------------------------------------------------------------------- compositional

def grid_shape(num_pairs: int) -> tuple[int, int] | None:
    """``(r, c)`` with ``r * c = num_pairs``, ``2 <= r <= c`` and r as large as possible; None if
    there is none (num_pairs prime or < 4)."""
    for r in range(math.isqrt(num_pairs), 1, -1):
        if num_pairs % r == 0:
            return r, num_pairs // r
    return None


@dataclasses.dataclass(frozen=True)
class CompositionalSettings(mqar.Segment):
    """One slice of ``mqar_compositional`` examples: an MQAR `Segment` (seq_len T, num_pairs K,
    num_examples) plus the vocabulary size V."""

    vocab_size: int

    def __post_init__(self):
        super().__post_init__()
        check_ints(self, vocab_size=4)
        t, k, v = self.seq_len, self.num_pairs, self.vocab_size
        shape = grid_shape(k)
        if shape is None:
            raise ValueError(f"num_pairs={k} must be a product r*c with r, c >= 2 (the grid of "
                             f"compound keys), e.g. 4, 6, 8, 9")
        if 6 * k > t:
            raise ValueError(f"seq_len={t} too short for num_pairs={k}: need 6*num_pairs <= "
                             f"seq_len (3-token context triples, then a 3-token query slot per pair)")
        third = (v - 1) // 3
        if k > third:  # r, c <= k
            raise ValueError(f"vocab_size={v} too small for num_pairs={k}: each third of the "
                             f"vocabulary ((vocab_size-1)//3 = {third} tokens) must hold "
                             f"num_pairs distinct values")

    @property
    def grid(self) -> tuple[int, int]:
        return grid_shape(self.num_pairs)


def make_compositional_example(settings: CompositionalSettings, seed: int, index: int
                               ) -> dict[str, np.ndarray]:
    """One ``mqar_compositional`` example ``{"inputs": int32[T], "labels": int32[T]}``.

    Draws, in order: first components, second components, values, context order, query slots.
    """
    s, rng = settings, data.example_rng(seed, index)
    t, k = s.seq_len, s.num_pairs
    r, c = s.grid
    third = (s.vocab_size - 1) // 3
    first = rng.choice(third, size=r, replace=False) + 1
    second = rng.choice(third, size=c, replace=False) + 1 + third
    values = rng.choice(third, size=k, replace=False) + 1 + 2 * third
    a, b = np.repeat(first, c), np.tile(second, r)  # pair j = (first[j // c], second[j % c])
    order = rng.permutation(k)
    slots = rng.choice((t - 3 * k) // 3, size=k, replace=False)

    inputs = np.full(t, BLANK, np.int32)
    inputs[0:3 * k:3] = a[order]
    inputs[1:3 * k:3] = b[order]
    inputs[2:3 * k:3] = values[order]
    query = 3 * k + 3 * slots
    inputs[query] = a
    inputs[query + 1] = b
    labels = np.full(t, IGNORE_INDEX, np.int32)
    labels[query + 1] = values
    return {"inputs": inputs, "labels": labels}


def _parse_compositional(vocab_size: int, entry: tuple) -> CompositionalSettings:
    if len(entry) != 3:
        raise ValueError("expected (seq_len, num_pairs, num_examples)")
    return CompositionalSettings(*entry, vocab_size=vocab_size)


@TASKS.register("mqar_compositional")
def build_compositional(cfg, seed: int) -> TaskData:
    """Compositional-key MQAR from `config.task`: vocab_size, train_slices and test_slices
    (tuples `(seq_len, num_pairs, num_examples)`), batch_size, eval_batch_size."""
    return build_task(cfg, seed, functools.partial(_parse_compositional, cfg.vocab_size),
                      lambda s: data.stacked(functools.partial(make_compositional_example, s)),
                      max_supervised=lambda s: s.num_pairs)  # one query per pair
