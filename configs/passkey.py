"""Passkey retrieval / needle in a haystack (`memjax/tasks/passkey.py`) with a 2-layer LM.

Random filler hides a needle (a marker, then an n-digit passkey) at some depth; after a query
marker at the end the model emits the n digits (teacher-forced, labels on those n positions).
Vocabulary 64: needle marker 0, query marker 1, digits 2..11, filler 12..63. Training uses a
uniformly random depth at length T; the test slices cross the lengths T, 2T and 4T (length
extrapolation) with the depths 0, 0.25, 0.5, 0.75 and 1 (0: needle at the start, 1: just before
the query).

    python scripts/train.py --config configs/passkey.py:model=attention --workdir runs/passkey

Measured (docs/results/length_extrapolation, 600 steps at lr 3e-3, reference initialisation):
DeltaNet and Gated DeltaNet solve every slice up to 4x in 300-450 steps; attention is at 0.74
(depths 0-0.75, 1x) and still climbing at step 600; linear attention, GLA, RetNet and RWKV-7 are
still on a loss plateau at chance. They leave it at steps ~1100 (linear attention) to ~1900
(GLA, RetNet): give such mixers 3000 steps or more (`--config.train.steps=3000`).

Arguments after `:` (comma-separated): `model=` a registered mixer or a preset (default
attention), `d_model=` (default 64), `T=` the training length (default 128), `n=` the passkey
length (default 5), `max_mult=` the longest test length as a multiple of T (default 4: tests at
T, 2T, 4T; a power of two), `smoke` (a tiny, fast run for tests). Slices are named `T<T>_d<depth>`
(`T128_drandom` for training).
"""

import ml_collections

from memjax.config import lm_config, make_smoke, mesh_config, parse_arg, train_config

TEST_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def get_config(arg=None):
    arg = parse_arg(arg, model="attention", d_model=64, T=128, n=5, max_mult=4, smoke=False)
    mults = [2**i for i in range(arg["max_mult"].bit_length()) if 2**i <= arg["max_mult"]]
    seq_len = arg["T"]

    config = ml_collections.ConfigDict()
    config.seed = 0
    vocab_size = ml_collections.FieldReference(64)
    config.task = ml_collections.ConfigDict()
    config.task.name = "passkey"
    config.task.vocab_size = vocab_size
    config.task.passkey_len = arg["n"]
    config.task.num_digits = 10
    # (seq_len, depth, num_examples) per slice; depth in [0, 1] or "random" (uniform per example).
    config.task.train_slices = ((seq_len, "random", 20_000),)
    config.task.test_slices = tuple((m * seq_len, depth, 200)
                                    for m in mults for depth in TEST_DEPTHS)
    config.task.batch_size = 64
    config.task.eval_batch_size = 200

    config.model = lm_config(vocab_size, arg["d_model"], arg["model"])
    config.train = train_config()
    config.mesh = mesh_config()

    if arg["smoke"]:
        config.task.passkey_len = 3
        config.task.train_slices = ((16, "random", 256),)
        config.task.test_slices = ((16, 0.0, 32), (32, 0.5, 32), (32, 1.0, 32))
        config.task.batch_size = 16
        config.task.eval_batch_size = 32
        make_smoke(config)
    return config
