"""Induction heads / single-query associative recall (task name ``induction``).

The H3 paper's induction-head task (Fu, Dao et al. 2023): a sequence of random tokens in which a
special trigger token appears once, followed by a target token; the sequence ends with the
trigger again, and the model must output the target there (recall what followed the trigger the
last time it was seen).

Vocabulary (size V >= 3): ordinary tokens ``[0, V - 1)``, trigger ``V - 1``.

One example of length T (``T >= 3``)::

    positions  0 .. p-1    p         p+1       p+2 .. T-2    T-1
    inputs     random      TRIGGER   target    random        TRIGGER
    labels     -100        -100      -100      -100          target

All non-trigger tokens (the target included) are uniform over ``[0, V - 1)``; the trigger
position ``p`` is uniform over ``[0, T - 3]``, so the trigger occurs exactly twice in the inputs
and only the last position is supervised.

Each example is a pure function of ``(seed, index)`` drawn from ``data.example_rng(seed, index)``.
Settings per slice: `InductionSettings` ``(seq_len, num_examples)`` plus the vocabulary size,
named ``T{seq_len}``; test slices longer than training measure length extrapolation.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from memjax.tasks import data
from memjax.tasks.common import build_task, check_ints
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.registry import TASKS, TaskData

__all__ = ["InductionSettings", "make_example", "trigger_token"]


def trigger_token(vocab_size: int) -> int:
    return vocab_size - 1


@dataclasses.dataclass(frozen=True)
class InductionSettings:
    """One slice of induction-head examples: length T, example count, vocabulary size V."""

    seq_len: int
    num_examples: int
    vocab_size: int

    def __post_init__(self):
        check_ints(self, seq_len=3, num_examples=1, vocab_size=3)

    @property
    def name(self) -> str:
        return f"T{self.seq_len}"


def make_example(settings: InductionSettings, seed: int, index: int) -> dict[str, np.ndarray]:
    """One example ``{"inputs": int32[T], "labels": int32[T]}`` (see the module docstring)."""
    s, rng = settings, data.example_rng(seed, index)
    t, trigger = s.seq_len, trigger_token(s.vocab_size)
    inputs = rng.integers(0, trigger, size=t).astype(np.int32)
    p = int(rng.integers(0, t - 2))  # trigger position in [0, T - 3]
    inputs[p] = trigger
    inputs[t - 1] = trigger
    labels = np.full(t, IGNORE_INDEX, np.int32)
    labels[t - 1] = inputs[p + 1]
    return {"inputs": inputs, "labels": labels}


def _parse(vocab_size: int, entry: tuple) -> InductionSettings:
    if len(entry) != 2:
        raise ValueError("expected (seq_len, num_examples)")
    return InductionSettings(*entry, vocab_size=vocab_size)


@TASKS.register("induction")
def build(cfg, seed: int) -> TaskData:
    """Induction heads from `config.task`: vocab_size, train_slices and test_slices (tuples
    `(seq_len, num_examples)`), batch_size, eval_batch_size."""
    return build_task(cfg, seed, functools.partial(_parse, cfg.vocab_size),
                      lambda s: data.stacked(functools.partial(make_example, s)),
                      max_supervised=lambda s: 1)  # the last position
