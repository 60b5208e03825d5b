"""Sequential (permuted) digits: shipped data, split, permutation, labels, IDX reader, builder."""

import gzip
import struct

import ml_collections
import numpy as np
import pytest

from memjax.config import load_config
from memjax.tasks import TASKS
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.digits import (DIGITS_PATH, NUM_CLASSES, DigitsSlice, SequentialImages,
                                 digits_split, load_digits, load_idx, pixel_permutation, quantize,
                                 read_idx)

# Per-class counts of the 1797 images (the UCI optdigits test set).
CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def task_config(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        name="digits", idx_dir="", levels=17, vocab_size=27, permuted=False, permutation_seed=0,
        train_slices=(("train", 64),), test_slices=(("test",),), batch_size=16, eval_batch_size=32))
    cfg.update(overrides)
    return cfg


def test_shipped_file_has_all_1797_images_with_their_ranges():
    with np.load(DIGITS_PATH) as archive:
        images, labels = archive["images"], archive["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == CLASS_COUNTS
    # Every image has ink and images are not all copies of a few.
    assert images.reshape(1797, -1).sum(axis=1).min() > 0
    assert len(np.unique(images.reshape(1797, -1), axis=0)) > 1700


def test_split_is_disjoint_complete_stratified_and_matches_the_loaded_sets():
    with np.load(DIGITS_PATH) as archive:
        images, labels = archive["images"], archive["labels"].astype(np.int64)
    train, test = digits_split(labels)
    assert len(train) == 1442 and len(test) == 355
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    # The 5th, 10th, ... image of each class (in file order) is a test image.
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        np.testing.assert_array_equal(np.intersect1d(members, test), members[4::5])
    digits = load_digits()
    np.testing.assert_array_equal(digits.train_images, images[train])
    np.testing.assert_array_equal(digits.test_labels, labels[test])
    assert digits.max_value == 16 and digits.image_shape == (8, 8)
    assert digits.train_images.dtype == np.uint8
    assert not digits.train_images.flags.writeable


def test_pixel_permutation_is_a_bijection_fixed_by_its_seed():
    perm = pixel_permutation(3, 64)
    assert sorted(perm.tolist()) == list(range(64))
    np.testing.assert_array_equal(perm, pixel_permutation(3, 64))
    assert not np.array_equal(perm, pixel_permutation(4, 64))
    assert not np.array_equal(perm, np.arange(64))


@pytest.mark.parametrize("permuted", [False, True])
def test_examples_are_the_images_pixels_in_the_fixed_order_with_the_label_last(permuted):
    digits = load_digits()
    perm = pixel_permutation(7, 64) if permuted else np.arange(64)
    task = SequentialImages(digits, 17, perm if permuted else None)
    assert task.seq_len == 64 and task.vocab_size == 27
    for split in ("train", "test"):
        n = task.split_size(split)
        batch = task.make_examples(split, 123, np.arange(n))
        images = task.image_indices(split, 123, np.arange(n))
        # Every image once in the first pass.
        assert sorted(images.tolist()) == list(range(n))
        flat = digits.images(split).reshape(n, 64)[images]
        # The same permutation for every image: position t holds pixel perm[t].
        np.testing.assert_array_equal(batch["inputs"], flat[:, perm])
        assert batch["inputs"].dtype == np.int32 and batch["inputs"].max() <= 16
        # Supervised only at the last position, with the image's class token.
        assert (batch["labels"][:, :-1] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(batch["labels"][:, -1], 17 + digits.labels(split)[images])


def test_examples_are_a_pure_function_of_seed_and_index():
    task = SequentialImages(load_digits(), 17)
    a = task.make_example("train", 5, 1500)  # second pass over the 1442 train images
    b = task.make_example("train", 5, 1500)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    batch = task.make_examples("train", 5, [3, 1500, 3])
    np.testing.assert_array_equal(batch["inputs"][1], a["inputs"])
    np.testing.assert_array_equal(batch["inputs"][0], batch["inputs"][2])
    # Each pass shows every image once, in its own order; the seed changes the order.
    first = task.image_indices("train", 5, np.arange(1442))
    second = task.image_indices("train", 5, np.arange(1442, 2 * 1442))
    assert sorted(second.tolist()) == list(range(1442))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, task.image_indices("train", 6, np.arange(1442)))


def test_quantize_uses_equal_width_bins():
    values = np.arange(256)
    np.testing.assert_array_equal(quantize(values, 255, 16), values >> 4)
    np.testing.assert_array_equal(quantize(np.arange(17), 16, 17), np.arange(17))
    assert quantize(np.arange(17), 16, 2).tolist() == [0] * 9 + [1] * 8
    for levels in (1, 18):
        with pytest.raises(ValueError, match=f"levels must be in \\[2, 17\\].*levels={levels}"):
            quantize(values[:17], 16, levels)


def test_builder_makes_batches_and_applies_the_configured_permutation():
    build = TASKS.get("digits")
    plain = build(task_config(), seed=0)
    permuted = build(task_config(permuted=True, permutation_seed=11), seed=0)
    assert plain.sample_length == 64 and plain.loss == "cross_entropy" and plain.input_dim == 0
    assert list(plain.test) == ["test_images"]
    test_a, test_b = plain.test["test_images"], permuted.test["test_images"]
    assert len(test_a) == 12  # ceil(355 / 32)
    # Same seeds, so the same images in the same order; only the pixel order differs.
    perm = pixel_permutation(11, 64)
    np.testing.assert_array_equal(test_b[0]["inputs"], test_a[0]["inputs"][:, perm])
    np.testing.assert_array_equal(test_b[0]["labels"], test_a[0]["labels"])
    train = next(iter(plain.train))
    assert train["inputs"].shape == (16, 64) and train["labels"].shape == (16, 64)


@pytest.mark.parametrize("overrides, message", [
    ({"train_slices": (("valid", 10),)}, r"task.train_slices\[0\] = \('valid', 10\): split must be one of"),
    ({"train_slices": (("train", -1),)}, r"task.train_slices\[0\].*num_examples must be >= 0"),
    ({"train_slices": (("train", 1, 2),)}, r"task.train_slices\[0\].*expected \(split,\)"),
    ({"test_slices": (("test", 356),)}, r"task.test_slices\[0\] = \('test', 356\): num_examples=356 exceeds the 355"),
    ({"levels": 18}, r"task.levels = 18: levels must be in \[2, 17\]"),
    ({"vocab_size": 26}, r"task.vocab_size = 26 is too small"),
    ({"permutation_seed": -1}, r"task.permutation_seed must be in \[0, 2\*\*32\)"),
    ({"idx_dir": "/nonexistent/mnist"}, r"idx_dir '/nonexistent/mnist' is not a directory"),
])
def test_bad_settings_fail_with_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        TASKS.get("digits")(task_config(**overrides), seed=0)


def test_slice_settings_validate_themselves():
    assert DigitsSlice("test").name == "test_images"
    assert DigitsSlice("train", 100).name == "train_images_100"
    with pytest.raises(ValueError, match="num_examples must be an int"):
        DigitsSlice("train", 1.5)


# IDX files written here byte by byte (independently of the reader).

def idx_bytes(array: np.ndarray, type_code: int = 0x08, dtype: str = ">u1") -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_mnist_like(directory, rng, train=12, test=5, size=(4, 3), compress=False):
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, *size)).astype(np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, *size)).astype(np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test).astype(np.uint8),
    }
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_round_trip(tmp_path, compress):
    arrays = write_mnist_like(tmp_path, np.random.default_rng(0), compress=compress)
    suffix = ".gz" if compress else ""
    for name, array in arrays.items():
        read = read_idx(tmp_path / f"{name}{suffix}")
        assert read.dtype == np.uint8
        np.testing.assert_array_equal(read, array)
    images = load_idx(tmp_path)
    np.testing.assert_array_equal(images.test_images, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(images.train_labels, arrays["train-labels-idx1-ubyte"])
    assert images.max_value == 255 and images.image_shape == (4, 3)


def test_idx_reader_other_types_and_malformed_files(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    (tmp_path / "ints").write_bytes(idx_bytes(values, 0x0C, ">i4"))
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), values)
    floats = np.linspace(0, 1, 5, dtype=np.float32)
    (tmp_path / "floats").write_bytes(idx_bytes(floats, 0x0D, ">f4"))
    np.testing.assert_array_equal(read_idx(tmp_path / "floats"), floats)
    (tmp_path / "bad_magic").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="bad_magic: not an IDX file"):
        read_idx(tmp_path / "bad_magic")
    (tmp_path / "truncated").write_bytes(idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="truncated: IDX size mismatch: shape \\(2, 3\\)"):
        read_idx(tmp_path / "truncated")


