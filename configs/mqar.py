"""Multi-query associative recall (MQAR, Zoology) with a 2-layer language model.

The main job (`make run`), attention on Zoology's first training segment:

    python scripts/train.py --config configs/mqar.py:model=attention --workdir runs/mqar_main

trains on (T=64, 4 pairs, 100k examples, vocab 8192, random filler) and stops early once test
accuracy reaches 0.99. Measured on a 2-core CPU (fresh clone, `make run`, venv creation
included): 2 min 59 s in all, early stop at step 750 with test accuracy 0.996 on T64_K4. Other mixers and settings:

    python scripts/train.py --config configs/mqar.py:model=linear_attention --workdir runs/x \
        --config.train.steps=500 --config.model.d_model=128

Arguments after `:` (comma-separated): `model=<mixer>` (a registered mixer or a preset below),
`d_model=<int>`, `T=<int>` and `pairs=<int>`, `mixture=` (`single`: train and test on (T, pairs)
only; `ladder`: train on (T, pairs), (T/2, pairs/2), ... down to T=64 and test on each, which
converges in far fewer steps; `zoology`: Zoology's full training mixture and its seven test
segments, ignoring T and pairs), `smoke` (a tiny, fast run for tests).
"""

import dataclasses

import ml_collections

from memjax.config import parse_arg
from memjax.layers import mixer_options
from memjax.tasks.mqar import zoology_test_segments, zoology_train_segments

# Presets that are a registered mixer with some options changed.
MIXER_PRESETS = {
    "sliding_window": ("attention", {"window": 16}),
}


def mixer_config(model: str) -> ml_collections.ConfigDict:
    name, overrides = MIXER_PRESETS.get(model, (model, {}))
    options = mixer_options(name) | overrides
    return ml_collections.ConfigDict({"name": name, **options})


def ladder_segments(seq_len: int, num_pairs: int, num_examples: int = 20_000) -> tuple:
    """(T, K, n), (T/2, K/2, n), ... down to T = 64: easier settings mixed into training.

    Recall is learnt first on the short, few-pair segments (as in Zoology's mixture, which starts
    at (64, 4)), which makes the target setting converge in far fewer steps than training on it
    alone.
    """
    segments = []
    while seq_len >= 64 and num_pairs >= 1:
        segments.append((seq_len, num_pairs, num_examples))
        seq_len, num_pairs = seq_len // 2, num_pairs // 2
    return tuple(reversed(segments))


def get_config(arg=None):
    arg = parse_arg(arg, model="attention", d_model=64, T=64, pairs=4, mixture="single",
                    smoke=False)
    config = ml_collections.ConfigDict()
    config.seed = 0

    vocab_size = ml_collections.FieldReference(8192)
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
    elif arg["mixture"] == "zoology":
        config.task.train_segments = tuple(dataclasses.astuple(s) for s in zoology_train_segments())
        config.task.test_segments = tuple(dataclasses.astuple(s) for s in zoology_test_segments())
    else:
        raise ValueError(f"unknown mixture {arg['mixture']!r}; known: single, ladder, zoology")
    config.task.power_a = 0.01
    config.task.random_filler = True
    config.task.batch_size = 256
    config.task.eval_batch_size = 250

    config.model = ml_collections.ConfigDict()
    config.model.name = "lm"
    config.model.vocab_size = vocab_size
    config.model.d_model = arg["d_model"]
    config.model.num_layers = 2
    config.model.mixer = mixer_config(arg["model"])
    config.model.short_conv = 4
    config.model.mlp_ratio = 0.0  # Zoology's MQAR models have no MLP ("Identity" state mixer).
    config.model.norm = "layernorm"
    config.model.pos_emb = "none"
    config.model.max_len = 0
    config.model.tie_embeddings = True

    config.train = ml_collections.ConfigDict()
    config.train.steps = 3_000
    config.train.optimizer = "adamw"
    config.train.lr = 3e-3
    config.train.warmup_steps = 100
    config.train.weight_decay = 0.1
    config.train.b1 = 0.9
    config.train.b2 = 0.98
    config.train.grad_clip = 1.0
    config.train.log_every = 50
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.keep_checkpoints = 3
    config.train.target_accuracy = 0.99  # early stop once pooled test accuracy reaches it; 0 = off
    config.train.progress_bar = True

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1  # devices on the data-parallel axis; -1 = all devices

    if arg["smoke"]:
        vocab_size.set(64)
        config.task.train_segments = ((16, 2, 512),)
        config.task.test_segments = ((16, 2, 64), (32, 4, 64))
        config.task.batch_size = 16
        config.task.eval_batch_size = 32
        config.model.d_model = 16
        config.train.steps = 20
        config.train.warmup_steps = 5
        config.train.log_every = 5
        config.train.eval_every = 10
        config.train.checkpoint_every = 10
        config.train.target_accuracy = 0.0
        config.train.progress_bar = False
    return config
