"""Test-time memories (Titans, ATLAS) against Gated DeltaNet and attention: recall and passkey.

    python scripts/sweep.py experiments/test_time_memory.py --preset cpu --parallel 2
    python scripts/report.py runs/sweeps/test_time_memory --out docs/results/test_time_memory

Mixers at matched width (d_model 64, 2 layers; the report lists each model's decoding state in
bytes): Titans' LMM with a matrix memory (`lmm`) and with its depth-2 MLP memory (`lmm_mlp`),
MAC (`titans_mac`), MAG (`titans_mag`), MAL (the pattern `lmm+swa`: memory layer, then
sliding-window attention), ATLAS (`atlas`: Muon, Omega window 4, polynomial features, MLP
memory) and Dot (`dot`: the Omega rule on polynomial features, matrix memory), beside
`gated_deltanet` and `attention`.

Preset `cpu` (18 runs: about four hours on two quiet CPU cores with `--parallel 2`, plus 1.5 to
3 hours for each of ATLAS's two; ATLAS and Dot with the smaller memories of CPU_OVERRIDES): MQAR
at growing numbers of pairs (Zoology's T=64 segments: 4, 8 and 16 pairs, `mixture=t64`, vocab
256) with the learning-test recipe (batch 128, AdamW lr 1e-2, 100 warm-up steps, cosine over
1000 steps, early stop at 0.99), and passkey retrieval trained at T=64 and tested at 1x, 2x and 4x
(`configs/passkey.py`, batch 64, lr 3e-3, 1000 steps). The budget is short for the slower
learners (LMM reached 0.98 on the 4-pair segment only at step 1500 in the learning tests): read
a low cpu-preset number as "not learnt in 1000 steps", and confirm with the `full` preset.
Preset `full`: d_model {64, 128}, learning rates {1e-3, 3e-3, 1e-2}, 3000 steps, passkey at T=128.
"""

PRESETS = ("cpu", "full")
MIXERS = ("lmm", "lmm_mlp", "titans_mac", "titans_mag", "lmm+swa", "atlas", "dot",
          "gated_deltanet", "attention")
MQAR_RECIPE = {"task.vocab_size": 256, "task.batch_size": 128, "train.eval_every": 100,
               "train.checkpoint_every": 500, "train.warmup_steps": 100}
PASSKEY_RECIPE = {"train.eval_every": 150, "train.checkpoint_every": 300,
                  "train.warmup_steps": 50}
# What fits two CPU cores (preset cpu only). ATLAS's MLP memory on degree-2 features (273 of a
# 16-wide head) has a [546, 273] first layer, whose per-token Muon step orthogonalises a
# 273 x 273 Gram matrix: out of reach here (it compiled to 920 GB of temporaries before the
# chunk form's Gram-space Muon). The cpu preset runs ATLAS with a matrix memory (Omega rule,
# polynomial features, Muon), 4 heads of 16 and 16-token mini-batches: 4.8 s a train step at
# batch 64 (docs/results/test_time_memory/README.md). Dot has 4 heads of 16 (with 2 it needed
# 16 GB) and trains with mini-batches of 16 tokens (the papers' parallel training; 1.1 s a step
# against 4.8 s at 1). `full` runs both as configured.
CPU_OVERRIDES = {"dot": {"model.mixer.num_heads": 4, "model.mixer.memory_chunk": 16},
                 "atlas": {"model.mixer.architecture": "linear", "model.mixer.num_heads": 4,
                           "model.mixer.memory_chunk": 16}}
# The MLP memory's loss went to NaN at step 94 of MQAR at lr 1e-2 (cpu preset, 2026-12-04).
MQAR_LR = {"lmm_mlp": 3e-3}


def _name(mixer: str) -> str:
    return mixer.replace("+", "_then_")


def runs(preset: str) -> list[dict]:
    if preset == "cpu":
        grid, steps, passkey_T = [(64, None)], 1000, 64
    elif preset == "full":
        grid, steps, passkey_T = [(d, lr) for d in (64, 128) for lr in (1e-3, 3e-3, 1e-2)], 3000, 128
    else:
        raise ValueError(f"unknown preset {preset!r}; known: cpu, full")
    out = []
    cpu = preset == "cpu"
    for d, lr in grid:
        suffix = f"_d{d}" + ("" if lr is None else f"_lr{lr:g}")
        for mixer in MIXERS:
            out.append({"name": f"mqar_{_name(mixer)}{suffix}",
                        "config": f"configs/mqar.py:model={mixer},d_model={d},mixture=t64",
                        "overrides": MQAR_RECIPE
                        | {"train.steps": steps, "train.lr": lr or MQAR_LR.get(mixer, 1e-2)}
                        | (CPU_OVERRIDES.get(mixer, {}) if cpu else {})})
            out.append({"name": f"passkey_{_name(mixer)}{suffix}",
                        "config": f"configs/passkey.py:model={mixer},d_model={d},T={passkey_T},"
                                  "max_mult=4",
                        "overrides": PASSKEY_RECIPE | {"train.steps": steps, "train.lr": lr or 3e-3}
                        | (CPU_OVERRIDES.get(mixer, {}) if cpu else {})})
    return out
