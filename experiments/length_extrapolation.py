"""Passkey retrieval accuracy vs context length for each mixer (length extrapolation).

    python scripts/sweep.py experiments/length_extrapolation.py --preset cpu
    python scripts/report.py runs/sweeps/length_extrapolation --out docs/results/length_extrapolation

Task: `configs/passkey.py` (needle = marker + 5-digit passkey at a random depth in random filler,
vocab 64). Trained at T=128; tested at T = 128, 256 and 512 (1x, 2x, 4x the training length),
each at depths 0, 0.25, 0.5, 0.75 and 1 (200 examples per slice). `accuracy_vs_length.png`
averages the depths of one length.

Preset `cpu` (8 runs, one per mixer, d_model 64, batch 64, 600 steps, learning rate 3e-3, early
stop at 0.99 pooled over every slice): runs of 87-414 s on a shared 2-core CPU (measured;
results in docs/results/length_extrapolation/README.md). At the reference initialisation 600
steps leave linear attention, GLA, RetNet and RWKV-7 on their initial plateau (linear attention
leaves it at step ~1100, RWKV-7 ~1500, GLA and RetNet ~1900: see the study README).
Preset `full`: d_model {64, 128}, 3000 steps, learning rates {1e-3, 3e-3}, and T=256 training
with tests to 2048 (8x).
"""

PRESETS = ("cpu", "full")
MIXERS = ("attention", "based", "gated_deltanet", "deltanet", "gla", "retnet", "linear_attention",
          "rwkv7")


def runs(preset: str) -> list[dict]:
    if preset == "cpu":
        grid = [(64, 3e-3, 128, 600, 4)]
    elif preset == "full":
        grid = [(d, lr, 256, 3000, 8) for d in (64, 128) for lr in (1e-3, 3e-3)]
    else:
        raise ValueError(f"unknown preset {preset!r}; known: cpu, full")
    runs = []
    for d, lr, seq_len, steps, max_mult in grid:
        overrides = {"train.lr": lr, "train.steps": steps, "train.eval_every": 150,
                     "train.checkpoint_every": 150, "train.warmup_steps": 50}
        config = f"configs/passkey.py:d_model={d},T={seq_len},max_mult={max_mult}"
        runs += [{"name": f"{mixer}_d{d}_lr{lr:g}_T{seq_len}",
                  "config": f"{config},model={mixer}",
                  "overrides": overrides} for mixer in MIXERS]
    return runs
