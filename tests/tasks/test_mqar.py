"""Tests for the MQAR task: example invariants, determinism, seeds, batching and resumption."""

import json

import numpy as np
import pytest

from memjax.tasks import mqar
from memjax.tasks.mqar import IGNORE_INDEX, Segment

V = 256  # small vocabulary keeps the tests fast; the construction does not depend on its size


def _check_example(inputs, labels, vocab_size, seq_len, num_pairs, random_filler):
    """Asserts every invariant of one example (see the module docstring of mqar)."""
    k = num_pairs
    assert inputs.shape == labels.shape == (seq_len,)
    assert inputs.dtype == labels.dtype == np.int32
    keys, values = inputs[0 : 2 * k : 2], inputs[1 : 2 * k : 2]
    half = vocab_size // 2
    assert np.all((keys >= 1) & (keys < half)) and len(set(keys.tolist())) == k
    assert np.all((values >= half) & (values < vocab_size)) and len(set(values.tolist())) == k
    assert np.all(labels[: 2 * k] == IGNORE_INDEX)  # the context is never supervised

    (pos,) = np.nonzero(labels != IGNORE_INDEX)
    assert len(pos) == k
    assert np.all(pos >= 2 * k) and np.all((pos - 2 * k) % 2 == 0) and np.all(pos <= seq_len - 2)
    value_of = dict(zip(keys.tolist(), values.tolist()))
    queried = inputs[pos].tolist()
    assert sorted(queried) == sorted(keys.tolist())  # every key is queried exactly once
    for p, key in zip(pos.tolist(), queried):
        assert labels[p] == value_of[key]  # the label is the value that followed the key

    assert np.all((inputs >= 0) & (inputs < vocab_size))
    if not random_filler:
        filler = np.ones(seq_len, bool)
        filler[: 2 * k] = False
        filler[pos] = False
        assert np.all(inputs[filler] == 0)


@pytest.mark.parametrize(
    "vocab_size,seq_len,num_pairs,random_filler",
    [(V, 64, 4, True), (V, 64, 4, False), (V, 64, 16, True), (V, 32, 8, False),
     (V, 4, 1, False), (65, 64, 16, True), (8192, 256, 64, True)],
)
def test_example_invariants(vocab_size, seq_len, num_pairs, random_filler):
    for index in range(20):
        ex = mqar.make_example(
            vocab_size, seq_len, num_pairs, 7, index, random_filler=random_filler
        )
        _check_example(ex["inputs"], ex["labels"], vocab_size, seq_len, num_pairs, random_filler)


def test_make_examples_rows_equal_make_example():
    batch = mqar.make_examples(V, 64, 8, 3, [5, 0, 9, 5])
    assert batch["inputs"].shape == batch["labels"].shape == (4, 64)
    for row, index in enumerate([5, 0, 9, 5]):
        ex = mqar.make_example(V, 64, 8, 3, index)
        np.testing.assert_array_equal(batch["inputs"][row], ex["inputs"])
        np.testing.assert_array_equal(batch["labels"][row], ex["labels"])


def test_example_is_pure_function_of_seed_and_index():
    a = mqar.make_example(V, 64, 4, 11, 3)
    np.random.seed(0)  # the global RNG must play no part
    np.random.rand(10)
    mqar.make_example(V, 64, 4, 11, 4)  # nor the order of calls
    b = mqar.make_example(V, 64, 4, 11, 3)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    for other in (mqar.make_example(V, 64, 4, 11, 4), mqar.make_example(V, 64, 4, 12, 3)):
        assert not np.array_equal(a["inputs"], other["inputs"])


def test_filler_choice_keeps_keys_values_and_queries():
    # Filler is drawn last, so turning it on changes only the zeros.
    plain = mqar.make_example(V, 64, 4, 5, 1, random_filler=False)
    noisy = mqar.make_example(V, 64, 4, 5, 1, random_filler=True)
    np.testing.assert_array_equal(plain["labels"], noisy["labels"])
    kept = plain["inputs"] != 0
    np.testing.assert_array_equal(plain["inputs"][kept], noisy["inputs"][kept])
    assert np.any(noisy["inputs"][~kept] != 0)


def test_gap_distribution_matches_successive_sampling():
    # Zoology draws the query slots with np.random.choice(space, K, replace=False, p=p).
    seq_len, k, n, a = 64, 4, 3000, 0.01
    space = (seq_len - 2 * k) // 2
    batch = mqar.make_examples(V, seq_len, k, 1, np.arange(n), random_filler=False)
    gaps = (np.nonzero(batch["labels"] != IGNORE_INDEX)[1] - 2 * k) // 2
    ours = np.bincount(gaps, minlength=space) / gaps.size
    p = a * np.arange(1, space + 1) ** (a - 1)
    p /= p.sum()
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.choice(space, k, replace=False, p=p) for _ in range(n)])
    ref = np.bincount(ref, minlength=space) / ref.size
    assert np.abs(ours - ref).max() < 0.02
    assert ours[0] > 0.15 and ours[0] > 4 * ours[-1]  # power law: queries cluster early
    # power_a = 1 is uniform over the slots
    uni = mqar.make_examples(V, seq_len, k, 1, np.arange(n), power_a=1.0, random_filler=False)
    ugaps = (np.nonzero(uni["labels"] != IGNORE_INDEX)[1] - 2 * k) // 2
    assert np.abs(np.bincount(ugaps, minlength=space) / ugaps.size - 1 / space).max() < 0.02


