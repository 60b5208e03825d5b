"""Sequential image classification: digit images read pixel by pixel, optionally permuted.

The stand-in for (permuted) sequential MNIST at a size that trains in minutes on a CPU: each image
becomes the sequence of its pixels in row-major order, optionally shuffled by one fixed
permutation (permuted digits), and the model must name the digit after reading the last pixel.

Data. By default the images shipped with memjax in ``assets/digits.npz``: the 1797 scikit-learn
"digits" images (``images``: uint8 ``[1797, 8, 8]``, intensities 0..16; ``labels``: uint8
``[1797]``, classes 0..9), which are the test part of the UCI "Optical Recognition of Handwritten
Digits" data set (E. Alpaydin, C. Kaynak, 1998; UCI Machine Learning Repository, data set 80,
https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits), licensed under
Creative Commons Attribution 4.0 (CC BY 4.0). Each image counts the on pixels of a 32x32 bitmap in
4x4 blocks. The file was made once from scikit-learn 1.9.1's ``sklearn/datasets/data/digits.csv.gz``
(columns 0..63 the pixels row-major, column 64 the label), in file order; scikit-learn is not a
dependency.

Alternatively, MNIST-format IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally gzipped, with a ``.gz``
name) in the directory ``config.task.idx_dir`` (see ``read_idx`` and ``load_idx``); the
``train-*`` files are the train split and the ``t10k-*`` files the test split.

Train/test split of the shipped digits (deterministic, disjoint, stratified): image ``i`` is a test
image iff its rank among the images of its class, in file order, is ``4 mod 5`` (the 5th, 10th,
... image of each digit). That gives 355 test images (34 to 36 per class) and 1442 train images.
Note that all 1797 images come from the same 13 writers, so test images share writers with train
images (unlike MNIST's writer-disjoint split).

Construction of one sequence (``levels`` L, ``P = H * W`` pixels, class ``c``):

1. Quantise the intensities ``v`` in ``[0, max_value]`` to ``q = v * L // (max_value + 1)`` in
   ``[0, L)`` (``max_value`` is 16 for the shipped digits, 255 for IDX files; L = 17 keeps the
   digits exact, L = 256 keeps MNIST exact).
2. Flatten row-major: ``x = q.reshape(P)``; with ``permuted``, ``x = x[perm]`` where
   ``perm = pixel_permutation(permutation_seed, P)``: one fixed bijection for every image of both
   splits, drawn from ``np.random.default_rng([permutation_seed, P, PERMUTATION_CODE])``.
3. ``inputs = x`` (int32 ``[P]``; pixel tokens ``0 .. L-1``). ``labels`` (int32 ``[P]``) is
   ``IGNORE_INDEX`` everywhere except the last position, ``labels[P-1] = L + c``: the class token,
   the next token after the last pixel of the sequence ``pixels + [class token]``, so the LM head
   names the class (vocabulary ``L + 10``) and accuracy is classification accuracy.

Which image is example ``index`` of a slice with seed ``seed`` (split of ``n`` images): with
``p, j = divmod(index, n)``, image ``order(seed, p)[j]``, where ``order(seed, p)`` is a permutation
of ``range(n)`` from ``np.random.default_rng([seed, p, ORDER_CODE])``. So any ``n`` consecutive
examples starting at a multiple of ``n`` show every image of the split once ("passes"), each pass in
its own order, and a training slice of many passes gives batches that mix different images every
pass. Examples are still a pure function of ``(seed, index)``; nothing else is random (the pixels
and label are the image's), so no draw is taken from ``data.example_rng``.

Public API: ``NUM_CLASSES``, ``ImageSet``, ``load_digits``, ``digits_split``, ``read_idx``,
``load_idx``, ``quantize``, ``pixel_permutation``, ``DigitsSlice``, ``SequentialImages``, and the
builder registered as task ``"digits"``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
from pathlib import Path

import numpy as np

from memjax.tasks import data
from memjax.tasks.data import IGNORE_INDEX
from memjax.tasks.registry import TASKS, TaskData, parse_settings

__all__ = [
    "DIGITS_PATH",
    "NUM_CLASSES",
    "DigitsSlice",
    "ImageSet",
    "SequentialImages",
    "digits_split",
    "load_digits",
    "load_idx",
    "pixel_permutation",
    "quantize",
    "read_idx",
]

NUM_CLASSES = 10
DIGITS_PATH = Path(__file__).parent / "assets" / "digits.npz"
DIGITS_MAX_VALUE = 16
SPLITS = ("train", "test")
# Every TEST_EVERY-th image of each class (rank % TEST_EVERY == TEST_EVERY - 1) is a test image.
TEST_EVERY = 5
# Extra words of the seed sequences, so these streams never coincide with `data.example_rng`'s
# two-word `[seed, index]` streams.
PERMUTATION_CODE = 0x9E3779B9
ORDER_CODE = 0x7F4A7C15
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (the third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled images split into train and test.

    ``{split}_images``: uint8 ``[N, H, W]`` intensities in ``[0, max_value]``; ``{split}_labels``:
    int64 ``[N]`` classes in ``[0, NUM_CLASSES)``. Arrays are read-only.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    max_value: int

    def __post_init__(self):
        shapes = set()
        for split in SPLITS:
            images, labels = self.images(split), self.labels(split)
            if images.ndim != 3 or labels.shape != images.shape[:1] or not len(labels):
                raise ValueError(f"{self.name}: {split} images must be [N, H, W] with N >= 1 labels "
                                 f"[N], got {images.shape} and {labels.shape}")
            if labels.min() < 0 or labels.max() >= NUM_CLASSES:
                raise ValueError(f"{self.name}: {split} labels must be in [0, {NUM_CLASSES}), got "
                                 f"range [{labels.min()}, {labels.max()}]")
            if images.min() < 0 or images.max() > self.max_value:
                raise ValueError(f"{self.name}: {split} intensities must be in [0, {self.max_value}],"
                                 f" got range [{images.min()}, {images.max()}]")
            shapes.add(images.shape[1:])
        if len(shapes) != 1:
            raise ValueError(f"{self.name}: train and test images differ in shape: {sorted(shapes)}")

    def images(self, split: str) -> np.ndarray:
        return getattr(self, f"{_check_split(split)}_images")

    def labels(self, split: str) -> np.ndarray:
        return getattr(self, f"{_check_split(split)}_labels")

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.train_images.shape[1:]


def _check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got split={split!r}")
    return split


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, test_indices)`` of the stratified split described in the module docstring.

    Image ``i`` is in test iff ``#{j < i : labels[j] == labels[i]} % 5 == 4``. Both index arrays
    are increasing and together are ``range(len(labels))`` exactly once.
    """
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    is_test = rank % TEST_EVERY == TEST_EVERY - 1
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


