"""MQAR recall vs recurrent state size for every mixer (the Zoology / Based study).

    python scripts/sweep.py experiments/zoology_mqar.py --preset cpu --parallel 2
    python scripts/report.py runs/sweeps/zoology_mqar --out docs/results/zoology_mqar

Preset `cpu` (8 runs, one per mixer, d_model 128): Zoology's three T=64 test segments (4, 8 and
16 pairs; `mixture=t64`, trained on the same three settings: 100k, 20k and 20k examples),
vocab 8192, batch 128, learning rate 1e-2 (one point of Zoology's grid), 100 warm-up steps,
cosine decay over at most 1000 steps, evaluated every 100 steps on 1000 test examples per
segment (plus the key-swap recall probe on 250), early stop at pooled accuracy 0.99. `based` is
the no-window Based of Zoology's figures. The budget is what a 2-core CPU allows; the report
says per run whether it converged, stopped early or was still climbing. Results and the
comparison with the published figures: docs/results/zoology_mqar/README.md.

Preset `full` (Zoology's Based-era standard, for bigger machines): the full training mixture and
the seven test segments up to (1024, 256) (`mixture=zoology`), trained segment by segment in
each epoch as Zoology's loader does (`task.train_order=segments`), batch 256, learning rates
logspace(-3, -1.5, 4), 32 epochs (32 x 702 = 22,464 steps), weight decay 0.1, no warm-up,
d_model {64, 128, 256}; the report keeps the best learning rate per (mixer, d_model). Not yet
Zoology's layer layout: its two-layer model is a gated convolution (BaseConv) layer followed by
the mixer layer, while ours stacks the mixer twice, each after a short convolution; the
per-layer mixer patterns that would express BaseConv-then-mixer are issue 13.
"""

PRESETS = ("cpu", "full")
MIXERS = ("attention", "based", "deltanet", "gated_deltanet", "linear_attention", "gla",
          "retnet", "rwkv7")
ZOOLOGY_LRS = (1e-3, 3.16e-3, 1e-2, 3.16e-2)  # numpy.logspace(-3, -1.5, 4), rounded
BATCHES_PER_EPOCH = 100_000 // 256 + 4 * (20_000 // 256)  # the Zoology mixture at batch 256: 702
ZOOLOGY_STEPS = 32 * BATCHES_PER_EPOCH


def runs(preset: str) -> list[dict]:
    if preset == "cpu":
        grid = [(128, 1e-2)]
        mixture = "mixture=t64"
        overrides = {"task.batch_size": 128, "train.steps": 1000, "train.eval_every": 100,
                     "train.checkpoint_every": 500, "train.warmup_steps": 100}
    elif preset == "full":
        grid = [(d, lr) for d in (64, 128, 256) for lr in ZOOLOGY_LRS]
        mixture = "mixture=zoology"
        overrides = {"task.batch_size": 256, "task.train_order": "segments",
                     "train.steps": ZOOLOGY_STEPS, "train.warmup_steps": 0,
                     "train.eval_every": BATCHES_PER_EPOCH,
                     "train.checkpoint_every": BATCHES_PER_EPOCH}
    else:
        raise ValueError(f"unknown preset {preset!r}; known: cpu, full")
    return [{"name": f"{mixer}_d{d}_lr{lr:g}",
             "config": f"configs/mqar.py:model={mixer},d_model={d},{mixture}",
             "overrides": {"train.lr": lr, **overrides}}
            for d, lr in grid for mixer in MIXERS]