def test_segment_seeds():
    train = mqar.segment_seeds(123, 6, "train")
    test = mqar.segment_seeds(123, 6, "test")
    assert train == mqar.segment_seeds(123, 6, "train")  # deterministic
    assert train[:3] == mqar.segment_seeds(123, 3, "train")  # adding segments keeps the others
    assert all(0 <= s < 2**31 for s in train) and all(2**31 <= s < 2**32 for s in test)
    assert len(set(train)) == 6 and len(set(test)) == 6 and not set(train) & set(test)
    assert train != mqar.segment_seeds(124, 6, "train")
    assert all(isinstance(s, int) for s in train + test)
    with pytest.raises(ValueError, match="split"):
        mqar.segment_seeds(123, 2, "valid")


def test_segment_name_and_validation():
    assert Segment(64, 4, 10).name == "T64_K4"
    assert Segment(np.int64(64), 4, 10) == Segment(64, 4, 10)
    with pytest.raises(ValueError, match="num_examples"):
        Segment(64, 4, 0)


def test_segment_dataset():
    seg = Segment(32, 4, 7)
    ds = mqar.segment_dataset(V, seg, 99, random_filler=False)
    assert len(ds) == 7
    for i in (0, 6):
        ex = mqar.make_example(V, 32, 4, 99, i, random_filler=False)
        np.testing.assert_array_equal(ds[i]["inputs"], ex["inputs"])
        np.testing.assert_array_equal(ds[i]["labels"], ex["labels"])


SEGMENTS = [Segment(32, 2, 40), Segment(32, 4, 25), Segment(64, 8, 16)]
B = 8
PER_EPOCH = 5 + 3 + 2  # remainders of 1 and 0 dropped


def _key(batch):
    return batch["inputs"].tobytes() + batch["labels"].tobytes()


