"""Launch-time range checks of every numeric config value, before any work starts.

`validate_config(config)` walks the config and checks each int/float field against the rule for
its path (`RULES`: glob patterns over dotted paths; mixer options are matched by name under
`model.mixer.*` and `model.mixers.<kind>.*`). A value out of range raises `ConfigError` naming
the field, the value and what is allowed. A numeric field without a rule is an error too, so a
new field cannot slip past unchecked. Finally the model's size is estimated: a model whose
parameters and Adam state would not fit in this machine's memory is refused here rather than
deep inside XLA.
"""

import fnmatch
import math
import os
from dataclasses import dataclass
from typing import Callable

BIG = 2**24  # a generous ceiling for lengths, vocabularies and sizes (16.7 M)


class ConfigError(ValueError):
    """A config value is outside what memjax can run; the message names field, value and range."""


@dataclass(frozen=True)
class Rule:
    """`ok(value)` decides; `allowed` says in words what passes (for the error message)."""

    ok: Callable[[float], bool]
    allowed: str


def int_range(low: int, high: int = BIG, note: str = "") -> Rule:
    return Rule(lambda v: isinstance(v, int) and low <= v <= high,
                f"an int in [{low}, {high}]" + (f" ({note})" if note else ""))


def real_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
               note: str = "") -> Rule:
    def ok(v):
        if not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(ok, f"a finite number in {bounds}" + (f" ({note})" if note else ""))


NON_NEGATIVE = int_range(0)

# Mixer options by name (every numeric option of every registered mixer has a rule: a test
# checks it). Divisibility of d_model by num_heads / head_dim is checked separately.
MIXER_RULES = {
    "num_heads": int_range(1, 4096),
    "head_dim": int_range(1, 4096),
    "head_size": int_range(0, 4096, "0 = d_model / num_heads"),
    "window_heads": int_range(1, 4096),
    "chunk_size": int_range(1, 65536),
    "conv_size": int_range(1, 64),
    "window": int_range(0, BIG, "0 = no window"),
    "state_dim": int_range(1, 65536),
    "expand": int_range(1, 64),
    "expand_k": real_range(0, 64, low_open=True),
    "feature_dim": int_range(1, 1024),
    "gate_rank": int_range(1, 65536),
    "low_rank": int_range(1, 65536),
    "dt_rank": int_range(0, 65536, "0 = ceil(d_model / 16)"),
    "dt_min": real_range(0, 1, low_open=True),
    "dt_max": real_range(0, 1, low_open=True),
    "gate_normalizer": real_range(0, 1e6, low_open=True),
    "hidden": int_range(1, 65536),
    "order": int_range(1, 4096),
    "memory_channels": int_range(1, 4096),
    "theta": real_range(0, 1e9, low_open=True),
    "depth": int_range(2, 64, "memory MLP layers"),
    "expansion": int_range(1, 64),
    "memory_chunk": int_range(1, 65536),
    "omega_window": int_range(1, 65536),
    "max_lr": real_range(0, 1e3, low_open=True),
    "feature_degree": int_range(1, 8),
    "persistent_tokens": int_range(0, 65536, "0 = none"),
    "attn_heads": int_range(1, 4096),
    "segment": int_range(1, 65536),
    "num_memories": int_range(1, 256),
    "top_k": int_range(1, 256, "at most num_memories"),
    "capacity": real_range(0, 1e3, note="0 = no capacity limit"),
    "balance_weight": real_range(0, 1e3),
    "eidetic": int_range(0, 65536, "0 = none"),
}

# Sizes of the mesh axes (memjax.train.mesh; that at most one is -1 is checked there).
MESH_AXIS = Rule(lambda v: isinstance(v, int) and (v == -1 or 1 <= v <= BIG),
                 "-1 (the devices the other axes leave) or an int >= 1")

