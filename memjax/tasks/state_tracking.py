"""State-tracking tasks: parity, modular addition, permutation word problems, bounded Dyck.

Each task asks a causal model to carry a finite state across the whole sequence and to emit it.
A model whose recurrent transition matrices have only non-negative eigenvalues (diagonal gates in
[0, 1], the delta rule with beta in (0, 1)) cannot represent parity at arbitrary length with a
finite-precision state; the delta rule with beta in (0, 2) (``allow_neg_eigval``, the
``deltanet_neg`` / ``gated_deltanet_neg`` presets) can. The tasks here test that, and length
generalisation (train on short sequences, test on longer ones).

Tasks (``config.task.name``), vocabularies and labels. ``inputs`` and ``labels`` are ``int32[T]``;
``labels[t]`` is the target at position ``t`` given ``inputs[:t+1]``. Inputs and label classes
share one vocabulary of ``vocab_size`` tokens (the LM head is tied to the embedding).

``parity``
    Inputs: bits, tokens 0 and 1, uniform. Label: parity of the prefix, ``sum(x[:t+1]) % 2``
    (0 = even, 1 = odd). ``vocab_size = 2``.
``modular_addition`` (setting ``modulus`` m >= 2)
    Inputs: tokens ``0 .. m-1``, uniform. Label: ``sum(x[:t+1]) % m``. ``vocab_size = m``.
``permutation`` (setting ``degree`` n in 2..6; the word problem of the symmetric group S_n,
S3 and S5 being the usual cases: S5 is the smallest non-solvable one)
    The group: the ``n!`` tuples of ``itertools.permutations(range(n))`` in that (lexicographic)
    order, tuple ``p`` mapping ``i -> p[i]``; token ``j`` stands for permutation ``perms[j]``,
    token 0 is the identity. Inputs: uniform over the n! tokens. Label: the index of the running
    product ``x_t o x_{t-1} o ... o x_0`` (apply ``x_0`` first, then ``x_1``, ...; ``(a o b)[i] =
    a[b[i]]``). In table form, ``table[i, j]`` is the index of ``perms[j] o perms[i]`` (as numpy
    index arrays, ``perms[j][perms[i]]``, apply i then j), and ``label[t] = table[label[t-1],
    x[t]]`` with ``label[-1] = 0``. ``vocab_size = n!``.
``dyck`` (settings ``num_types`` k >= 1, ``max_depth`` D >= 1, ``balanced``)
    Inputs: a prefix of a Dyck word over k bracket types whose nesting depth never exceeds D.
    Token 0 is EMPTY (never an input), ``1 + i`` opens a bracket of type i, ``1 + k + i`` closes
    one. Generation: a random walk on the depth; at each position it opens (a uniformly drawn
    type) with probability 1/2 and otherwise closes the bracket on top of the stack, except that
    it must open at depth 0, must close at depth D and, with ``balanced``, must close whenever the
    depth equals the number of positions left (so the word is balanced at its end; this needs an
    even length). Label: the opening token (``1 + i``) of the bracket on top of the stack *after*
    the token, or EMPTY (0) when the stack is empty. After a closing bracket the new top was
    written arbitrarily far back, so the label needs the whole stack (up to sum_{d<=D} k^d
    states): it is a state-tracking task, unlike predicting only the depth (a counter).
    ``vocab_size = 2k + 1``.

Supervision (per slice): ``"all"`` labels every position; ``"last"`` only the final position
(``IGNORE_INDEX`` elsewhere). ``dyck`` with ``balanced`` and ``"last"`` is rejected: its final
label is always EMPTY.

Every example is a pure function of ``(seed, index)`` drawn from ``data.example_rng(seed, index)``;
the draws of one example are made first (so they do not depend on the other rows of a batch),
then the labels of the whole batch are computed with vectorised numpy.

Config (``config.task``): ``name``, ``vocab_size`` (>= the task's vocabulary), ``train_slices`` and
``test_slices`` (tuples of ``(seq_len, num_examples)`` or ``(seq_len, num_examples, supervise)``),
``batch_size``, ``eval_batch_size``, and the task's own settings (``modulus``; ``degree``;
``num_types``, ``max_depth``, ``balanced``). See ``configs/state_tracking.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import ClassVar, Sequence

import numpy as np

from memjax.tasks import data
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.registry import TASKS, TaskData, parse_settings

__all__ = [
    "EMPTY",
    "SUPERVISE",
    "Dyck",
    "ModularAddition",
    "Parity",
    "Permutation",
    "StateTrackingSlice",
    "symmetric_group",
]

SUPERVISE = ("all", "last")
EMPTY = 0  # the Dyck label of an empty stack
MAX_DEGREE = 6  # S6 has 720 elements; S7 (5040) would need a 25M-entry table


def _check_int(owner, field: str, minimum: int) -> None:
    value = data.as_int(field, getattr(owner, field))
    if value < minimum:
        raise ValueError(f"{field} must be >= {minimum}, got {field}={value}")
    object.__setattr__(owner, field, value)  # normalise numpy ints so settings compare equal


@dataclasses.dataclass(frozen=True)
class StateTrackingSlice:
    """One block of examples of a state-tracking task (one length, one supervision).

    Attributes:
      seq_len: T, the length of ``inputs`` and ``labels``.
      num_examples: number of examples in the slice.
      supervise: ``"all"`` (every position) or ``"last"`` (the final position only).
    """

    task: ClassVar[str] = ""

    seq_len: int
    num_examples: int
    supervise: str = "all"

    def __post_init__(self):
        _check_int(self, "seq_len", 1)
        _check_int(self, "num_examples", 1)
        if self.supervise not in SUPERVISE:
            raise ValueError(f"supervise must be one of {SUPERVISE}, got supervise={self.supervise!r}")

    @property
    def name(self) -> str:
        """Metric slice name: ``"T256"`` (all positions) or ``"T256_last"``."""
        return f"T{self.seq_len}" + ("_last" if self.supervise == "last" else "")

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _draw(self, rng: np.random.Generator):
        """The random draws of one example (a tuple of arrays), from its own generator."""
        raise NotImplementedError

    def _sequences(self, draws: list) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, targets)``, ``[N, T]`` each, from the draws of N examples."""
        raise NotImplementedError

    def make_examples(self, seed: int, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Row ``b`` is example ``indices[b]``: ``{"inputs": int32[N, T], "labels": int32[N, T]}``."""
        seed = data.check_seed("seed", seed)
        indices = data.check_indices(np.atleast_1d(indices))
        draws = [self._draw(data.example_rng(seed, i)) for i in indices.tolist()]
        inputs, targets = self._sequences(draws)
        if self.supervise == "last":
            labels = np.full_like(targets, IGNORE_INDEX)
            labels[:, -1] = targets[:, -1]
        else:
            labels = targets
        return {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32)}

    def make_example(self, seed: int, index: int) -> dict[str, np.ndarray]:
        """One example, a pure function of ``(seed, index)``: ``int32[T]`` inputs and labels."""
        batch = self.make_examples(seed, [data.as_int("index", index)])
        return {key: value[0] for key, value in batch.items()}

    def as_slice(self) -> data.Slice:
        return data.Slice(self.name, self.num_examples, self.make_examples,
                          max_supervised=self.seq_len if self.supervise == "all" else 1)


def _uniform_tokens(count: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray]:
    return (rng.integers(0, count, size=length, dtype=np.int64),)


@dataclasses.dataclass(frozen=True)
class Parity(StateTrackingSlice):
    """Bits; the label is the parity of the prefix (see the module docstring)."""

    task: ClassVar[str] = "parity"

    @property
    def vocab_size(self) -> int:
        return 2

    def _draw(self, rng):
        return _uniform_tokens(2, self.seq_len, rng)

    def _sequences(self, draws):
        bits = np.stack([d[0] for d in draws])
        return bits, np.cumsum(bits, axis=1) % 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModularAddition(StateTrackingSlice):
    """Tokens ``0..m-1``; the label is the prefix sum mod m."""

    task: ClassVar[str] = "modular_addition"
    modulus: int

    def __post_init__(self):
        super().__post_init__()
        _check_int(self, "modulus", 2)

    @property
    def vocab_size(self) -> int:
        return self.modulus

    def _draw(self, rng):
        return _uniform_tokens(self.modulus, self.seq_len, rng)

    def _sequences(self, draws):
        tokens = np.stack([d[0] for d in draws])
        return tokens, np.cumsum(tokens, axis=1) % self.modulus


@functools.lru_cache(maxsize=8)
def symmetric_group(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """``(perms, table)`` of S_degree: ``perms[j]`` (``int[n!, n]``) are the tuples of
    ``itertools.permutations(range(n))`` in order (``perms[0]`` the identity), and
    ``table[i, j]`` (``int[n!, n!]``) the index of ``perms[j][perms[i]]``: apply ``perms[i]``
    first, then ``perms[j]``. Both read-only."""
    degree = data.as_int("degree", degree)
    if not 1 <= degree <= MAX_DEGREE:
        raise ValueError(f"degree must be in [1, {MAX_DEGREE}], got degree={degree}")
    perms = np.array(list(itertools.permutations(range(degree))), dtype=np.int64).reshape(-1, degree)
    order = np.arange(len(perms))
    products = perms[order[None, :, None], perms[:, None, :]]  # [i, j, x] = perms[j][perms[i][x]]
    table = _rank(products)
    perms.flags.writeable = False
    table.flags.writeable = False
    return perms, table


def _rank(perms: np.ndarray) -> np.ndarray:
    """Lexicographic index of each permutation along the last axis (``itertools`` order): the
    mixed-radix number whose digits are its Lehmer code (vectorised; no dict lookups)."""
    n = perms.shape[-1]
    rank = np.zeros(perms.shape[:-1], np.int64)
    for pos in range(n):
        # Lehmer digit: how many later entries are smaller than this one.
        smaller = (perms[..., pos + 1:] < perms[..., pos : pos + 1]).sum(axis=-1)
        rank += smaller * math.factorial(n - 1 - pos)
    return rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class Permutation(StateTrackingSlice):
    """Word problem of S_degree: tokens are permutations, the label is the running product."""

    task: ClassVar[str] = "permutation"
    degree: int

    def __post_init__(self):
        super().__post_init__()
        _check_int(self, "degree", 2)
        if self.degree > MAX_DEGREE:
            raise ValueError(f"degree must be <= {MAX_DEGREE} (S_n has n! tokens), got degree={self.degree}")

    @property
    def vocab_size(self) -> int:
        return math.factorial(self.degree)

    def _draw(self, rng):
        return _uniform_tokens(self.vocab_size, self.seq_len, rng)

    def _sequences(self, draws):
        _, table = symmetric_group(self.degree)
        tokens = np.stack([d[0] for d in draws])
        labels = np.empty_like(tokens)
        state = np.zeros(len(tokens), np.int64)  # the identity
        for t in range(self.seq_len):
            state = table[state, tokens[:, t]]
            labels[:, t] = state
        return tokens, labels


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dyck(StateTrackingSlice):
    """Bounded-depth Dyck prefixes; the label is the top of the stack (see the module docstring)."""

    task: ClassVar[str] = "dyck"
    num_types: int
    max_depth: int
    balanced: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_int(self, "num_types", 1)
        _check_int(self, "max_depth", 1)
        if not isinstance(self.balanced, (bool, np.bool_)):
            raise ValueError(f"balanced must be a bool, got balanced={self.balanced!r}")
        object.__setattr__(self, "balanced", bool(self.balanced))
        if self.balanced and self.seq_len % 2:
            raise ValueError(f"seq_len must be even for balanced Dyck words, got seq_len={self.seq_len}")
        if self.balanced and self.supervise == "last":
            raise ValueError("supervise='last' with balanced=True: the final label of a balanced "
                             "word is always EMPTY; use balanced=False or supervise='all'")

    @property
    def vocab_size(self) -> int:
        return 2 * self.num_types + 1

    def _draw(self, rng):
        # coin < 0.5: open (when allowed); types: the type of a bracket opened at that position.
        return (rng.random(self.seq_len), rng.integers(0, self.num_types, size=self.seq_len))

    def _sequences(self, draws):
        coins = np.stack([d[0] for d in draws])
        types = np.stack([d[1] for d in draws])
        n, length, k = len(draws), self.seq_len, self.num_types
        rows = np.arange(n)
        stack = np.zeros((n, self.max_depth), np.int64)  # bracket types, bottom first
        depth = np.zeros(n, np.int64)
        inputs = np.empty((n, length), np.int64)
        labels = np.empty((n, length), np.int64)
        for t in range(length):
            left = length - t  # positions still to fill, this one included
            may_open = depth < self.max_depth
            if self.balanced:
                may_open &= depth + 1 <= left - 1  # the word must still be closable after opening
            opens = (depth == 0) | (may_open & (coins[:, t] < 0.5))
            top = stack[rows, np.maximum(depth - 1, 0)]
            inputs[:, t] = np.where(opens, 1 + types[:, t], 1 + k + top)
            stack[rows[opens], depth[opens]] = types[opens, t]
            depth += np.where(opens, 1, -1)
            labels[:, t] = np.where(depth > 0, 1 + stack[rows, np.maximum(depth - 1, 0)], EMPTY)
        return inputs, labels


def _parse_slice(cls, settings: dict, entry: tuple) -> StateTrackingSlice:
    if len(entry) not in (2, 3):
        raise ValueError("expected (seq_len, num_examples) or (seq_len, num_examples, supervise)")
    return cls(*entry, **settings)


def build_task(cls: type[StateTrackingSlice], cfg, seed: int, **settings) -> TaskData:
    """Train and test data of one task from ``config.task`` (see the module docstring);
    ``settings`` are the task's own settings, passed to every slice."""
    parse = functools.partial(_parse_slice, cls, settings)
    train = parse_settings(cfg, "train_slices", parse)
    test = parse_settings(cfg, "test_slices", parse)
    vocab_size = data.as_int("task.vocab_size", cfg.vocab_size)
    if vocab_size < train[0].vocab_size:
        raise ValueError(f"task.vocab_size = {vocab_size} is smaller than the {cls.task} vocabulary "
                         f"({train[0].vocab_size} tokens)")
    return TaskData(
        train=data.train_dataset([s.as_slice() for s in train], cfg.batch_size, seed),
        test=data.test_datasets([s.as_slice() for s in test], cfg.eval_batch_size, seed),
        sample_length=max(s.seq_len for s in train),
    )


@TASKS.register("parity")
def build_parity(cfg, seed: int) -> TaskData:
    return build_task(Parity, cfg, seed)


@TASKS.register("modular_addition")
def build_modular_addition(cfg, seed: int) -> TaskData:
    return build_task(ModularAddition, cfg, seed, modulus=cfg.modulus)


@TASKS.register("permutation")
def build_permutation(cfg, seed: int) -> TaskData:
    return build_task(Permutation, cfg, seed, degree=cfg.degree)


@TASKS.register("dyck")
def build_dyck(cfg, seed: int) -> TaskData:
    return build_task(Dyck, cfg, seed, num_types=cfg.num_types, max_depth=cfg.max_depth,
                      balanced=cfg.balanced)