def _segment_of(batch):
    """Index of the segment a batch came from, asserting every row agrees."""
    t = batch["inputs"].shape[1]
    counts = set((batch["labels"] != IGNORE_INDEX).sum(axis=1).tolist())
    assert len(counts) == 1, "a batch mixes segments"
    k = counts.pop()
    (seg,) = [i for i, s in enumerate(SEGMENTS) if (s.seq_len, s.num_pairs) == (t, k)]
    return seg


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_batches_cover_each_epoch_and_never_mix_segments():
    assert mqar.batches_per_epoch(SEGMENTS, B) == PER_EPOCH
    ds = mqar.train_dataset(V, SEGMENTS, B, seed=5)
    batches = _take(iter(ds), 2 * PER_EPOCH + 3)  # runs past two epochs: it is endless
    seeds = mqar.segment_seeds(5, len(SEGMENTS), "train")
    expected = {}
    for s, (seg, seed) in enumerate(zip(SEGMENTS, seeds)):
        for j in range(seg.num_examples // B):
            rows = range(j * B, (j + 1) * B)
            batch = mqar.make_examples(V, seg.seq_len, seg.num_pairs, seed, rows)
            expected[_key(batch)] = s
    for batch in batches:
        s = _segment_of(batch)
        assert batch["inputs"].shape == batch["labels"].shape == (B, SEGMENTS[s].seq_len)
        assert batch["inputs"].dtype == batch["labels"].dtype == np.int32
        assert expected[_key(batch)] == s
    epochs = [batches[:PER_EPOCH], batches[PER_EPOCH : 2 * PER_EPOCH]]
    for epoch in epochs:  # each epoch is every batch once
        assert sorted(map(_key, epoch)) == sorted(expected)
    assert [_key(b) for b in epochs[0]] != [_key(b) for b in epochs[1]]  # reshuffled per epoch
    # deterministic from the seed, and the seed matters
    again = _take(iter(mqar.train_dataset(V, SEGMENTS, B, seed=5)), PER_EPOCH)
    assert [_key(b) for b in again] == [_key(b) for b in epochs[0]]
    other = _take(iter(mqar.train_dataset(V, SEGMENTS, B, seed=6)), PER_EPOCH)
    assert not {_key(b) for b in other} & set(expected)


def test_segment_order_trains_segments_one_after_another_each_epoch():
    """Zoology's loader order: segment 0's batches, then segment 1's, ..., again every epoch."""
    ds = mqar.train_dataset(V, SEGMENTS, B, seed=5, order="segments")
    it = iter(ds)
    epochs = [_take(it, PER_EPOCH) for _ in range(2)]
    per_segment = [seg.num_examples // B for seg in SEGMENTS]
    expected_segments = [s for s, n in enumerate(per_segment) for _ in range(n)]
    for epoch in epochs:
        assert [_segment_of(b) for b in epoch] == expected_segments
    shuffled = sorted(map(_key, _take(iter(mqar.train_dataset(V, SEGMENTS, B, seed=5)), PER_EPOCH)))
    assert sorted(map(_key, epochs[0])) == shuffled  # the same batches, in another order
    state = json.loads(json.dumps(it.get_state()))
    following = _take(it, 3)
    fresh = iter(mqar.train_dataset(V, SEGMENTS, B, seed=5, order="segments"))
    fresh.set_state(state)
    assert [_key(b) for b in _take(fresh, 3)] == [_key(b) for b in following]
    with pytest.raises(ValueError, match="unknown training order 'sorted'"):
        mqar.train_dataset(V, SEGMENTS, B, seed=5, order="sorted")


@pytest.mark.parametrize("prefetch", [0, 2])
def test_train_iterator_state_restores_following_batches(prefetch):
    ds = mqar.train_dataset(V, SEGMENTS, B, seed=3, prefetch=prefetch)
    it = iter(ds)
    _take(it, PER_EPOCH - 2)
    state = json.loads(json.dumps(it.get_state()))  # stored by Orbax as JSON
    following = _take(it, 5)  # crosses an epoch boundary
    fresh = iter(mqar.train_dataset(V, SEGMENTS, B, seed=3))
    fresh.set_state(state)
    resumed = _take(fresh, 5)
    assert [_key(b) for b in resumed] == [_key(b) for b in following]


def test_test_datasets():
    segs = [Segment(32, 4, 20), Segment(64, 16, 5)]
    ds = mqar.test_datasets(V, segs, 8, seed=5)
    assert list(ds) == ["T32_K4", "T64_K16"]
    assert len(ds["T32_K4"]) == 3 and len(ds["T64_K16"]) == 1
    assert [b["inputs"].shape for b in ds["T32_K4"]] == [(8, 32), (8, 32), (4, 32)]  # last kept
    assert ds["T64_K16"][0]["labels"].shape == (5, 64)
    assert ((ds["T64_K16"][0]["labels"] != IGNORE_INDEX).sum(axis=1) == 16).all()
    test_seed = mqar.segment_seeds(5, 2, "test")[0]
    np.testing.assert_array_equal(
        ds["T32_K4"][1]["inputs"][3], mqar.make_example(V, 32, 4, test_seed, 11)["inputs"]
    )
    # the same segment in training uses another (train) seed, so other examples
    train = next(iter(mqar.train_dataset(V, segs[:1], 20, seed=5)))
    test_rows = {row.tobytes() for b in ds["T32_K4"] for row in b["inputs"]}
    assert not test_rows & {row.tobytes() for row in train["inputs"]}
    with pytest.raises(ValueError, match="distinct names"):
        mqar.test_datasets(V, [Segment(32, 4, 20), Segment(32, 4, 10)], 8, seed=5)


@pytest.mark.parametrize(
    "vocab_size,seq_len,num_pairs,param",
    [(V, 63, 4, "seq_len"), (V, 0, 1, "seq_len"), (64, 64, 4, "vocab_size"),
     (V, 64, 17, "num_pairs"), (V, 64, 0, "num_pairs")],
)
def test_impossible_settings_raise(vocab_size, seq_len, num_pairs, param):
    with pytest.raises(ValueError, match=param):
        mqar.check_settings(vocab_size, seq_len, num_pairs)
    with pytest.raises(ValueError, match=param):
        mqar.make_example(vocab_size, seq_len, num_pairs, 0, 0)
    mqar.check_settings(V, 64, 16)  # the boundary 4K = T is allowed


def test_dataset_builders_raise():
    with pytest.raises(ValueError, match="seq_len"):
        mqar.train_dataset(V, [Segment(33, 4, 10)], 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        mqar.train_dataset(V, [Segment(32, 4, 100), Segment(32, 2, 7)], 8, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        mqar.test_datasets(32, [Segment(32, 4, 10)], 2, seed=0)
    with pytest.raises(ValueError, match="power_a"):
        mqar.make_example(V, 32, 4, 0, 0, power_a=0.0)


def test_zoology_segments():
    assert [(s.seq_len, s.num_pairs, s.num_examples) for s in mqar.zoology_train_segments()] == [
        (64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000),
        (256, 64, 20_000),
    ]
    assert [(s.seq_len, s.num_pairs, s.num_examples) for s in mqar.zoology_test_segments()] == [
        (64, 4, 1000), (64, 8, 1000), (64, 16, 1000), (128, 32, 1000), (256, 64, 1000),
        (512, 128, 1000), (1024, 256, 1000),
    ]
    for seg in mqar.zoology_train_segments() + mqar.zoology_test_segments():
        mqar.check_settings(8192, seg.seq_len, seg.num_pairs)