@functools.lru_cache(maxsize=1)
def load_digits() -> ImageSet:
    """The shipped scikit-learn digits (1797 images, 8x8, 0..16), split 1442 train / 355 test."""
    with np.load(DIGITS_PATH) as archive:
        images, labels = archive["images"], archive["labels"].astype(np.int64)
    train, test = digits_split(labels)
    return ImageSet("digits", _read_only(images[train]), _read_only(labels[train]),
                    _read_only(images[test]), _read_only(labels[test]), DIGITS_MAX_VALUE)


def read_idx(path) -> np.ndarray:
    """The array in an IDX file (the MNIST format), gzipped or not (detected from the content).

    Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), a byte with the number of dimensions k, then k big-endian uint32
    sizes, then the values, big-endian, row-major. Returns the array in native byte order.

    Raises:
      ValueError: the file is not a well-formed IDX file (the message names the path).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(raw)} bytes, {ndim} dimensions)")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX size mismatch: shape {shape} of {dtype.name} needs "
                         f"{expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_path(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"idx_dir {str(directory)!r} has no {name} (or {name}.gz)")


def load_idx(directory, name: str = "mnist") -> ImageSet:
    """An ImageSet from the four MNIST-format IDX files in ``directory`` (see the module docstring).

    Images must be uint8 ``[N, H, W]`` (intensities 0..255) and labels uint8 ``[N]`` in 0..9.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"idx_dir {str(directory)!r} is not a directory")
    arrays = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        images = read_idx(_idx_path(directory, images_name))
        labels = read_idx(_idx_path(directory, labels_name))
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"{images_name}: expected uint8 images [N, H, W], got {images.dtype} "
                             f"{images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{labels_name}: expected {len(images)} uint8 labels, got "
                             f"{labels.dtype} {labels.shape}")
        arrays[f"{split}_images"] = _read_only(images)
        arrays[f"{split}_labels"] = _read_only(labels.astype(np.int64))
    return ImageSet(name, max_value=255, **arrays)


