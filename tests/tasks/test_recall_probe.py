"""The MQAR key-swap recall probe: invariants of probed examples, and that the trainer's
evaluation separates a model that recalls from one that ignores the query key."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from memjax.tasks import mqar, recall_probe
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.mqar import Segment
from memjax.tasks.registry import TASKS
from memjax.train.evaluators import build_evaluators

V = 256


def _probe(vocab_size, seq_len, num_pairs, seed, indices, random_filler=True):
    batch = mqar.make_examples(vocab_size, seq_len, num_pairs, seed, indices,
                               random_filler=random_filler)
    return batch, recall_probe.probe_examples(batch, num_pairs, seed, indices)


def _check_probed_row(inputs, labels, probed, swapped, original, num_pairs):
    """Every invariant of one probed example against the example it came from."""
    k = num_pairs
    keys, values = inputs[0 : 2 * k : 2], inputs[1 : 2 * k : 2]
    value_of = dict(zip(keys.tolist(), values.tolist()))
    (queries,) = np.nonzero(labels != IGNORE_INDEX)
    # Only the query positions change, and every one of them changes (no fixed point).
    changed = np.nonzero(probed != inputs)[0]
    np.testing.assert_array_equal(changed, queries)
    # The new key is another pair's key of the same example, and each key is still queried once.
    assert set(probed[queries].tolist()) <= set(keys.tolist())
    assert sorted(probed[queries].tolist()) == sorted(keys.tolist())
    # Labels: swapped = the new key's value, original = the example's label; nothing elsewhere.
    for p in queries.tolist():
        assert swapped[p] == value_of[int(probed[p])]
        assert original[p] == labels[p] == value_of[int(inputs[p])]
        assert swapped[p] != original[p]
    off = np.ones(len(labels), bool)
    off[queries] = False
    assert np.all(swapped[off] == IGNORE_INDEX) and np.all(original[off] == IGNORE_INDEX)


@pytest.mark.parametrize("seq_len,num_pairs,random_filler", [
    (16, 2, True), (64, 4, True), (64, 4, False), (64, 16, True), (32, 8, False),
])
def test_probed_examples_swap_only_query_keys_for_other_pairs(seq_len, num_pairs, random_filler):
    indices = np.arange(30)
    batch, probe = _probe(V, seq_len, num_pairs, 7, indices, random_filler)
    assert set(probe) == {"inputs", "swapped_labels", "original_labels"}
    for name, array in probe.items():
        assert array.shape == (30, seq_len) and array.dtype == np.int32, name
    for b in range(30):
        _check_probed_row(batch["inputs"][b], batch["labels"][b], probe["inputs"][b],
                          probe["swapped_labels"][b], probe["original_labels"][b], num_pairs)


@pytest.mark.parametrize("segment", mqar.zoology_test_segments(), ids=lambda s: s.name)
def test_every_zoology_test_segment_can_be_probed(segment):
    batch, probe = _probe(8192, segment.seq_len, segment.num_pairs, 3, [0, 999])
    for b in range(2):
        _check_probed_row(batch["inputs"][b], batch["labels"][b], probe["inputs"][b],
                          probe["swapped_labels"][b], probe["original_labels"][b],
                          segment.num_pairs)


def test_probe_is_a_pure_function_of_seed_and_index():
    _, together = _probe(V, 64, 8, 5, [4, 0, 9, 4])
    for row, index in enumerate([4, 0, 9, 4]):
        _, alone = _probe(V, 64, 8, 5, [index])
        for name in together:
            np.testing.assert_array_equal(together[name][row], alone[name][0])
    np.testing.assert_array_equal(together["inputs"][0], together["inputs"][3])
    # Different examples get different swaps (for K = 8 a repeat is very unlikely).
    batch, probe = _probe(V, 64, 8, 5, np.arange(20))
    swaps = {tuple(probe["inputs"][b][batch["labels"][b] != IGNORE_INDEX]) for b in range(20)}
    assert len(swaps) == 20


def test_two_pairs_always_swap_the_pair():
    batch, probe = _probe(V, 16, 2, 1, np.arange(10))
    keys = batch["inputs"][:, 0:4:2]
    for b in range(10):
        q = np.nonzero(batch["labels"][b] != IGNORE_INDEX)[0]
        other = {keys[b, 0]: keys[b, 1], keys[b, 1]: keys[b, 0]}
        assert [other[x] for x in batch["inputs"][b, q]] == probe["inputs"][b, q].tolist()


def test_one_pair_is_excluded():
    batch, probe = _probe(V, 8, 1, 2, np.arange(5))
    np.testing.assert_array_equal(probe["inputs"], batch["inputs"])
    assert np.all(probe["swapped_labels"] == IGNORE_INDEX)
    assert np.all(probe["original_labels"] == IGNORE_INDEX)
    sets = mqar.probe_datasets(V, [Segment(8, 1, 5), Segment(16, 2, 5)], 4, seed=0)
    assert list(sets) == ["T16_K2"]


def test_derangement():
    rng = np.random.default_rng(0)
    assert recall_probe.derangement(rng, 2).tolist() == [1, 0]
    seen = {tuple(recall_probe.derangement(rng, 3)) for _ in range(50)}
    assert seen == {(1, 2, 0), (2, 0, 1)}  # the only two derangements of 3, both drawn
    for n in (4, 17, 256):
        perm = recall_probe.derangement(rng, n)
        assert sorted(perm.tolist()) == list(range(n)) and np.all(perm != np.arange(n))
    with pytest.raises(ValueError, match="n >= 2"):
        recall_probe.derangement(rng, 1)


def test_probe_rejects_batches_that_are_not_mqar():
    batch = mqar.make_examples(V, 32, 4, 0, [0, 1])
    with pytest.raises(ValueError, match="supervised positions"):
        recall_probe.probe_examples(batch, 3, 0, [0, 1])
    broken = {"inputs": batch["inputs"].copy(), "labels": batch["labels"]}
    broken["inputs"][:, 0] = broken["inputs"][:, 2]  # two pairs share a key
    with pytest.raises(ValueError, match="exactly one key"):
        recall_probe.probe_examples(broken, 4, 0, [0, 1])
    with pytest.raises(ValueError, match="N indices"):
        recall_probe.probe_examples(batch, 4, 0, [0])


def test_probe_datasets_perturb_the_test_examples():
    segs = [Segment(32, 4, 20), Segment(16, 1, 6), Segment(64, 8, 5)]
    tests = mqar.test_datasets(V, segs, 8, seed=5)
    probes = mqar.probe_datasets(V, segs, 8, seed=5, max_examples=12)
    assert list(probes) == ["T32_K4", "T64_K8"]
    assert [b["inputs"].shape[0] for b in probes["T32_K4"]] == [8, 4]  # first 12 of 20
    assert len(probes["T64_K8"]) == 1 and probes["T64_K8"][0]["inputs"].shape == (5, 64)
    for name in probes:
        test, probe = tests[name][0], probes[name][0]
        n = probe["inputs"].shape[0]
        np.testing.assert_array_equal(probe["original_labels"], test["labels"][:n])
        same = test["labels"][:n] == IGNORE_INDEX
        np.testing.assert_array_equal(probe["inputs"][same], test["inputs"][:n][same])
        assert np.all(probe["inputs"][~same] != test["inputs"][:n][~same])


# The trainer's default evaluations (test accuracy, recall probe) with two oracle "models".


class RecallOracle:
    """Recalls: predicts the token that followed the query token's first occurrence (its pair's
    value; MQAR's context comes first and keys never occur among values)."""

    def apply(self, variables, inputs, positions):
        query = jnp.take_along_axis(inputs, positions, axis=1)  # [B, M]
        first = jnp.argmax(inputs[:, None, :] == query[:, :, None], axis=-1)  # [B, M]
        prediction = jnp.take_along_axis(inputs, first + 1, axis=1)
        return jax.nn.one_hot(prediction, variables["params"]["vocab"].shape[0])


