"""Multi-query associative recall (MQAR, Zoology) with a 2-layer language model.

The main job (`make run`): DeltaNet, a purely recurrent memory (no softmax attention anywhere),
on Zoology's quick MQAR setting (its `basic.py`: T=64, 4 pairs, vocab 256):

    python scripts/train.py --config configs/mqar.py:model=deltanet,vocab=256 \
        --workdir runs/mqar_main --config.model.stack_short_convs=True

trains on 100k examples (random filler) with the MQAR recipe below and stops once test accuracy
on 1000 held-out examples reaches 0.99; the key-swap recall probe is printed beside accuracy.
Measured times: README.md, "The main job".

The MQAR recipe (the defaults here, used by the T=64 studies and the learning tests): the
reference initialisation (`model.init`), AdamW at learning rate 1e-2 (a point of Zoology's grid)
with 100 warm-up steps and cosine decay over 1500 steps, weight decay 0.1 on matrices, batch 128, evaluation
every 100 steps, early stop at 0.99. Other mixers and settings:

    python scripts/train.py --config configs/mqar.py:model=linear_attention --workdir runs/x \
        --config.train.steps=500 --config.model.d_model=128

Arguments after `:` (comma-separated): `model=<mixer>` (a registered mixer, a preset of
`memjax.config.MIXER_PRESETS`, a per-layer pattern such as `swa+gated_deltanet`, or a named
pattern of `memjax.config.LAYER_PATTERNS` such as `based_published`, Based's 5-layer
language-model layout: add `--config.model.num_layers=5`), `d_model=<int>`, `vocab=<int>`
(default 8192, Zoology's), `T=<int>` and `pairs=<int>`,
`mixture=` (`single`: train and test on (T, pairs) only; `ladder`: train on (T, pairs), (T/2, pairs/2), ... down to T=64 and test on each, which
converges in far fewer steps; `t64`: Zoology's three T=64 test segments (4, 8 and 16 pairs),
trained on the same three settings, a CPU-sized cut of Zoology; `zoology`: Zoology's full
training mixture and its seven test segments, ignoring T and pairs), `smoke` (a tiny, fast run
for tests).
"""

import dataclasses

import ml_collections

from memjax.config import lm_config, make_smoke, mesh_config, parse_arg, train_config
from memjax.tasks.mqar import zoology_test_segments, zoology_train_segments


def ladder_segments(seq_len: int, num_pairs: int, num_examples: int = 20_000) -> tuple:
    """(T, K, n), (T/2, K/2, n), ... down to T = 64: easier settings mixed into training.

    Recall is learnt first on the short, few-pair segments (as in Zoology's mixture, which starts
    at (64, 4)), which makes the target setting converge in far fewer steps than training on it
    alone: attention at d_model 128, batch 64, lr 3e-3 reached test accuracy 0.983 on (256, 16)
    after 600 steps with the ladder, against 0.040 trained on (256, 16) alone.
    """
    segments = []
    while seq_len >= 64 and num_pairs >= 1:
        segments.append((seq_len, num_pairs, num_examples))
        seq_len, num_pairs = seq_len // 2, num_pairs // 2
    return tuple(reversed(segments))


def get_config(arg=None):
    arg = parse_arg(arg, model="attention", d_model=64, vocab=8192, T=64, pairs=4,
                    mixture="single", smoke=False)
    config = ml_collections.ConfigDict()
    config.seed = 0

    vocab_size = ml_collections.FieldReference(arg["vocab"])
    config.task = ml_collections.ConfigDict()
    config.task.name = "mqar"
    config.task.vocab_size = vocab_size
    # (seq_len, num_pairs, num_examples) per segment; a batch never mixes segments. Example
    # counts follow Zoology's mixture: 100k for its (64, 4) segment, 20k for the others.
    train_examples = 100_000 if (arg["T"], arg["pairs"]) == (64, 4) else 20_000
    if arg["mixture"] == "single":
        config.task.train_segments = ((arg["T"], arg["pairs"], train_examples),)
        config.task.test_segments = ((arg["T"], arg["pairs"], 1_000),)
    elif arg["mixture"] == "ladder":
        config.task.train_segments = ladder_segments(arg["T"], arg["pairs"])
        config.task.test_segments = tuple((t, k, 1_000) for t, k, _ in config.task.train_segments)
    elif arg["mixture"] == "t64":
        config.task.train_segments = ((64, 4, 100_000), (64, 8, 20_000), (64, 16, 20_000))
        config.task.test_segments = ((64, 4, 1_000), (64, 8, 1_000), (64, 16, 1_000))
    elif arg["mixture"] == "zoology":
        config.task.train_segments = tuple(dataclasses.astuple(s) for s in zoology_train_segments())
        config.task.test_segments = tuple(dataclasses.astuple(s) for s in zoology_test_segments())
    else:
        raise ValueError(f"unknown mixture {arg['mixture']!r}; known: single, ladder, t64, zoology")
    config.task.power_a = 0.01
    config.task.random_filler = True
    config.task.train_order = "shuffled"  # or "segments": Zoology's segment-by-segment epochs
    config.task.batch_size = 128
    config.task.eval_batch_size = 250

    config.model = lm_config(vocab_size, arg["d_model"], arg["model"])
    config.train = train_config(steps=1500, lr=1e-2)
    config.train.eval_every = 100
    config.mesh = mesh_config()

    if arg["smoke"]:
        vocab_size.set(64)
        config.task.train_segments = ((16, 2, 512),)
        config.task.test_segments = ((16, 2, 64), (32, 4, 64))
        config.task.batch_size = 16
        config.task.eval_batch_size = 32
        make_smoke(config)
    return config
