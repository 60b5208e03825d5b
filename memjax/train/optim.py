"""Optimizers by name, each with linear warm-up, cosine decay to zero and global-norm clipping."""

import optax

from memjax.registry import Registry

OPTIMIZERS = Registry("optimizer")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warm-up from 0 to `cfg.lr` over `cfg.warmup_steps`, then cosine to 0 at `cfg.steps`."""
    if cfg.warmup_steps >= cfg.steps:
        raise ValueError(f"train.warmup_steps ({cfg.warmup_steps}) must be below train.steps ({cfg.steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.steps)


@OPTIMIZERS.register("adamw")
def adamw(cfg, schedule):
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("muon")
def muon(cfg, schedule):
    """Muon on matrix parameters (orthogonalised momentum), AdamW on the rest (optax.contrib)."""
    return optax.contrib.muon(schedule, adam_b1=cfg.b1, adam_b2=cfg.b2,
                              weight_decay=cfg.weight_decay, adam_weight_decay=cfg.weight_decay)


def build_optimizer(cfg) -> optax.GradientTransformation:
    """The optimizer `cfg.optimizer` from the `train` config, preceded by gradient clipping."""
    schedule = learning_rate_schedule(cfg)
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
    return optax.chain(clip, OPTIMIZERS.get(cfg.optimizer)(cfg, schedule))