def quantize(images: np.ndarray, max_value: int, levels: int) -> np.ndarray:
    """``images * levels // (max_value + 1)``: intensities ``[0, max_value]`` -> ``[0, levels)``.

    Equal-width bins; ``levels = max_value + 1`` is the identity. Returns uint8 (``levels <= 256``).
    """
    max_value, levels = data.as_int("max_value", max_value), data.as_int("levels", levels)
    if not 2 <= levels <= min(max_value + 1, 256):
        raise ValueError(f"levels must be in [2, {min(max_value + 1, 256)}] for intensities "
                         f"0..{max_value}, got levels={levels}")
    return (np.asarray(images, np.int64) * levels // (max_value + 1)).astype(np.uint8)


def pixel_permutation(seed: int, num_pixels: int) -> np.ndarray:
    """The fixed pixel order of permuted sequences: a permutation of ``range(num_pixels)``.

    Drawn from ``np.random.default_rng([seed, num_pixels, PERMUTATION_CODE])``; a pure function
    of ``(seed, num_pixels)``.
    """
    seed = data.check_seed("permutation_seed", seed)
    num_pixels = data.as_int("num_pixels", num_pixels)
    return np.random.default_rng([seed, num_pixels, PERMUTATION_CODE]).permutation(num_pixels)


@functools.lru_cache(maxsize=256)
def _pass_order(seed: int, pass_index: int, n: int) -> np.ndarray:
    return _read_only(np.random.default_rng([seed, pass_index, ORDER_CODE]).permutation(n))


@dataclasses.dataclass(frozen=True)
class DigitsSlice:
    """A slice of examples from one split: ``(split, num_examples)``.

    ``num_examples = 0`` means every image of the split once; more than the split's size makes
    several passes (each in its own order), useful for training.
    """

    split: str
    num_examples: int = 0

    def __post_init__(self):
        _check_split(self.split)
        num_examples = data.as_int("num_examples", self.num_examples)
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0 (0 = the whole split), got "
                             f"num_examples={num_examples}")
        object.__setattr__(self, "num_examples", num_examples)

    @property
    def name(self) -> str:
        """Slice name for metrics: ``"test_images"``, or ``"test_images_100"`` for a subset."""
        return f"{self.split}_images" + (f"_{self.num_examples}" if self.num_examples else "")


