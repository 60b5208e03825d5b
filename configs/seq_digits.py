"""Sequential (permuted) digit classification, the small stand-in for (permuted) sequential MNIST.

Each 8x8 digit image is read as a sequence of its 64 pixel intensities (17 levels, tokens 0..16),
row-major or, with `permuted`, in one fixed random pixel order; the model names the digit (class
token 17 + c) after the last pixel. 1442 train / 355 test images (see `memjax.tasks.digits`).

    python scripts/train.py --config configs/seq_digits.py:model=gated_deltanet,permuted \
        --workdir runs/pdigits

Measured on the 2-core CPU (2026-12-04, two runs at once; docs/results/seq_digits), gated
DeltaNet, d_model 64, 2 layers, 45,580 parameters, batch 64, 1500 steps
(`--config.train.steps=1500 --config.train.eval_every=250`): permuted 0.899 test accuracy (0.845
at step 250, 0.885 at 1000; 312 s). Training accuracy reaches 1.0: 1442 training images overfit.

Arguments after `:` (comma-separated): `model=<mixer>` (a registered mixer or a preset),
`d_model=<int>`, `permuted` (flag), `smoke` (a tiny, fast run for tests).

MNIST-format IDX files instead of the shipped digits (quantised to `levels` intensity levels;
the vocabulary follows `levels`):

    python scripts/train.py --config configs/seq_digits.py:permuted --workdir runs/pmnist \
        --config.task.idx_dir=/data/mnist --config.task.levels=16 \
        --config.task.train_slices="(('train', 600000),)"

Training runs all `train.steps` (no early stop: `target_accuracy` is 0).
"""

import ml_collections

from memjax.config import lm_config, make_smoke, mesh_config, parse_arg, train_config
from memjax.tasks.digits import NUM_CLASSES


def get_config(arg=None):
    arg = parse_arg(arg, model="gated_deltanet", d_model=64, permuted=False, smoke=False)
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Pixel tokens 0..levels-1, then the NUM_CLASSES class tokens; changing levels moves both.
    levels = ml_collections.FieldReference(17)
    vocab_size = levels + NUM_CLASSES
    config.task = ml_collections.ConfigDict()
    config.task.name = "digits"
    config.task.idx_dir = ""  # "" = the shipped scikit-learn digits; else a directory of IDX files
    config.task.levels = levels  # 17 = the digits' intensities 0..16 unchanged
    config.task.vocab_size = vocab_size
    config.task.permuted = arg["permuted"]
    config.task.permutation_seed = 0  # the fixed pixel order of permuted sequences
    # (split,) = every image of the split once; (split, n) = n examples, in passes over the split
    # each in its own order. 100k training examples = about 70 passes over the 1442 train images
    # per data epoch, so batches mix different images every pass.
    config.task.train_slices = (("train", 100_000),)
    config.task.test_slices = (("test",),)
    config.task.batch_size = 64
    config.task.eval_batch_size = 128

    config.model = lm_config(vocab_size, arg["d_model"], arg["model"])
    config.train = train_config(steps=3_000, lr=3e-3)
    config.train.target_accuracy = 0.0  # run every step; test accuracy is reported at the end
    config.mesh = mesh_config()

    if arg["smoke"]:
        config.task.train_slices = (("train", 256),)
        config.task.test_slices = (("test", 64), ("train", 32))
        config.task.batch_size = 16
        config.task.eval_batch_size = 32
        make_smoke(config)
    return config
