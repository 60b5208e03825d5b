"""Copying and selective copying: verbatim storage of L tokens across a delay.

Vocabulary (size V >= 4), shared by both tasks:

* ``BLANK = 0``: the blank (padding / noise) token;
* data tokens ``[1, V - 1)``, drawn uniformly and independently (repeats allowed);
* ``V - 1``: the separator (``copy``) or the marker (``selective_copy``).

An example has length T and L data tokens (``T >= 2L``).

``copy`` (task name ``copy``), the copy-memory task with teacher forcing::

    positions  0 .. L-1    L .. T-L-1        T-L    T-L+1 .. T-1
    inputs     x1 .. xL    BLANK (delay)     SEP    x1 .. x(L-1)
    labels     -100        -100              x1     x2 .. xL

The data come first, then ``T - 2L`` blanks (no delay when ``T = 2L``), then the separator, after
which the model reproduces the L tokens autoregressively: the copy is fed back as inputs
(teacher-forced), so the label at each of the last L positions is the next token to copy.

``selective_copy`` (task name ``selective_copy``), as in the Mamba paper (Gu & Dao 2023, section
4.1.1; its generator puts M data tokens among blanks and appends M markers)::

    positions  0 .. T-L-1                                       T-L .. T-1
    inputs     BLANK, with x1 .. xL at L random sorted positions MARK .. MARK (L times)
    labels     -100                                             x1 .. xL

At the i-th marker the model must output the i-th data token; the outputs are not fed back (the
inputs there are all markers), so the model has to keep the order itself.

Each example is a pure function of ``(seed, index)`` drawn from ``data.example_rng(seed, index)``.
Settings per slice: `CopySettings` ``(seq_len, num_tokens, num_examples)`` plus the vocabulary
size, named ``T{seq_len}_L{num_tokens}``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from memjax.tasks import data
from memjax.tasks.common import build_task, check_ints
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.registry import TASKS, TaskData

__all__ = ["BLANK", "CopySettings", "make_copy_example", "make_selective_copy_example",
           "special_token"]

BLANK = 0


def special_token(vocab_size: int) -> int:
    """The separator (copy) / marker (selective copy): the last token of the vocabulary."""
    return vocab_size - 1


@dataclasses.dataclass(frozen=True)
class CopySettings:
    """One slice of (selective) copying examples.

    Attributes:
      seq_len: T, the length of ``inputs`` and ``labels``.
      num_tokens: L, the number of data tokens to copy (and of supervised positions).
      num_examples: examples in the slice.
      vocab_size: V; data tokens are ``[1, V - 1)``.
    """

    seq_len: int
    num_tokens: int
    num_examples: int
    vocab_size: int

    def __post_init__(self):
        check_ints(self, seq_len=2, num_tokens=1, num_examples=1, vocab_size=4)
        if 2 * self.num_tokens > self.seq_len:
            raise ValueError(
                f"num_tokens={self.num_tokens} does not fit in seq_len={self.seq_len}: need "
                f"2*num_tokens <= seq_len (the tokens, then as many supervised positions)")

    @property
    def name(self) -> str:
        return f"T{self.seq_len}_L{self.num_tokens}"


def _data_tokens(rng: np.random.Generator, s: CopySettings) -> np.ndarray:
    return rng.integers(1, s.vocab_size - 1, size=s.num_tokens).astype(np.int32)


def make_copy_example(settings: CopySettings, seed: int, index: int) -> dict[str, np.ndarray]:
    """One ``copy`` example ``{"inputs": int32[T], "labels": int32[T]}`` (module docstring)."""
    s, rng = settings, data.example_rng(seed, index)
    tokens = _data_tokens(rng, s)
    t, n = s.seq_len, s.num_tokens
    inputs = np.full(t, BLANK, np.int32)
    inputs[:n] = tokens
    inputs[t - n] = special_token(s.vocab_size)
    inputs[t - n + 1:] = tokens[:-1]
    labels = np.full(t, IGNORE_INDEX, np.int32)
    labels[t - n:] = tokens
    return {"inputs": inputs, "labels": labels}


def make_selective_copy_example(settings: CopySettings, seed: int, index: int
                                ) -> dict[str, np.ndarray]:
    """One ``selective_copy`` example ``{"inputs": int32[T], "labels": int32[T]}``."""
    s, rng = settings, data.example_rng(seed, index)
    tokens = _data_tokens(rng, s)
    t, n = s.seq_len, s.num_tokens
    positions = np.sort(rng.choice(t - n, size=n, replace=False))
    inputs = np.full(t, BLANK, np.int32)
    inputs[positions] = tokens
    inputs[t - n:] = special_token(s.vocab_size)
    labels = np.full(t, IGNORE_INDEX, np.int32)
    labels[t - n:] = tokens
    return {"inputs": inputs, "labels": labels}


def _parse(vocab_size: int, entry: tuple) -> CopySettings:
    if len(entry) != 3:
        raise ValueError("expected (seq_len, num_tokens, num_examples)")
    return CopySettings(*entry, vocab_size=vocab_size)


def _build(make_example, cfg, seed: int) -> TaskData:
    return build_task(cfg, seed, functools.partial(_parse, cfg.vocab_size),
                      lambda s: data.stacked(functools.partial(make_example, s)),
                      max_supervised=lambda s: s.num_tokens)  # the L copied tokens


@TASKS.register("copy")
def build_copy(cfg, seed: int) -> TaskData:
    """Copying from `config.task`: vocab_size, train_slices and test_slices (tuples
    `(seq_len, num_tokens, num_examples)`), batch_size, eval_batch_size."""
    return _build(make_copy_example, cfg, seed)


@TASKS.register("selective_copy")
def build_selective_copy(cfg, seed: int) -> TaskData:
    """Selective copying from `config.task` (same fields as `copy`)."""
    return _build(make_selective_copy_example, cfg, seed)
