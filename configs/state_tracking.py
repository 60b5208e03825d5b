"""State tracking (parity, modular addition, S3/S5 word problems, bounded Dyck) with length
generalisation: train on sequences up to `train_len`, test on longer ones.

Parity with Gated DeltaNet, negative eigenvalues (beta in (0, 2)) against the plain one (2 layers,
d_model 64, trained on length 64 with every position supervised, tested up to 4x longer):

    python scripts/train.py --config configs/state_tracking.py:task=parity,model=gated_deltanet_neg,train_len=64,test_lens=64/128/256,layers=2,d_model=64 \
        --workdir runs/parity_neg --config.train.steps=1500 --config.train.eval_every=250
    python scripts/train.py --config configs/state_tracking.py:task=parity,model=gated_deltanet,train_len=64,test_lens=64/128/256,layers=2,d_model=64 \
        --workdir runs/parity_pos --config.train.steps=1500 --config.train.eval_every=250

Measured (2-core shared CPU, about 8 min each, seed 0, 500 test sequences per slice; `_last` is the
accuracy of the final position alone):

    model               lr     steps  T64   T64_last  T128   T128_last  T256   T256_last
    gated_deltanet_neg  3e-3   1500   1.000 1.000     1.000  1.000      0.990  0.926
    gated_deltanet      3e-3   1500   0.824 0.506     0.661  0.496      0.584  0.508
    gated_deltanet      1e-2   1500   0.832 0.514     0.667  0.464      0.581  0.488
    gated_deltanet      1e-3   2500   0.817 0.518     0.659  0.502      0.581  0.522

With negative eigenvalues the model reaches test accuracy 0.997 on T64 by step 250 and stays
near-perfect up to position ~190 of length-256 sequences (per-position accuracy 1.000 on positions
0-127, 0.997 on 128-191, 0.966 on 192-255). Without them it fails even in distribution at any of
the three learning rates: per position, it is right on the first ~16 tokens (1.000 on 0-15, 0.977
on 16-31), then falls to 0.66 on 32-63 and chance (0.50) beyond.

Arguments after `:` (comma-separated):
  `task=` parity | modular_addition | s3 | s5 | dyck (s3 and s5 are the task `permutation` with
    degree 3 and 5; see `memjax/tasks/state_tracking.py` for vocabularies and labels);
  `model=` a registered mixer or a preset (`gated_deltanet_neg`, the default, `deltanet_neg`, ...),
    or a layer pattern (`swa+gated_deltanet`; `based_published` with `layers=5`);
  `d_model=`, `layers=`, `mlp_ratio=` (0: no MLP, as in the other synthetic tasks);
  `train_len=` the longest training length (default 64);
  `test_lens=` test lengths separated by `/`, e.g. `test_lens=64/128/256` (default: 1, 2, 4 and 8
    times train_len);
  `supervise=` `all` (default: every position labelled; training uses sequences of length
    train_len, which supervise every prefix length 1..train_len) or `last` (the final position only;
    training mixes 8 evenly spaced lengths train_len/8, 2*train_len/8, ..., train_len, one slice
    each, as every length would cost one compilation of the train step per length);
  `modulus=` (modular_addition, default 5), `num_types=`, `max_depth=`, `balanced=` (dyck:
    default 2 bracket types, depth <= 4, balanced words; balanced needs even lengths and
    `supervise=all`);
  `train_examples=`, `test_examples=` (per slice), `smoke` (a tiny, fast run for tests).

Test slices: `T<L>` (per-example accuracy over every position of length-L sequences) and, with
`supervise=all`, also `T<L>_last` (accuracy of the final position alone: the clean measure of
length generalisation, since short prefixes of long test sequences are in-distribution).
"""

import math

import ml_collections

from memjax.config import lm_config, make_smoke, mesh_config, parse_arg, train_config

TASKS = {"parity": ("parity", {}), "modular_addition": ("modular_addition", {}),
         "s3": ("permutation", {"degree": 3}), "s5": ("permutation", {"degree": 5}),
         "dyck": ("dyck", {})}