def test_builder_reads_idx_files_and_quantises(tmp_path):
    arrays = write_mnist_like(tmp_path, np.random.default_rng(1), compress=True)
    task = TASKS.get("digits")(task_config(idx_dir=str(tmp_path), levels=4, vocab_size=14,
                                           train_slices=(("train", 16),), test_slices=(("test",),),
                                           batch_size=4, eval_batch_size=8),
                               seed=0)
    assert task.sample_length == 12
    (batch,) = [task.test["test_images"][i] for i in range(len(task.test["test_images"]))]
    images = SequentialImages(load_idx(tmp_path), 4).image_indices("test", _test_seed(), np.arange(5))
    expected = arrays["t10k-images-idx3-ubyte"].reshape(5, 12)[images] // 64
    np.testing.assert_array_equal(batch["inputs"], expected)
    np.testing.assert_array_equal(batch["labels"][:, -1], 4 + arrays["t10k-labels-idx1-ubyte"][images])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="has no t10k-labels-idx1-ubyte"):
        TASKS.get("digits")(task_config(idx_dir=str(tmp_path), levels=4, vocab_size=14), seed=0)


def _test_seed():
    from memjax.tasks.data import slice_seeds
    return slice_seeds(0, 1, "test")[0]


@pytest.mark.integration
def test_smoke_training_run(tmp_path):
    from memjax.train.trainer import train

    result = train(load_config("configs/seq_digits.py:smoke,permuted"), tmp_path)
    assert result["step"] == 20
    assert set(result) >= {"test/test_images_64/accuracy", "test/train_images_32/accuracy",
                           "test/accuracy"}
    assert 0.0 <= result["test/accuracy"] <= 1.0
