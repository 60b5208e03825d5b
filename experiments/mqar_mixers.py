"""Every mixer on MQAR at T=256 with 16 key-value pairs, d_model 128 (issue 3's table).

    python scripts/sweep.py experiments/mqar_mixers.py
    python scripts/report.py runs/sweeps/mqar_mixers --out docs/results/mqar_mixers

Preset `cpu` (8 runs, one per mixer): vocab 8192, trained on the ladder (T, K) = (64, 4),
(128, 8), (256, 16) with 20k examples each (`mixture=ladder`: the short segments teach recall
first, as in Zoology's mixture), batch 64, learning rate 3e-3 with 50 warm-up steps and cosine
decay over at most 600 steps, evaluation every 150 steps on 1000 test examples per segment,
early stop at pooled test accuracy 0.99. The T256_K16 column is the table. Measured wall times
per run are in `docs/results/mqar_mixers/report.md` (2-core CPU shared with other jobs).
"""

PRESETS = ("cpu",)
MIXERS = ("attention", "based", "gated_deltanet", "deltanet", "gla", "retnet", "linear_attention",
          "rwkv7")


def runs(preset: str) -> list[dict]:
    if preset != "cpu":
        raise ValueError(f"unknown preset {preset!r}; known: cpu")
    overrides = {"task.batch_size": 64, "train.steps": 600, "train.eval_every": 150,
                 "train.checkpoint_every": 150, "train.warmup_steps": 50, "train.lr": 3e-3}
    return [{"name": mixer,
             "config": f"configs/mqar.py:model={mixer},d_model=128,mixture=ladder,T=256,pairs=16",
             "overrides": overrides} for mixer in MIXERS]
