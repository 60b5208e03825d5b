"""Induction heads / single-query recall (`memjax/tasks/induction.py`) with a 2-layer LM.

Random tokens in which a trigger token appears once followed by a target; the sequence ends with
the trigger and the model must output the target. Vocabulary 32 (trigger 31). Trained at length
T and tested at T, 2T and 4T (length extrapolation).

    python scripts/train.py --config configs/induction.py:model=attention --workdir runs/induction

Arguments after `:` (comma-separated): `model=` a registered mixer or a preset (default
attention), `d_model=` (default 64), `T=` the training length (default 128), `smoke` (a tiny,
fast run for tests). Slices are named `T<T>`. These defaults have not been measured for how fast
they are learnt.
"""

import ml_collections

from memjax.config import lm_config, make_smoke, mesh_config, parse_arg, train_config


def get_config(arg=None):
    arg = parse_arg(arg, model="attention", d_model=64, T=128, smoke=False)
    seq_len = arg["T"]

    config = ml_collections.ConfigDict()
    config.seed = 0
    vocab_size = ml_collections.FieldReference(32)
    config.task = ml_collections.ConfigDict()
    config.task.name = "induction"
    config.task.vocab_size = vocab_size
    # (seq_len, num_examples) per slice; one supervised position per example.
    config.task.train_slices = ((seq_len, 50_000),)
    config.task.test_slices = tuple((m * seq_len, 500) for m in (1, 2, 4))
    config.task.batch_size = 64
    config.task.eval_batch_size = 250

    config.model = lm_config(vocab_size, arg["d_model"], arg["model"])
    config.train = train_config()
    config.mesh = mesh_config()

    if arg["smoke"]:
        config.task.train_slices = ((16, 256),)
        config.task.test_slices = ((16, 32), (32, 32))
        config.task.batch_size = 16
        config.task.eval_batch_size = 32
        make_smoke(config)
    return config
