"""State tracking (parity, modular addition, S3/S5 word problems, bounded Dyck) with length
generalisation: train on sequences up to `train_len`, test on longer ones.

Parity with Gated DeltaNet, negative eigenvalues (beta in (0, 2)) against the plain one:

    python scripts/train.py --config configs/state_tracking.py:task=parity,model=gated_deltanet_neg \
        --workdir runs/parity_neg
    python scripts/train.py --config configs/state_tracking.py:task=parity,model=gated_deltanet \
        --workdir runs/parity_pos

Arguments after `:` (comma-separated):
  `task=` parity | modular_addition | s3 | s5 | dyck (s3 and s5 are the task `permutation` with
    degree 3 and 5; see `memjax/tasks/state_tracking.py` for vocabularies and labels);
  `model=` a registered mixer or a preset (`gated_deltanet_neg`, the default, `deltanet_neg`, ...);
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
        if "impl" in config.model.mixer:
            # The sequential form compiles in a third of the chunk form's time at these lengths.
            config.model.mixer.impl = "reference"
    return config