@dataclasses.dataclass(frozen=True, eq=False)
class SequentialImages:
    """An ImageSet as token sequences (see the module docstring for the construction).

    ``permutation``: None (row-major order) or the pixel order, a permutation of ``range(P)``.
    """

    images: ImageSet
    levels: int
    permutation: np.ndarray | None = None

    def __post_init__(self):
        height, width = self.images.image_shape
        if self.permutation is not None:
            perm = np.asarray(self.permutation)
            if perm.shape != (height * width,) or not np.array_equal(np.sort(perm),
                                                                     np.arange(height * width)):
                raise ValueError(f"permutation must be a permutation of range({height * width})")
            object.__setattr__(self, "permutation", _read_only(perm.astype(np.int64)))
        tokens = {}
        for split in SPLITS:
            pixels = quantize(self.images.images(split), self.images.max_value, self.levels)
            pixels = pixels.reshape(len(pixels), height * width)
            if self.permutation is not None:
                pixels = pixels[:, self.permutation]
            tokens[split] = _read_only(pixels)
        object.__setattr__(self, "_tokens", tokens)

    @property
    def seq_len(self) -> int:
        """P, the number of pixels (the sequence length)."""
        height, width = self.images.image_shape
        return height * width

    @property
    def vocab_size(self) -> int:
        """``levels`` pixel tokens then ``NUM_CLASSES`` class tokens."""
        return self.levels + NUM_CLASSES

    def split_size(self, split: str) -> int:
        return len(self.images.labels(split))

    def image_indices(self, split: str, seed: int, indices) -> np.ndarray:
        """Which image of ``split`` each example index shows (see the module docstring)."""
        seed = data.check_seed("seed", seed)
        n = self.split_size(split)
        passes, offsets = np.divmod(data.check_indices(indices).astype(np.int64), n)
        return np.array([_pass_order(seed, int(p), n)[j] for p, j in zip(passes, offsets)], np.int64)

    def make_examples(self, split: str, seed: int, indices) -> dict[str, np.ndarray]:
        """A batch ``{"inputs": int32[N, P], "labels": int32[N, P]}``; row b is example
        ``indices[b]`` (``labels`` is IGNORE_INDEX except ``labels[:, P-1] = levels + class``)."""
        images = self.image_indices(split, seed, np.atleast_1d(indices))
        inputs = self._tokens[split][images].astype(np.int32)
        labels = np.full(inputs.shape, IGNORE_INDEX, np.int32)
        labels[:, -1] = self.levels + self.images.labels(split)[images]
        return {"inputs": inputs, "labels": labels}

    def make_example(self, split: str, seed: int, index: int) -> dict[str, np.ndarray]:
        """Example ``index`` of ``split`` with slice seed ``seed``: ``{"inputs", "labels"}`` int32[P]."""
        index = data.as_int("index", index)
        return {k: v[0] for k, v in self.make_examples(split, seed, [index]).items()}

    def as_slice(self, settings: DigitsSlice) -> data.Slice:
        num_examples = settings.num_examples or self.split_size(settings.split)
        return data.Slice(settings.name, num_examples,
                          functools.partial(self.make_examples, settings.split),
                          max_supervised=1)  # the class token at the last pixel


def _parse_slice(images: SequentialImages, is_test: bool, entry: tuple) -> DigitsSlice:
    if not 1 <= len(entry) <= 2:
        raise ValueError("expected (split,) or (split, num_examples)")
    settings = DigitsSlice(*entry)
    size = images.split_size(settings.split)
    if is_test and settings.num_examples > size:
        raise ValueError(f"num_examples={settings.num_examples} exceeds the {size} images of the "
                         f"{settings.split} split (a test slice scores each image at most once)")
    return settings


@TASKS.register("digits")
def build(cfg, seed: int) -> TaskData:
    """Sequential (permuted) digits from `config.task`: `idx_dir` ("" = the shipped digits, else
    a directory of MNIST-format IDX files), `levels`, `vocab_size` (>= levels + 10), `permuted`,
    `permutation_seed`, `train_slices` and `test_slices` (tuples `(split,)` or
    `(split, num_examples)`, split "train" or "test"), `batch_size`, `eval_batch_size`."""
    data.check_seed("task.permutation_seed", cfg.permutation_seed)
    image_set = load_idx(cfg.idx_dir) if cfg.idx_dir else load_digits()
    height, width = image_set.image_shape
    permutation = pixel_permutation(cfg.permutation_seed, height * width) if cfg.permuted else None
    try:
        images = SequentialImages(image_set, cfg.levels, permutation)
    except ValueError as error:
        raise ValueError(f"task.levels = {cfg.levels}: {error}") from None
    if cfg.vocab_size < images.vocab_size:
        raise ValueError(f"task.vocab_size = {cfg.vocab_size} is too small: levels + {NUM_CLASSES}"
                         f" = {images.vocab_size} tokens are needed")
    train = parse_settings(cfg, "train_slices", functools.partial(_parse_slice, images, False))
    test = parse_settings(cfg, "test_slices", functools.partial(_parse_slice, images, True))
    return TaskData(
        train=data.train_dataset([images.as_slice(s) for s in train], cfg.batch_size, seed),
        test=data.test_datasets([images.as_slice(s) for s in test], cfg.eval_batch_size, seed),
        sample_length=images.seq_len,
    )