RULES = {
    "seed": NON_NEGATIVE,
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,
    "model.d_model": int_range(1, 65536),
    "model.num_layers": int_range(1, 1024),
    "model.vocab_size": int_range(0, BIG, "0 only for float inputs and outputs"),
    "model.max_len": NON_NEGATIVE,
    "model.input_dim": int_range(0, 65536, "0 = token inputs"),
    "model.output_dim": int_range(0, 65536, "0 = vocab logits"),
    "model.mlp_ratio": real_range(0, 64, note="0 = no MLP"),
    "model.short_conv": int_range(0, 64, "0 = none"),
    "task.vocab_size": int_range(1),
    "task.batch_size": int_range(1, 2**20),
    "task.eval_batch_size": int_range(1, 2**20),
    "task.dim": int_range(1, 65536),
    "task.levels": int_range(2, 65536),
    "task.num_digits": int_range(1, 1024),
    "task.passkey_len": int_range(1, 1024),
    "task.permutation_seed": NON_NEGATIVE,
    "task.power_a": real_range(0, 1e3, low_open=True),
    "train.steps": int_range(1, 2**40),
    "train.grad_accum_steps": int_range(1, 65536, "micro-batches per step"),
    "train.lr": real_range(0, 1e3, low_open=True),
    "train.warmup_steps": int_range(0, 2**40, "and below train.steps"),
    "train.weight_decay": real_range(0, 1e3),
    "train.b1": real_range(0, 1, high_open=True),
    "train.b2": real_range(0, 1, high_open=True),
    "train.grad_clip": real_range(0, 1e9, note="0 = no clipping"),
    "train.log_every": int_range(1, 2**40),
    "train.eval_every": int_range(1, 2**40),
    "train.checkpoint_every": int_range(1, 2**40),
    "train.keep_checkpoints": int_range(1, 10**6),
    "train.target_accuracy": real_range(0, 1, note="0 = no early stop"),
}
RULES.update({f"model.mixer.{name}": rule for name, rule in MIXER_RULES.items()})
RULES.update({f"model.mixers.*.{name}": rule for name, rule in MIXER_RULES.items()})

# Adam keeps two moments beside the parameters and their gradient: 4 float32 copies.
BYTES_PER_PARAMETER = 4 * 4


def numeric_fields(config, prefix: str = ""):
    """`(dotted path, value)` of every int/float leaf (bools excluded) of a (Config)dict."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from numeric_fields(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, value


def rule_for(path: str) -> Rule | None:
    for pattern, rule in RULES.items():
        if fnmatch.fnmatchcase(path, pattern):
            return rule
    return None


def validate_config(config, memory_bytes: int | None = None) -> None:
    """Raises `ConfigError` for the first out-of-range value of `config` (see module doc).

    `memory_bytes`: the memory the model must fit in (default: this machine's RAM).
    """
    for path, value in numeric_fields(config):
        rule = rule_for(path)
        if rule is None:
            raise ConfigError(f"config.{path} = {value!r} has no range rule in "
                              "memjax/config_validation.py: add one")
        if not rule.ok(value):
            raise ConfigError(f"config.{path} = {value!r} is out of range: allowed is {rule.allowed}")
    _check_heads(config.model)
    _check_mesh(config.get("mesh"))
    _check_compute_dtype(config.train)
    if config.train.warmup_steps >= config.train.steps:
        raise ConfigError(f"config.train.warmup_steps = {config.train.warmup_steps} must be below "
                          f"config.train.steps = {config.train.steps}")
    _check_model_fits(config.model, memory_bytes or _machine_memory())


def _check_mesh(mesh) -> None:
    """At most one mesh axis may be -1 (the device count is checked when the mesh is built)."""
    fill = [name for name, size in (mesh or {}).items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1 (the devices the others "
                          f"leave), got {', '.join('mesh.' + n + ' = -1' for n in fill)}")


def _check_compute_dtype(train) -> None:
    dtype = train.get("compute_dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.train.compute_dtype = {dtype!r}: allowed is float32 or bfloat16")


def _layer_mixers(model) -> list[tuple[str, dict]]:
    if model.get("layers"):
        return [(f"model.mixers.{kind}", mixer) for kind, mixer in model.mixers.items()]
    return [("model.mixer", model.mixer)]


def _check_heads(model) -> None:
    """Head counts and widths must split d_model evenly (reported here, not as a shape error);
    with a `head_size` the heads are sized apart from d_model."""
    for where, mixer in _layer_mixers(model):
        for field in ("head_dim",) if mixer.get("head_size") else ("num_heads", "head_dim"):
            width = mixer.get(field)
            if width and model.d_model % width:
                raise ConfigError(f"config.{where}.{field} = {width} does not divide "
                                  f"config.model.d_model = {model.d_model}")


def estimated_parameters(model) -> int:
    """A generous estimate of the parameter count: embeddings plus, per layer, 16 d_model^2 for
    the mixer (the widest, Mamba's expand-2 projections, stay below it) and 3 mlp_ratio
    d_model^2 for a gated MLP."""
    d = model.d_model
    per_layer = (16 + 3 * model.mlp_ratio) * d * d
    tables = ("vocab_size", "max_len", "input_dim", "output_dim")
    embeddings = sum(model.get(name, 0) for name in tables) * d
    return int(model.num_layers * per_layer + embeddings)


def _check_model_fits(model, memory_bytes: int) -> None:
    need = estimated_parameters(model) * BYTES_PER_PARAMETER
    if need > memory_bytes:
        raise ConfigError(
            f"config.model (d_model = {model.d_model}, num_layers = {model.num_layers}, "
            f"vocab_size = {model.vocab_size}) needs about {need / 2**30:.1f} GiB for parameters, "
            f"gradients and Adam state, more than the {memory_bytes / 2**30:.1f} GiB available")


def _machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