def _lengths(value) -> tuple[int, ...]:
    """`test_lens=` as a tuple of ints: `128` or `"64/128/256"`."""
    try:
        lengths = tuple(int(x) for x in str(value).split("/"))
    except ValueError:
        raise ValueError(f"test_lens must be lengths separated by '/', e.g. 64/128/256, got {value!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"test_lens must be positive lengths, got {value!r}")
    return lengths


def vocab_size(task: str, settings: dict) -> int:
    if task == "parity":
        return 2
    if task == "modular_addition":
        return settings["modulus"]
    if task == "permutation":
        return math.factorial(settings["degree"])
    return 2 * settings["num_types"] + 1  # dyck: EMPTY, k openings, k closings


def get_config(arg=None):
    arg = parse_arg(arg, task="parity", model="gated_deltanet_neg", d_model=64, layers=2,
                    mlp_ratio=0.0, train_len=64, test_lens="", supervise="all", modulus=5,
                    num_types=2, max_depth=4, balanced=True, train_examples=50_000,
                    test_examples=500, smoke=False)
    if arg["task"] not in TASKS:
        raise ValueError(f"unknown task {arg['task']!r}; known: {', '.join(TASKS)}")
    if arg["supervise"] not in ("all", "last"):
        raise ValueError(f"supervise must be 'all' or 'last', got {arg['supervise']!r}")
    name, settings = TASKS[arg["task"]]
    settings = dict(settings)
    if name == "modular_addition":
        settings["modulus"] = arg["modulus"]
    if name == "dyck":
        settings |= {"num_types": arg["num_types"], "max_depth": arg["max_depth"],
                     "balanced": arg["balanced"]}
    train_len, supervise = arg["train_len"], arg["supervise"]
    test_lens = _lengths(arg["test_lens"]) if arg["test_lens"] != "" else tuple(
        train_len * f for f in (1, 2, 4, 8))
    train_examples, test_examples = arg["train_examples"], arg["test_examples"]
    if arg["smoke"]:
        train_len, test_lens, train_examples, test_examples = 16, (16, 32), 256, 32

    config = ml_collections.ConfigDict()
    config.seed = 0
    vocab = ml_collections.FieldReference(vocab_size(name, settings))
    config.task = ml_collections.ConfigDict()
    config.task.name = name
    config.task.vocab_size = vocab
    config.task.update(settings)
    # (seq_len, num_examples, supervise) per slice; a batch never mixes slices.
    if supervise == "all":
        config.task.train_slices = ((train_len, train_examples, "all"),)
    else:
        # Every length would compile the train step once per length (seconds each); 8 evenly
        # spaced lengths cover short and long prefixes at the cost of 8 compilations.
        lengths = sorted({max(1, train_len * i // 8) for i in range(1, 9)})
        per_length = max(train_examples // len(lengths), 256)
        config.task.train_slices = tuple((t, per_length, "last") for t in lengths)
    test = []
    for length in test_lens:
        test.append((length, test_examples, supervise))
        if supervise == "all" and not (name == "dyck" and arg["balanced"]):
            test.append((length, test_examples, "last"))
    config.task.test_slices = tuple(test)
    config.task.batch_size = 64
    config.task.eval_batch_size = 100

    config.model = lm_config(vocab, arg["d_model"], arg["model"], num_layers=arg["layers"])
    config.model.mlp_ratio = float(arg["mlp_ratio"])
    config.train = train_config(steps=3_000, lr=3e-3)
    config.mesh = mesh_config()

    if arg["smoke"]:
        config.task.batch_size = 16
        config.task.eval_batch_size = 32
        make_smoke(config)
        config.model.num_layers = 1
        if config.model.mixer is not None and "impl" in config.model.mixer:
            # The sequential form compiles in a third of the chunk form's time at these lengths.
            config.model.mixer.impl = "reference"
    return config
