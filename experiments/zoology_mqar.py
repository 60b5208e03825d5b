"""MQAR recall vs recurrent state size for every mixer (the Zoology / Based study).

    python scripts/sweep.py experiments/zoology_mqar.py --preset cpu
    python scripts/report.py runs/sweeps/zoology_mqar --out docs/results/zoology_mqar

Preset `cpu` (16 runs: 8 mixers x d_model {128, 64}, learning rate 3e-3; a laptop-sized cut of
the standard grid): vocab 8192, trained on the ladder (T, K) = (64, 4), (128, 8), (256, 16) with
20k examples each (`mixture=ladder,T=256,pairs=16`: the short segments teach recall first, as in
Zoology's mixture), batch 64, 50 warm-up steps and cosine decay over at most 600 steps,
evaluated every 150 steps on 1000 test examples of each setting, early stop at pooled test
accuracy 0.99. The d_model 128 runs come first; their T256_K16 column is issue 3's per-mixer
table. Measured wall times per run are in `docs/results/zoology_mqar/report.md` (a 2-core CPU
shared with other jobs).

Preset `full` (Zoology's standard, for bigger machines): the full training mixture and the seven
test segments up to (1024, 256) (`mixture=zoology`), batch 256, 10k steps, d_model
{64, 128, 256, 512} and learning rates {1e-4, 3e-4, 1e-3, 3e-3}; the report keeps the best
learning rate per (mixer, d_model).
"""

PRESETS = ("cpu", "full")
MIXERS = ("attention", "based", "gated_deltanet", "deltanet", "gla", "retnet", "linear_attention",
          "rwkv7")


def runs(preset: str) -> list[dict]:
    if preset == "cpu":
        grid = [(d, 3e-3) for d in (128, 64)]
        mixture = "mixture=ladder,T=256,pairs=16"
        overrides = {"task.batch_size": 64, "train.steps": 600, "train.eval_every": 150,
                     "train.checkpoint_every": 150, "train.warmup_steps": 50}
    elif preset == "full":
        grid = [(d, lr) for d in (64, 128, 256, 512) for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
        mixture = "mixture=zoology"
        overrides = {"task.batch_size": 256, "train.steps": 10_000}
    else:
        raise ValueError(f"unknown preset {preset!r}; known: cpu, full")
    return [{"name": f"{mixer}_d{d}_lr{lr:g}",
             "config": f"configs/mqar.py:model={mixer},d_model={d},{mixture}",
             "overrides": {"train.lr": lr, **overrides}}
            for d, lr in grid for mixer in MIXERS]
