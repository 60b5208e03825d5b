"""A minutes-long study that exercises the whole sweep -> report path on a laptop.

    python scripts/sweep.py experiments/smoke.py --parallel 2
    python scripts/report.py runs/sweeps/smoke

Three mixers (attention, gated DeltaNet, linear attention) on MQAR (T=64, 4 pairs, vocab 256,
d_model 64, batch 128, up to 800 steps, learning rate 3e-3, early stop at 0.99). Measured on the
2-core CPU shared with three other workers: 4 min 9 s for the sweep with `--parallel 2`;
attention stopped early at step 600 with test accuracy 0.997 (70 s), linear attention 0.249
(122 s) and gated DeltaNet 0.210 (249 s) after 800 steps. The point is a quick end-to-end check
(attention must solve it; the recurrent mixers are still learning), not a converged comparison
(see zoology_mqar for that).
"""

PRESETS = ("cpu",)
MIXERS = ("attention", "gated_deltanet", "linear_attention")


def runs(preset: str) -> list[dict]:
    if preset != "cpu":
        raise ValueError(f"unknown preset {preset!r}; known: cpu")
    overrides = {"task.vocab_size": 256, "task.batch_size": 128, "train.steps": 800,
                 "train.eval_every": 200, "train.checkpoint_every": 200, "train.warmup_steps": 30,
                 "train.lr": 3e-3}
    return [{"name": mixer, "config": f"configs/mqar.py:model={mixer},d_model=64",
             "overrides": overrides} for mixer in MIXERS]
