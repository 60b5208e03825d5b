"""Associative recall with the state-space mixers, beside attention and the delta rule.

    python scripts/sweep.py experiments/ssm_recall.py --parallel 2
    python scripts/report.py runs/sweeps/ssm_recall --out docs/results/ssm_recall

MQAR in the smoke study's setting and recipe (`experiments/smoke.py`: T=64, 4 pairs, vocab 256,
d_model 64, 2 layers, batch 128, learning rate 1e-2, up to 1500 steps, early stop at 0.99, the
reference initialisation), for S4D, S5, Mamba, Mamba-2 and the two options the SSM-recall papers
propose: `polarized` (one state channel fixed at decay 1 and one at decay 0, against recency bias;
Wang et al. 2025) and `mimetic` initialisation (Mamba started close to linear attention; Trockman
et al. 2024). Attention and Gated DeltaNet are the references. Measured times and results:
docs/results/ssm_recall/README.md.

Preset `cpu`: the 9 runs above, plus Mamba and Mamba-2 at d_model 128 (`mamba_d128`,
`mamba2_d128`; Zoology's grid has 64, 128 and 256), since at d_model 64 neither reached 0.99
within the 1500 steps (docs/results/ssm_recall/README.md); two tries at the bar: Mamba-2 with a
3000-step schedule (`mamba2_3000`) and Mamba with the block's short convolution stacked on its
own (`mamba_stacked_convs`); then three more for Mamba: the 3000-step schedule that solved it for
Mamba-2, at learning rates 1e-2 and 3e-3 (`mamba_3000_lr0.01`, `mamba_3000_lr0.003`), and 64
states per channel instead of 16 (`mamba_state64`: is the 16-dimensional B/C key space what
blurs its read-out?); the top of Zoology's learning-rate grid, 10^-1.5 (`mamba_lr0.0316`); and
the budget test, a 10,000-step schedule (`mamba_10000`: Zoology trains ~22k steps of 256; every
Mamba run that learned recall was still rising when its schedule ran out; checkpoints every 250
steps, so it can be resumed across sessions); and Zoology's optimiser settings with RMSNorm, as
in Zoology's Mamba block (`mamba_zoology_optim`, the 1500-step schedule: do they speed Mamba up?
and `mamba_zoology_optim_3000`, the same with a 3000-step schedule, checkpoints every 250 steps);
and the two halves of that change on their own, RMSNorm (`mamba_rmsnorm`) and the optimiser
(`mamba_zoology_adamw`), at 1500 steps; and `mamba` and `mamba_zoology_optim` at seeds 1 to 4
(`mamba_seed1`, `mamba_zoology_optim_seed1`, ...); Mamba-2 with Zoology's settings and RMSNorm
(`mamba2_zoology_optim`), and Mamba-2 at seed 1 (`mamba2_seed1`).
Preset `full`: the same mixers on the `zoology_mqar` ladder to (256, 16) at d_model {64, 128},
learning rates {1e-3, 3e-3, 1e-2}, 3000 steps.
"""

PRESETS = ("cpu", "full")
# experiments/smoke.py's T64_RECIPE (a study file is loaded alone, so it cannot import a sibling).
T64_RECIPE = {"task.vocab_size": 256, "task.batch_size": 128, "train.steps": 1500,
              "train.eval_every": 100, "train.checkpoint_every": 500, "train.warmup_steps": 100,
              "train.lr": 1e-2}
# Zoology's optimiser (PyTorch AdamW defaults, weight decay 0.1 on every parameter, no warm-up,
# no clipping) in place of memjax's b2 0.98, clipping at 1.0, 100 warm-up steps and decay-exempt
# biases, norms and dynamics parameters.
ZOOLOGY_OPTIMIZER = {"train.b2": 0.999, "train.grad_clip": 0.0, "train.warmup_steps": 0,
                     "train.weight_decay_exempt": ""}
# ...and with RMSNorm in the blocks, as Zoology's Mamba blocks have.
ZOOLOGY_SETTINGS = ZOOLOGY_OPTIMIZER | {"model.norm": "rmsnorm"}
MAMBA_D64 = "configs/mqar.py:model=mamba,d_model=64"
MAMBA2_D64 = "configs/mqar.py:model=mamba2,d_model=64"
MIXERS = ("attention", "gated_deltanet", "s4d", "s5", "mamba", "mamba2", "mamba_polarized",
          "mamba_mimetic", "mamba2_polarized")


def runs(preset: str) -> list[dict]:
    if preset == "cpu":
        return ([{"name": mixer, "config": f"configs/mqar.py:model={mixer},d_model=64",
                  "overrides": T64_RECIPE} for mixer in MIXERS]
                + [{"name": f"{mixer}_d128", "config": f"configs/mqar.py:model={mixer},d_model=128",
                    "overrides": T64_RECIPE} for mixer in ("mamba", "mamba2")]
                + [{"name": "mamba2_3000", "config": MAMBA2_D64,
                    "overrides": T64_RECIPE | {"train.steps": 3000}},
                   {"name": "mamba_stacked_convs", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | {"model.stack_short_convs": True}}]
                + [{"name": f"mamba_3000_lr{lr:g}", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | {"train.steps": 3000, "train.lr": lr}}
                   for lr in (1e-2, 3e-3)]
                + [{"name": "mamba_state64", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | {"model.mixer.state_dim": 64}},
                   {"name": "mamba_lr0.0316", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | {"train.lr": 10**-1.5}},
                   {"name": "mamba_10000", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | {"train.steps": 10_000,
                                               "train.checkpoint_every": 250}},
                   {"name": "mamba_zoology_optim", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | ZOOLOGY_SETTINGS},
                   {"name": "mamba_zoology_optim_3000", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | ZOOLOGY_SETTINGS | {"train.steps": 3000,
                                                                  "train.checkpoint_every": 250}}]
                # Which half of that change does it: RMSNorm alone, the optimiser alone.
                + [{"name": "mamba_rmsnorm", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | {"model.norm": "rmsnorm"}},
                   {"name": "mamba_zoology_adamw", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | ZOOLOGY_OPTIMIZER}]
                # Mamba's escape from the prior is fragile: memjax's recipe and Zoology's settings
                # at four more seeds (data and initialisation both change with the seed).
                + [{"name": f"{name}_seed{seed}", "config": MAMBA_D64,
                    "overrides": T64_RECIPE | extra | {"seed": seed}}
                   for seed in (1, 2, 3, 4)
                   for name, extra in (("mamba_zoology_optim", ZOOLOGY_SETTINGS), ("mamba", {}))]
                # Do the same settings speed up Mamba-2 (0.9725 after 1500 steps at memjax's)?
                + [{"name": "mamba2_zoology_optim", "config": MAMBA2_D64,
                    "overrides": T64_RECIPE | ZOOLOGY_SETTINGS},
                   {"name": "mamba2_seed1", "config": MAMBA2_D64,
                    "overrides": T64_RECIPE | {"seed": 1}}])
    if preset == "full":
        return [{"name": f"{mixer}_d{d}_lr{lr:g}",
                 "config": f"configs/mqar.py:model={mixer},d_model={d},T=256,pairs=16,mixture=ladder",
                 "overrides": {"train.lr": lr, "train.steps": 3000, "train.eval_every": 250}}
                for mixer in MIXERS for d in (64, 128) for lr in (1e-3, 3e-3, 1e-2)]
    raise ValueError(f"unknown preset {preset!r}; known: cpu, full")