class MemorizerOracle:
    """Ignores the query token: knows each test example by its first four context tokens and
    answers the example's original label at the position (a perfect prior, no recall)."""

    def apply(self, variables, inputs, positions):
        table = variables["params"]
        row = jnp.argmax(jnp.all(inputs[:, None, :4] == table["contexts"][None], axis=-1), axis=1)
        prediction = jnp.take_along_axis(table["answers"][row], positions, axis=1)
        return jax.nn.one_hot(prediction, table["vocab"].shape[0])


def _task(vocab_size=8192):
    cfg = ml_collections.ConfigDict(dict(
        name="mqar", vocab_size=vocab_size, train_segments=((16, 2, 32),),
        test_segments=((16, 2, 40), (32, 4, 40), (16, 1, 8)), power_a=0.01, random_filler=True,
        train_order="shuffled",
        batch_size=32, eval_batch_size=16))
    return TASKS.get("mqar")(cfg, 0), cfg.eval_batch_size


def _memorized(test_sets, vocab_size):
    contexts, answers = [], []
    for batches in test_sets.values():
        for batch in batches:
            contexts.append(batch["inputs"][:, :4])
            labels = batch["labels"]
            answers.append(np.pad(labels, ((0, 0), (0, 32 - labels.shape[1]))))
    contexts = np.concatenate(contexts)
    assert len({row.tobytes() for row in contexts}) == len(contexts)  # the lookup is unambiguous
    return {"contexts": contexts, "answers": np.concatenate(answers),
            "vocab": np.zeros(vocab_size)}


