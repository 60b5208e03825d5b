"""Every mixer on one MQAR setting: T=256, 16 key-value pairs, d_model 128 (issue 3's table).

    python scripts/sweep.py experiments/mqar_mixers.py            # preset cpu
    python scripts/report.py runs/sweeps/mqar_mixers --out docs/results/mqar_mixers

Size: one run per mixer (8 runs), vocab 8192, 20k training examples, 1k test examples, one
learning rate (3e-3). Preset `cpu`: batch 64, at most 600 steps (~2 epochs), early stop at 0.99;
7-20 minutes per run on a 2-core CPU depending on the mixer (attention 401 s, Based 528 s,
Gated DeltaNet ~2 s/step). This budget is far from convergence: every mixer stays near chance
(test accuracy ~0.01-0.05); it shows that each mixer trains, not how they rank. Preset `full`: batch 256,
10k steps and the learning rates {1e-3, 3e-3, 1e-2} (for bigger machines).
"""

MIXERS = ("attention", "based", "gated_deltanet", "deltanet", "gla", "retnet", "linear_attention",
          "rwkv7")


def runs(preset: str) -> list[dict]:
    if preset == "cpu":
        settings = [(3e-3, {"task.batch_size": 64, "train.steps": 600, "train.eval_every": 200,
                            "train.checkpoint_every": 200, "train.warmup_steps": 50})]
    elif preset == "full":
        settings = [(lr, {"task.batch_size": 256, "train.steps": 10_000}) for lr in (1e-3, 3e-3, 1e-2)]
    else:
        raise ValueError(f"unknown preset {preset!r}; known: cpu, full")
    return [{"name": f"{mixer}_lr{lr:g}",
             "config": f"configs/mqar.py:model={mixer},T=256,pairs=16,d_model=128",
             "overrides": {"train.lr": lr, **overrides}}
            for mixer in MIXERS for lr, overrides in settings]
