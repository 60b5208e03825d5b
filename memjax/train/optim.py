"""Optimizers by name, each with linear warm-up, cosine decay to zero and global-norm clipping.

Both masks below come from the parameter classes of `memjax.layers.initializers.parameter_class`,
named in config as comma-separated lists and checked against PARAMETER_CLASSES:

- Weight decay is decoupled (AdamW's `p <- p - lr_t * weight_decay * p`) and applied only to the
  classes not listed in `train.weight_decay_exempt` (by default biases, norms and the memories'
  dynamics parameters such as A_log and dt_bias are exempt, as in the peer codebases).
- Muon (`train.optimizer = "muon"`) orthogonalises the update of 2-D hidden matrices only: a
  parameter gets Muon when it is 2-D (or a scanned stack of them) and its class is not in `train.muon_exempt` (by default
  embeddings, input/output heads, convolution taps, biases, norms and dynamics, the last covering
  decay and gate maps); every other parameter gets Adam with the same schedule and betas.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from memjax.layers.initializers import PARAMETER_CLASSES, classify
from memjax.registry import Registry

OPTIMIZERS = Registry("optimizer")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warm-up from 0 to `cfg.lr` over `cfg.warmup_steps`, then cosine to 0 at `cfg.steps`."""
    if cfg.warmup_steps >= cfg.steps:
        raise ValueError(f"train.warmup_steps ({cfg.warmup_steps}) must be below train.steps ({cfg.steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.steps)


def exempt_classes(cfg, key: str = "weight_decay_exempt") -> frozenset[str]:
    """The parameter classes named in `cfg[key]` (comma-separated), checked against the list."""
    names = frozenset(filter(None, (s.strip() for s in cfg[key].split(","))))
    unknown = names - set(PARAMETER_CLASSES)
    if unknown:
        raise ValueError(f"train.{key} names unknown parameter classes "
                         f"{sorted(unknown)}; known: {', '.join(PARAMETER_CLASSES)}")
    return names


def decay_mask(exempt: frozenset[str]):
    """`params -> tree of bools`: True where weight decay applies (class not in `exempt`)."""
    return lambda params: jax.tree.map(lambda c: c not in exempt, classify(params))


class _DecayState(NamedTuple):
    count: jax.Array


def decoupled_weight_decay(schedule, weight_decay: float, mask) -> optax.GradientTransformation:
    """Adds `-schedule(t) * weight_decay * p` to the (already scaled) update where `mask` holds."""

    def init(params):
        del params
        return _DecayState(jnp.zeros((), jnp.int32))

    def update(updates, state, params):
        rate = schedule(state.count) * weight_decay
        updates = jax.tree.map(lambda u, p, m: u - rate * p if m else u, updates, params, mask(params))
        return updates, _DecayState(state.count + 1)

    return optax.GradientTransformation(init, update)


@OPTIMIZERS.register("adamw")
def adamw(cfg, schedule):
    return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)


def muon_dimensions(exempt: frozenset[str]):
    """`params -> tree`: Muon's dimension numbers where Muon applies, None (Adam) elsewhere.

    Muon applies to Dense kernels (`[fan_in, fan_out]`) whose class is not in `exempt`: 2-D
    parameters, and under `model.scan_layers` the 3-D `[layers, fan_in, fan_out]` stacks in
    `blocks/` (each layer's matrix orthogonalised on its own; the layer axis is a batch axis).
    """

    def numbers(path, p, c):
        if c in exempt:
            return None
        if p.ndim == 2:
            return optax.contrib.MuonDimensionNumbers()
        if p.ndim == 3 and getattr(path[0], "key", None) == "blocks":
            return optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
        return None

    def dimensions(params):
        return jax.tree_util.tree_map_with_path(numbers, params, classify(params))

    return dimensions


@OPTIMIZERS.register("muon")
def muon(cfg, schedule):
    """Muon on 2-D hidden matrices (orthogonalised momentum), Adam on the rest (optax.contrib)."""
    return optax.contrib.muon(schedule, adam_b1=cfg.b1, adam_b2=cfg.b2,
                              muon_weight_dimension_numbers=muon_dimensions(
                                  exempt_classes(cfg, "muon_exempt")))


def build_optimizer(cfg) -> optax.GradientTransformation:
    """`cfg.optimizer` from the `train` config: clipping, the update, then masked weight decay."""
    schedule = learning_rate_schedule(cfg)
    exempt_classes(cfg, "muon_exempt")  # checked for every optimizer: a typo fails at launch
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
    decay = optax.identity()
    if cfg.weight_decay:
        decay = decoupled_weight_decay(schedule, cfg.weight_decay, decay_mask(exempt_classes(cfg)))
    return optax.chain(clip, OPTIMIZERS.get(cfg.optimizer)(cfg, schedule), decay)