def _evaluate(model, params, task, eval_batch_size, evals=None):
    return build_evaluators(evals, task, model, eval_batch_size, None)(params)


def test_probe_separates_recall_from_a_prior():
    task, eval_batch_size = _task()
    assert list(task.probe) == ["T16_K2", "T32_K4"]  # the one-pair segment is not probed
    recall = _evaluate(RecallOracle(), {"vocab": np.zeros(8192)}, task, eval_batch_size)
    prior = _evaluate(MemorizerOracle(), _memorized(task.test, 8192), task, eval_batch_size)
    names = ["T16_K2/", "T32_K4/", ""]
    for result in (recall, prior):  # both are perfect on the test set itself
        assert result["test/accuracy"] == 1.0
        assert all(result[f"test/{n}accuracy"] == 1.0 for n in names + ["T16_K1/"])
        assert not any(k.startswith("probe/T16_K1") for k in result)
    for n in names:
        assert recall[f"probe/{n}swapped_accuracy"] == 1.0
        assert recall[f"probe/{n}original_accuracy"] == 0.0
        assert prior[f"probe/{n}swapped_accuracy"] == 0.0
        assert prior[f"probe/{n}original_accuracy"] == 1.0


def test_without_a_swap_the_prior_would_pass_for_recall(monkeypatch):
    # The separation above is not vacuous: with the identity instead of a derangement (no swap),
    # the probe no longer tells the memorizer from recall.
    monkeypatch.setattr(recall_probe, "derangement", lambda rng, n: np.arange(n))
    task, eval_batch_size = _task()
    prior = _evaluate(MemorizerOracle(), _memorized(task.test, 8192), task, eval_batch_size)
    assert prior["probe/swapped_accuracy"] == prior["probe/original_accuracy"] == 1.0


def test_evaluate_without_probe_reports_test_accuracy_only():
    task, eval_batch_size = _task()
    result = _evaluate(RecallOracle(), {"vocab": np.zeros(8192)}, task, eval_batch_size,
                       evals={"test": {"type": "accuracy"}})
    assert result["test/accuracy"] == 1.0 and not any(k.startswith("probe/") for k in result)
