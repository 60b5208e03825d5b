"""A minutes-long study that exercises the whole sweep -> report path on a laptop.

    python scripts/sweep.py experiments/smoke.py --parallel 2
    python scripts/report.py runs/sweeps/smoke

Three mixers (attention, gated DeltaNet, linear attention) on MQAR (T=64, 4 pairs, vocab 8192,
d_model 64, batch 64, 300 steps, learning rate 3e-3): 3 runs of 1-2 minutes each on a 2-core CPU.
Attention usually ends near 0.5-1.0 test accuracy at this budget; the point is a quick end-to-end
check, not a converged comparison (see zoology_mqar for that).
"""

PRESETS = ("cpu",)
MIXERS = ("attention", "gated_deltanet", "linear_attention")


def runs(preset: str) -> list[dict]:
    if preset != "cpu":
        raise ValueError(f"unknown preset {preset!r}; known: cpu")
    overrides = {"task.batch_size": 64, "train.steps": 300, "train.eval_every": 100,
                 "train.checkpoint_every": 100, "train.warmup_steps": 30, "train.lr": 3e-3}
    return [{"name": mixer, "config": f"configs/mqar.py:model={mixer},d_model=64",
             "overrides": overrides} for mixer in MIXERS]
