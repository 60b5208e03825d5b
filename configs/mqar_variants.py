"""MQAR variants (`memjax/tasks/mqar_variants.py`) with a 2-layer language model.

`variant=overwrite` (task `mqar_overwrite`, proactive interference): each of K keys is assigned
U times in the context and a query asks for the key's latest value. Training mixes U = 1, 2 and
4 at T = 128, K = 4; the test slices add U = 8 and 12 (accuracy against the number of
interfering updates). Slices `T<T>_K<K>_U<U>`.

`variant=compositional` (task `mqar_compositional`): keys are token pairs (a, b) on a full grid,
so neither token alone identifies the value; a query presents a and b, labelled on b. Training
on (T, K) = (64, 4) and (64, 8); test also (128, 16). Slices `T<T>_K<K>`.

Vocabulary 8192 (as MQAR's configs), blank filler.

    python scripts/train.py --config configs/mqar_variants.py:variant=overwrite,model=gated_deltanet \
        --workdir runs/mqar_overwrite
    python scripts/train.py --config configs/mqar_variants.py:variant=compositional,model=attention \
        --workdir runs/mqar_compositional

Arguments after `:` (comma-separated): `variant=` overwrite (default) | compositional;
`model=` a registered mixer or a preset (default attention), `d_model=` (default 64);
`smoke` (a tiny, fast run for tests). These defaults have not been measured for how fast they
are learnt.
"""

import ml_collections

from memjax.config import lm_config, make_smoke, mesh_config, parse_arg, train_config

VARIANTS = ("overwrite", "compositional")


def get_config(arg=None):
    arg = parse_arg(arg, variant="overwrite", model="attention", d_model=64, smoke=False)
    variant = arg["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")

    config = ml_collections.ConfigDict()
    config.seed = 0
    vocab_size = ml_collections.FieldReference(8192)
    config.task = ml_collections.ConfigDict()
    config.task.name = f"mqar_{variant}"
    config.task.vocab_size = vocab_size
    if variant == "overwrite":
        # (seq_len, num_keys, num_updates, num_examples) per slice.
        config.task.train_slices = tuple((128, 4, u, 20_000) for u in (1, 2, 4))
        config.task.test_slices = tuple((128, 4, u, 500) for u in (1, 2, 4, 8, 12))
    else:
        # (seq_len, num_pairs, num_examples) per slice.
        config.task.train_slices = ((64, 4, 20_000), (64, 8, 20_000))
        config.task.test_slices = ((64, 4, 500), (64, 8, 500), (128, 16, 500))
    config.task.batch_size = 64
    config.task.eval_batch_size = 250

    config.model = lm_config(vocab_size, arg["d_model"], arg["model"])
    config.train = train_config()
    config.mesh = mesh_config()

    if arg["smoke"]:
        vocab_size.set(64)
        if variant == "overwrite":
            config.task.train_slices = ((24, 2, 2, 256),)
            config.task.test_slices = ((24, 2, 1, 32), (32, 2, 3, 32))
        else:
            config.task.train_slices = ((24, 4, 256),)
            config.task.test_slices = ((24, 4, 32), (36, 6, 32))
        config.task.batch_size = 16
        config.task.eval_batch_size = 32
        make_smoke(config)
    return config
