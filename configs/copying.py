"""Copying and selective copying (`memjax/tasks/copying.py`) with a 2-layer language model.

`copy`: L random tokens, `T - 2L` blanks, a separator, then the L tokens again (teacher-forced;
labels on the last L positions). `selective_copy` (Mamba's): L tokens at random positions among
blanks, then L markers at which the model outputs the tokens in order. Vocabulary 16 as in the
Mamba paper's setting (blank 0, separator/marker 15, data tokens 1..14).

    python scripts/train.py --config configs/copying.py:task=copy,model=attention --workdir runs/copy
    python scripts/train.py --config configs/copying.py:task=selective_copy,model=gated_deltanet \
        --workdir runs/selective_copy

Arguments after `:` (comma-separated):
  `task=` copy (default) | selective_copy;
  `model=` a registered mixer or a preset (default attention), `d_model=` (default 64);
  `T=`, `L=` the training length and number of tokens to copy (defaults 64 and 16 for copy,
    64 and 8 for selective_copy). Test slices: (T, L), a twice longer delay (2T, L) and twice
    the tokens over twice the length (2T, 2L);
  `smoke` (a tiny, fast run for tests).

Slices are named `T<T>_L<L>`. These defaults have not been measured for how fast they are
learnt.
"""

import ml_collections

from memjax.config import lm_config, make_smoke, mesh_config, parse_arg, train_config

DEFAULT_TOKENS = {"copy": 16, "selective_copy": 8}


def get_config(arg=None):
    arg = parse_arg(arg, task="copy", model="attention", d_model=64, T=64, L=0, smoke=False)
    if arg["task"] not in DEFAULT_TOKENS:
        raise ValueError(f"unknown task {arg['task']!r}; known: {', '.join(DEFAULT_TOKENS)}")
    seq_len, num_tokens = arg["T"], arg["L"] or DEFAULT_TOKENS[arg["task"]]

    config = ml_collections.ConfigDict()
    config.seed = 0
    vocab_size = ml_collections.FieldReference(16)
    config.task = ml_collections.ConfigDict()
    config.task.name = arg["task"]
    config.task.vocab_size = vocab_size
    # (seq_len, num_tokens, num_examples) per slice; a batch never mixes slices.
    config.task.train_slices = ((seq_len, num_tokens, 20_000),)
    config.task.test_slices = ((seq_len, num_tokens, 500), (2 * seq_len, num_tokens, 500),
                               (2 * seq_len, 2 * num_tokens, 500))
    config.task.batch_size = 64
    config.task.eval_batch_size = 250

    config.model = lm_config(vocab_size, arg["d_model"], arg["model"])
    config.train = train_config()
    config.mesh = mesh_config()

    if arg["smoke"]:
        config.task.train_slices = ((16, 4, 256),)
        config.task.test_slices = ((16, 4, 32), (24, 6, 32))
        config.task.batch_size = 16
        config.task.eval_batch_size = 32
        make_smoke(config)
    return config
