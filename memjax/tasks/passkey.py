"""Passkey retrieval / needle in a haystack (task name ``passkey``).

A long haystack of random filler tokens hides one needle, a marker followed by an n-token
passkey; at the end a query marker asks for the passkey, which the model emits token by token.
Slices fix the length and the needle depth, so test slices can be longer than training (length
extrapolation) and sweep the depth (lost in the middle).

Vocabulary (size V, with D passkey "digits", ``V >= D + 3``):

* ``NEEDLE = 0``: the needle marker; ``QUERY = 1``: the query marker;
* passkey digits ``[2, 2 + D)`` (the passkey is n independent uniform digits);
* filler ``[2 + D, V)`` (uniform, independent), disjoint from the digits and markers, as the
  classic passkey prompt's haystack holds no digits.

One example of length T (passkey length n, ``T >= 2n + 1``), with ``H = T - n``::

    positions  0 .. s-1   s        s+1 .. s+n   s+n+1 .. H-1   H       H+1 .. T-1
    inputs     filler     NEEDLE   k1 .. kn     filler         QUERY   k1 .. k(n-1)
    labels     -100 ......................................... -100    k1      k2 .. kn

The passkey is teacher-forced in the answer: the inputs after QUERY are the passkey digits
already emitted, and the label at each of the last n positions is the next digit (as when the
model generates greedily and has been right so far). Accuracy is per example the fraction of the
n digits right.

Depth: the needle block (NEEDLE and the n digits) starts at ``s = depth * (H - n - 1)`` rounded
half up: depth 0 puts it at the very start of the sequence, depth 1 right before the query
marker. A slice's depth may also be ``"random"``: ``s`` uniform over
``[0, H - n - 1]`` per example (useful for training on all depths at once).

Each example is a pure function of ``(seed, index)`` drawn from ``data.example_rng(seed, index)``
(passkey, then filler, then a random depth's start). Settings per slice: `PasskeySettings`
``(seq_len, depth, num_examples)`` plus the task-wide ``vocab_size``, ``passkey_len`` (n) and
``num_digits`` (D); named ``T{seq_len}_d{depth}``, e.g. ``T1024_d0.5``, ``T256_drandom``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from memjax.tasks import data
from memjax.tasks.common import build_task, check_fraction, check_ints
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.registry import TASKS, TaskData

__all__ = ["NEEDLE", "QUERY", "RANDOM_DEPTH", "PasskeySettings", "make_example"]

NEEDLE = 0
QUERY = 1
FIRST_DIGIT = 2
RANDOM_DEPTH = "random"


@dataclasses.dataclass(frozen=True)
class PasskeySettings:
    """One slice of passkey examples.

    Attributes:
      seq_len: T, the length of ``inputs`` and ``labels``.
      depth: needle depth in [0, 1] (0: start of the sequence, 1: just before the query), or
        ``"random"`` for a uniform depth per example.
      num_examples: examples in the slice.
      vocab_size: V.
      passkey_len: n, digits in the passkey (and supervised positions).
      num_digits: D, distinct passkey digits ``[2, 2 + D)``; filler is ``[2 + D, V)``.
    """

    seq_len: int
    depth: float | str
    num_examples: int
    vocab_size: int
    passkey_len: int = 5
    num_digits: int = 10

    def __post_init__(self):
        check_ints(self, seq_len=3, num_examples=1, vocab_size=4, passkey_len=1, num_digits=2)
        if self.depth != RANDOM_DEPTH:
            try:
                object.__setattr__(self, "depth", check_fraction("depth", self.depth))
            except ValueError as error:
                raise ValueError(f"{error} (or {RANDOM_DEPTH!r})") from None
        if self.seq_len < 2 * self.passkey_len + 1:
            raise ValueError(
                f"seq_len={self.seq_len} too short for passkey_len={self.passkey_len}: need "
                f"seq_len >= 2*passkey_len + 1 (needle marker and passkey, query and answer)")
        if self.vocab_size < FIRST_DIGIT + self.num_digits + 1:
            raise ValueError(
                f"vocab_size={self.vocab_size} too small for num_digits={self.num_digits}: need "
                f"vocab_size >= num_digits + 3 (two markers, the digits, at least one filler token)")

    @property
    def name(self) -> str:
        depth = self.depth if self.depth == RANDOM_DEPTH else f"{self.depth:g}"
        return f"T{self.seq_len}_d{depth}"

    @property
    def last_start(self) -> int:
        """The latest start of the needle block: ``H - n - 1`` with ``H = T - n``."""
        return self.seq_len - 2 * self.passkey_len - 1

    def needle_start(self) -> int:
        """Position of NEEDLE for a fixed depth: ``depth * last_start`` rounded half up."""
        return math.floor(self.depth * self.last_start + 0.5)


def make_example(settings: PasskeySettings, seed: int, index: int) -> dict[str, np.ndarray]:
    """One example ``{"inputs": int32[T], "labels": int32[T]}`` (see the module docstring)."""
    s, rng = settings, data.example_rng(seed, index)
    t, n = s.seq_len, s.passkey_len
    passkey = rng.integers(FIRST_DIGIT, FIRST_DIGIT + s.num_digits, size=n).astype(np.int32)
    inputs = rng.integers(FIRST_DIGIT + s.num_digits, s.vocab_size, size=t).astype(np.int32)
    if s.depth == RANDOM_DEPTH:
        start = int(rng.integers(0, s.last_start + 1))
    else:
        start = s.needle_start()
    inputs[start] = NEEDLE
    inputs[start + 1:start + 1 + n] = passkey
    query = t - n
    inputs[query] = QUERY
    inputs[query + 1:] = passkey[:-1]
    labels = np.full(t, IGNORE_INDEX, np.int32)
    labels[query:] = passkey
    return {"inputs": inputs, "labels": labels}


def _parse(cfg, entry: tuple) -> PasskeySettings:
    if len(entry) != 3:
        raise ValueError("expected (seq_len, depth, num_examples)")
    return PasskeySettings(*entry, vocab_size=cfg.vocab_size, passkey_len=cfg.passkey_len,
                           num_digits=cfg.num_digits)


@TASKS.register("passkey")
def build(cfg, seed: int) -> TaskData:
    """Passkey retrieval from `config.task`: vocab_size, passkey_len, num_digits, train_slices and
    test_slices (tuples `(seq_len, depth, num_examples)`), batch_size, eval_batch_size."""
    return build_task(cfg, seed, functools.partial(_parse, cfg),
                      lambda s: data.stacked(functools.partial(make_example, s)),
                      max_supervised=lambda s: s.passkey_len)  # the n passkey digits
