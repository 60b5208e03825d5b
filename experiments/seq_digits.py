"""Pixel-by-pixel (permuted) digit classification: HiPPO-RNN against gated RNNs and S4D.

    python scripts/sweep.py experiments/seq_digits.py --preset cpu
    python scripts/report.py runs/sweeps/seq_digits --out docs/results/seq_digits

The HiPPO paper's sequential-image experiment (permuted MNIST) on the shipped 8x8 scikit-learn
digits (`configs/seq_digits.py`: 64 pixel tokens in one fixed random order, then the class; 1442
train / 355 test images). Each mixer sits in the same 2-layer model as the other tasks
(`memjax.config.lm_config`: d_model 64, a width-4 short convolution before each mixer, no MLP).

Preset `cpu` (5 runs, one per mixer: hippo_rnn, lstm, gru, s4d and gated_deltanet; permuted,
batch 64, 1500 steps, learning rate 3e-3): runs of 119-697 s each on a 2-core CPU, 12 min for
the sweep with `--parallel 2` (measured 2026-12-04; results in docs/results/seq_digits/README.md).
Preset `full`: row-major and permuted, d_model {64, 128}, learning rates {1e-3, 3e-3}, 3000
steps.
"""

PRESETS = ("cpu", "full")
MIXERS = ("hippo_rnn", "lstm", "gru", "s4d", "gated_deltanet")


def _run(model: str, d_model: int, lr: float, steps: int, permuted: bool) -> dict:
    order = "permuted" if permuted else "rowmajor"
    config = f"configs/seq_digits.py:model={model},d_model={d_model}" + (",permuted" if permuted else "")
    return {"name": f"{model}_{order}_d{d_model}_lr{lr:g}", "config": config,
            "overrides": {"train.steps": steps, "train.eval_every": 250, "train.lr": lr}}


def runs(preset: str) -> list[dict]:
    if preset == "cpu":
        return [_run(model, 64, 3e-3, 1500, True) for model in MIXERS]
    if preset == "full":
        return [_run(model, d, lr, 3000, permuted) for model in MIXERS for d in (64, 128)
                for lr in (1e-3, 3e-3) for permuted in (False, True)]
    raise ValueError(f"unknown preset {preset!r}; known: cpu, full")
