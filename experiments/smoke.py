"""A minutes-long study that exercises the whole sweep -> report path on a laptop.

    python scripts/sweep.py experiments/smoke.py --parallel 2
    python scripts/report.py runs/sweeps/smoke --out docs/results/smoke

Three mixers (attention, Gated DeltaNet, linear attention) on MQAR (T=64, 4 pairs, vocab 256,
d_model 64, batch 128, learning rate 1e-2, up to 1500 steps evaluated every 100, early stop at
0.99) with the default (reference) initialisation. Attention and Gated DeltaNet must solve it
with real recall (`probe_swapped` close to accuracy, `probe_original` near 0); linear attention
(identity features, a 32 x 32 state per head) is capacity-limited here. Measured times and
results: docs/results/smoke/README.md.
"""

PRESETS = ("cpu",)
MIXERS = ("attention", "gated_deltanet", "linear_attention")
# The MQAR recipe of the T=64 studies (smoke, ssm_recall): lr 1e-2 is in Zoology's grid and is
# where the recurrent mixers learned in the issue-12 pilots; vocab 256 keeps runs short.
T64_RECIPE = {"task.vocab_size": 256, "task.batch_size": 128, "train.steps": 1500,
              "train.eval_every": 100, "train.checkpoint_every": 500, "train.warmup_steps": 100,
              "train.lr": 1e-2}


def runs(preset: str) -> list[dict]:
    if preset != "cpu":
        raise ValueError(f"unknown preset {preset!r}; known: cpu")
    return [{"name": mixer, "config": f"configs/mqar.py:model={mixer},d_model=64",
             "overrides": T64_RECIPE} for mixer in MIXERS]
