"""Mixtures of memories and memory hybrids: do more memories help at fixed total state, and does
each hybrid beat its two halves?

    python scripts/sweep.py experiments/memory_mixtures.py --preset cpu --parallel 1
    python scripts/report.py runs/sweeps/memory_mixtures --out docs/results/memory_mixtures

MoM (`mom`, Gated DeltaNet memories of 2 heads each) at M = 1, 2, 4, 8 memories with top-2
routing (and top-1 at M = 4, with MoM's renormalised weight and with the router's probability
as the weight), against one Gated DeltaNet of the same total state (2M heads of
the same width, every token written to each: `gated_deltanet` with `num_heads = 2M,
head_size = d_model / 2`), on MQAR at Zoology's T=64 segments (4, 8, 16 pairs, `mixture=t64`).
The hybrids with a 16-token window (Infini-attention with segments of 16; the artificial
hippocampus; B'MOJO-style window + fading memory + 4 eidetic tokens) against their halves:
sliding-window attention alone (window 16) and Gated DeltaNet alone, on the same MQAR (keys sit
up to 60 tokens before their queries, beyond the window) and on passkey retrieval trained at
T=64 and tested at 1x, 2x and 4x.

Preset `cpu`: MQAR at d_model 128 (at d_model 64 Gated DeltaNet stayed below 0.2 pooled after
1000 steps of this mixture, docs/results/test_time_memory; at 128 it reaches 0.99 by step 900,
docs/results/zoology_mqar), vocab 256, batch 128, AdamW lr 1e-2, 100 warm-up steps, cosine over
1000 steps, early stop at 0.99; passkey at d_model 64, batch 64, lr 3e-3, 1000 steps. Preset
`full`: learning rates {3e-3, 1e-2} and 3000 steps.
"""

PRESETS = ("cpu", "full")
WINDOW = 16
HYBRIDS = {
    "swa16": {"model.mixer.window": WINDOW},  # model=attention
    "infini_attention": {"model.mixer.segment": WINDOW},
    "hippocampus": {"model.mixer.window": WINDOW},
    "bmojo": {"model.mixer.window": WINDOW, "model.mixer.eidetic": 4},
    "gated_deltanet": {},
}
MQAR_RECIPE = {"task.vocab_size": 256, "task.batch_size": 128, "train.eval_every": 100,
               "train.checkpoint_every": 500, "train.warmup_steps": 100}
PASSKEY_RECIPE = {"train.eval_every": 150, "train.checkpoint_every": 300,
                  "train.warmup_steps": 50}


def mixture_models(d_model: int) -> dict[str, tuple[str, dict]]:
    """name -> (mixer, overrides): MoM at each M and top-k, and its state-matched single memory."""
    models = {}
    for M, top_k in ((1, 1), (2, 2), (4, 1), (4, 2), (8, 2)):
        models[f"mom_m{M}_top{top_k}"] = ("mom", {"model.mixer.num_memories": M,
                                                  "model.mixer.top_k": top_k})
    # Top-1 with MoM's renormalised weight (exactly 1) gives the router no task gradient; with
    # the softmax probability as the weight (Switch Transformer's rule) it gets one.
    models["mom_m4_top1_prob"] = ("mom", {"model.mixer.num_memories": 4, "model.mixer.top_k": 1,
                                          "model.mixer.renormalize": False})
    for M in (2, 4, 8):
        models[f"gdn_state_x{M}"] = ("gated_deltanet", {"model.mixer.num_heads": 2 * M,
                                                        "model.mixer.head_size": d_model // 2})
    return models


def runs(preset: str) -> list[dict]:
    if preset == "cpu":
        lrs, steps = (None,), 1000
    elif preset == "full":
        lrs, steps = (3e-3, 1e-2), 3000
    else:
        raise ValueError(f"unknown preset {preset!r}; known: cpu, full")
    out = []
    for lr in lrs:
        suffix = "" if lr is None else f"_lr{lr:g}"
        mqar = {"train.steps": steps, "train.lr": lr or 1e-2} | MQAR_RECIPE
        passkey = {"train.steps": steps, "train.lr": lr or 3e-3} | PASSKEY_RECIPE
        for name, (mixer, options) in mixture_models(128).items():
            out.append({"name": f"mqar_{name}{suffix}",
                        "config": f"configs/mqar.py:model={mixer},d_model=128,mixture=t64",
                        "overrides": mqar | options})
        for name, options in HYBRIDS.items():
            mixer = "attention" if name == "swa16" else name
            out.append({"name": f"mqar_{name}{suffix}",
                        "config": f"configs/mqar.py:model={mixer},d_model=128,mixture=t64",
                        "overrides": mqar | options})
            out.append({"name": f"passkey_{name}{suffix}",
                        "config": f"configs/passkey.py:model={mixer},d_model=64,T=64,max_mult=4",
                        "overrides": passkey | options})
    return out
