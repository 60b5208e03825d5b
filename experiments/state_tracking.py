"""State tracking vs test length: the delta rule with and without negative eigenvalues.

    python scripts/sweep.py experiments/state_tracking.py --preset cpu
    python scripts/report.py runs/sweeps/state_tracking --out docs/results/state_tracking

The theory (Grazzi et al., "Unlocking state-tracking in linear RNNs through negative
eigenvalues") predicts that a linear RNN whose state-transition eigenvalues lie in [0, 1] cannot
solve parity at arbitrary length, while one with eigenvalues in [-1, 1] can: here the delta rule
with beta in (0, 1) (`gated_deltanet`) against beta in (0, 2) (`gated_deltanet_neg`).

Preset `cpu` (2 runs, ~8 minutes each on a shared 2-core CPU): parity, 2 layers, d_model 64,
trained on length 64 with every position supervised (50k sequences, batch 64, 1500 steps,
learning rate 3e-3), tested on lengths 64, 128 and 256 (500 sequences each). `T<L>_last` is the
accuracy at the final position alone, the clean length-generalisation measure (`T<L>` averages
every position, so short prefixes count too); the length plot uses the `_last` slices.

Preset `full`: parity, modular addition (mod 5), S3 and S5 word problems, and Dyck (2 types,
depth <= 4), each with gated_deltanet, gated_deltanet_neg, deltanet, deltanet_neg and attention,
learning rates {1e-3, 3e-3}, 3000 steps, tests to 8x the training length.
"""

PRESETS = ("cpu", "full")


def _run(task: str, model: str, lr: float, steps: int, test_lens: str) -> dict:
    config = (f"configs/state_tracking.py:task={task},model={model},train_len=64,"
              f"test_lens={test_lens},layers=2,d_model=64")
    return {"name": f"{task}_{model}_lr{lr:g}", "config": config,
            "overrides": {"train.steps": steps, "train.eval_every": 250, "train.lr": lr}}


def runs(preset: str) -> list[dict]:
    if preset == "cpu":
        return [_run("parity", model, 3e-3, 1500, "64/128/256")
                for model in ("gated_deltanet", "gated_deltanet_neg")]
    if preset == "full":
        return [_run(task, model, lr, 3000, "64/128/256/512")
                for task in ("parity", "modular_addition", "s3", "s5", "dyck")
                for model in ("gated_deltanet", "gated_deltanet_neg", "deltanet", "deltanet_neg",
                              "attention")
                for lr in (1e-3, 3e-3)]
    raise ValueError(f"unknown preset {preset!r}; known: cpu, full")
