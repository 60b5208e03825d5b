"""The key-swap recall probe for MQAR: does the model read the query key, or only guess a value?

Accuracy alone cannot say whether a model looked the query key up or answered from something else:
a prior over the context's values ("say some value from the context"), or order cues (early pairs
are queried slightly earlier: "the i-th query gets the i-th value" scores 0.27 at T64_K4 against
chance 0.25). The probe tells these apart. Each query key of a test example is replaced by the
key of a *different* pair of the same example, and the prediction at that position is scored
against two labels:

- ``swapped_labels``: the value of the swapped-in key. A model that recalls follows the key, so its
  accuracy here matches its test accuracy.
- ``original_labels``: the value the position had before the swap. A model that ignores the key
  keeps its old answer, so its accuracy here stays near its test accuracy while the swapped one
  drops to chance.

Swap rule. Number the pairs ``0..K-1`` in context order (pair ``i`` is ``k_i v_i`` at positions
``2i, 2i+1``). Per example, ``sigma`` is a uniformly random derangement of ``0..K-1`` (a
permutation with no fixed point, drawn by rejection from ``np.random.default_rng([seed, index,
PROBE_STREAM])``, so it depends only on ``(seed, index)`` and never on the batch it is made in).
The query of pair ``j`` (the position whose input is ``k_j``) gets the input ``k_sigma(j)``, and
its labels are ``v_sigma(j)`` (swapped) and ``v_j`` (original). Because ``sigma`` is a
permutation, the probed example still queries every key exactly once: it is itself a valid MQAR
example with the queries reordered, and its swapped labels are that example's correct labels.
Nothing else changes: the context, the filler and the query positions are those of the example.

One pair (K = 1) admits no swap: such rows keep their inputs and get ``IGNORE_INDEX`` in both label
arrays, so every accuracy skips them (a row without supervised positions counts for nothing).

Public API: ``PROBE_STREAM``, ``derangement``, ``probe_examples``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from memjax.tasks.data import IGNORE_INDEX, as_int, check_indices, check_seed

# Mixed into the seed of each example's derangement so it comes from a stream unrelated to the one
# that drew the example itself (``default_rng([seed, index])``).
PROBE_STREAM = 0x50524F42  # "PROB"

__all__ = ["PROBE_STREAM", "derangement", "probe_examples"]


def derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """A uniformly random permutation of ``0..n-1`` with no fixed point: int64[n], ``n >= 2``.

    Rejection sampling: about 1/e of all permutations are derangements, so ~2.7 draws on average.
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got n={n}")
    while True:
        perm = rng.permutation(n)
        if np.all(perm != np.arange(n)):
            return perm


def _query_structure(inputs: np.ndarray, labels: np.ndarray, num_pairs: int):
    """Query positions ``[N, K]`` (ascending) and the pair index of each query ``[N, K]``.

    Derived from the batch alone: pair ``i``'s key is ``inputs[:, 2i]``, queries are the supervised
    positions, and a query belongs to the pair whose key it repeats (MQAR keys are distinct).
    """
    k = num_pairs
    supervised = labels != IGNORE_INDEX
    if not np.all(supervised.sum(axis=1) == k):
        raise ValueError(f"every row must have exactly num_pairs={k} supervised positions, got "
                         f"{sorted(set(supervised.sum(axis=1).tolist()))}")
    # Stable sort of "not supervised" puts the K supervised positions first, in ascending order.
    positions = np.argsort(~supervised, axis=1, kind="stable")[:, :k]
    keys = inputs[:, 0 : 2 * k : 2]
    matches = np.take_along_axis(inputs, positions, axis=1)[:, :, None] == keys[:, None, :]
    if not np.all(matches.sum(axis=2) == 1):
        raise ValueError("a query key does not match exactly one key of its context; not an MQAR "
                         "batch with distinct keys at positions 0, 2, ..., 2K-2")
    pair = np.argmax(matches, axis=2)
    values = inputs[:, 1 : 2 * k : 2]
    if not np.array_equal(np.take_along_axis(labels, positions, axis=1),
                          np.take_along_axis(values, pair, axis=1)):
        raise ValueError("a query's label is not the value that follows its key in the context")
    return positions, pair


def probe_examples(
    batch: dict[str, np.ndarray],
    num_pairs: int,
    seed: int,
    indices: Sequence[int] | np.ndarray,
) -> dict[str, np.ndarray]:
    """The key-swapped version of a batch of MQAR examples (see the module docstring).

    Args:
      batch: ``{"inputs": int[N, T], "labels": int[N, T]}``, row ``b`` MQAR example ``indices[b]``
        of the segment with seed ``seed`` (``memjax.tasks.mqar.make_examples``).
      num_pairs: K, the number of pairs of every row.
      seed, indices: identify each row; row ``b``'s swap is drawn from ``(seed, indices[b])``.

    Returns:
      ``{"inputs": int32[N, T], "swapped_labels": int32[N, T], "original_labels": int32[N, T]}``:
      the inputs with each query key swapped; labels ``IGNORE_INDEX`` except at the query
      positions. With K = 1 the inputs are unchanged and both labels are all ``IGNORE_INDEX``.

    Raises:
      ValueError: shapes disagree, or a row is not an MQAR example with K pairs.
    """
    k = as_int("num_pairs", num_pairs)
    seed = check_seed("seed", seed)
    indices = check_indices(indices)
    inputs = np.asarray(batch["inputs"], np.int32)
    labels = np.asarray(batch["labels"], np.int32)
    if inputs.ndim != 2 or inputs.shape != labels.shape or len(indices) != inputs.shape[0]:
        raise ValueError(f"need inputs and labels [N, T] and N indices, got {inputs.shape}, "
                         f"{labels.shape} and {len(indices)} indices")
    if k < 1 or 2 * k > inputs.shape[1]:
        raise ValueError(f"num_pairs must be in [1, T/2], got num_pairs={k}, T={inputs.shape[1]}")
    ignored = np.full_like(labels, IGNORE_INDEX)
    if k == 1:  # no other pair to swap in: excluded from the probe
        return {"inputs": inputs.copy(), "swapped_labels": ignored,
                "original_labels": ignored.copy()}

    positions, pair = _query_structure(inputs, labels, k)
    sigma = np.zeros((len(indices), k), np.int64)  # row b: the derangement of example indices[b]
    for row, index in enumerate(indices.tolist()):
        sigma[row] = derangement(np.random.default_rng([seed, index, PROBE_STREAM]), k)
    new_pair = np.take_along_axis(sigma, pair, axis=1)  # [N, K]: the pair swapped into each query
    keys, values = inputs[:, 0 : 2 * k : 2], inputs[:, 1 : 2 * k : 2]

    probed = inputs.copy()
    np.put_along_axis(probed, positions, np.take_along_axis(keys, new_pair, axis=1), axis=1)
    swapped = ignored.copy()
    np.put_along_axis(swapped, positions, np.take_along_axis(values, new_pair, axis=1), axis=1)
    # The original labels are the example's own (IGNORE_INDEX off the query positions already).
    return {"inputs": probed, "swapped_labels": swapped, "original_labels": labels.copy()}
