"""How the train state and the batches are laid out on the `(data, fsdp, tensor)` mesh.

One table, `SHARDING_RULES`, decides for every parameter, from its path in the params tree
(module names and the parameter's name joined by "/", e.g. `block_0/mixer/q/kernel`):

- `tensor`: which dimension, if any, is split over the `tensor` axis (tensor parallelism). The
  q/k/v-style projections of the mixers (`[d_model, heads * width]`, head-major output) split
  their output dimension, the output projections (`[heads * width, d_model]`) their input
  dimension, so a device holds a slice of the heads; `lm_head` splits the vocabulary.
- `fsdp`: whether the parameter is one of the large weights that FSDP splits: its largest
  dimension divisible by the `fsdp` axis size (other than the `tensor` one) is split over `fsdp`.

Where a dimension is not divisible by the axis size, that axis is dropped (the parameter is
replicated over it) instead of failing: e.g. a `[16, 2]` per-head gate map stays whole on a
`tensor` axis of 4, and a 2-D kernel with no dimension divisible by the `fsdp` size stays
replicated over `fsdp`. GSPMD computes the same function whatever the layout (the layouts only
change memory and communication); the head split is exact head-aligned when `num_heads` is a
multiple of the `tensor` size, and otherwise still correct, only with more resharding.

The optimizer state gets its parameter's layout (`opt_state_specs`: each optax state leaf whose
path ends in a parameter's path and has its shape, such as Adam's `mu` and `nu`, mirrors it;
counters and other leaves are replicated). The step and RNG key are replicated. Batches and
activations are split on their leading (batch) axis over `data` and `fsdp`
(`memjax.train.mesh.batch_spec`), replicated over `tensor`.

A pattern matches the end of the path at a "/" boundary (`re.search("(^|/)(?:pattern)$")`): the
pattern `q/kernel` matches `block_0/mixer/q/kernel` and `block_3/mixer/memory/q/kernel`, not
`block_0/mixer/seq/kernel`. The first matching rule wins. There is no catch-all: a parameter
that no rule matches stops the launch with a ValueError naming every such path.

Adding a layer: parameters named like the existing ones (Dense layers called `q`, `k`, `v`,
`qkv`, `gate`, `out`, `proj`, ...; Dense biases; norms whose module name ends in `norm`; short
convolutions `conv*` / `short_conv`) are covered. A new parameter name (a Dense called
`my_proj`, a `self.param("my_decay", ...)`) needs a rule here; add one next to its kin (or pass
`rules=` your own table extended with `SHARDING_RULES`):

    Rule(r"my_proj/kernel", tensor=-1, fsdp=True, note="my layer's head-major projection"),
    Rule(r"my_decay", note="per-head decay: small, replicated"),

The error is deliberate: a layout guessed for an unknown weight can silently cost memory (a big
weight left replicated) or communication (heads split the wrong way); one line in this table
settles it on the laptop before it costs on a pod.
"""

import dataclasses
import functools
import re
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memjax.models.lm import SCANNED
from memjax.train.mesh import FSDP_AXIS, TENSOR_AXIS, batch_sharded, replicated


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` (regex over the end of the parameter path) -> how it is split (module doc).

    `tensor`: the dimension split over the `tensor` axis (negative counts from the end), or None.
    `fsdp`: True to split the largest other dimension divisible by the `fsdp` size over `fsdp`.
    """

    pattern: str
    tensor: int | None = None
    fsdp: bool = False
    note: str = ""

    @functools.cached_property
    def regex(self) -> re.Pattern:
        return re.compile(rf"(?:^|/)(?:{self.pattern})$")

    def matches(self, path: str) -> bool:
        return self.regex.search(path) is not None


# Module names of projections whose output dimension is head-major (q/k/v and kin; gates that
# act per head or per channel; Based's u/g; the MLP's gate/up; a generic `proj`).
HEAD_MAJOR_OUT = "q|k|v|qkv|r|gate|out_gate|u|g|up|store_q|store_k|store_v|retrieve|proj"
# Module names of projections that read the heads back into the residual stream.
HEAD_MAJOR_IN = "out|out_proj|attention_out|down"
# Self-declared per-head or per-channel parameters of the memories' dynamics (small vectors).
DYNAMICS = ("A_log|D|dt_bias|a0|w0|k_a|k_k|r_k|token_shift|beta|decay_bias|lr_bias|momentum_bias"
            "|im|log_dt|log_neg_re|persistent|feature_coeffs")

SHARDING_RULES: tuple[Rule, ...] = (
    # Low-rank maps first: their `down`/`up` must not match the head-major rules below.
    Rule(r"(a_lora|w_lora|g_lora)/(down|up)/kernel", fsdp=True,
         note="RWKV-7 LoRA maps of the dynamics: FSDP only"),
    Rule(rf"({HEAD_MAJOR_OUT})/kernel", tensor=-1, fsdp=True,
         note="[d_model, heads*width]: heads over tensor, d_model over fsdp"),
    Rule(rf"({HEAD_MAJOR_IN})/kernel", tensor=-2, fsdp=True,
         note="[heads*width, d_model]: heads over tensor, d_model over fsdp"),
    Rule(r"lm_head/kernel", tensor=-1, fsdp=True, note="[d_model, vocab]: vocabulary over tensor"),
    Rule(r"embed/embedding|pos_embed", fsdp=True, note="[vocab or max_len, d_model]: FSDP only"),
    Rule(r"(in_proj|x_proj|dt_proj|input_proj|head|router|gate_up|gate_down)/kernel", fsdp=True,
         note="packed or non-head projections (Mamba's in_proj packs z, x, B, C, dt): FSDP only"),
    Rule(r"(a|beta|decay|lr|momentum)/kernel", fsdp=True,
         note="[d_model, heads] per-head gate/rate maps: FSDP only"),
    Rule(r"cell/(gru/)?([ih][a-z]|memory_in)/kernel", fsdp=True,
         note="LSTM/GRU/HiPPO-RNN cell matrices: FSDP only"),
    Rule(r"memory/w\d*", fsdp=True, note="neural-memory initial weights [heads, in, out]"),
    Rule(r"B|C", fsdp=True, note="S4D/S5 input and output matrices"),
    Rule(r"(short_conv|conv|conv_q|conv_k|conv_v)/(weight|bias)",
         note="short depthwise convolutions [taps, channels]: small, replicated"),
    Rule(r"\w*norm/(scale|bias)", note="norm scales and biases: replicated"),
    Rule(r"\w+/bias", note="Dense biases: replicated"),
    Rule(rf"{DYNAMICS}", note="the memories' dynamics parameters: small, replicated"),
)

# An explicit catch-all to append to a table (`SHARDING_RULES + (CATCH_ALL,)`) for exploratory
# layers: anything unmatched is FSDP-split where it can be. Not part of the default table.
CATCH_ALL = Rule(r".*", fsdp=True, note="everything else: FSDP where divisible, else replicated")


def key_name(key) -> str:
    """The name of one pytree key (dict key, attribute, index) as it appears in a path."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path) -> str:
    """`"block_0/mixer/q/kernel"` from a `jax.tree_util` key path."""
    return "/".join(key_name(k) for k in path)


def flat_params(params) -> dict[str, Any]:
    """`{path: leaf}` of a params tree, in tree order."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def rule_for(path: str, rules=SHARDING_RULES) -> Rule | None:
    return next((rule for rule in rules if rule.matches(path)), None)


def check_rules(params, rules=SHARDING_RULES) -> dict[str, Rule]:
    """`{path: rule}` for every parameter; ValueError naming every path that no rule matches."""
    matched, missing = {}, []
    for path in flat_params(params):
        rule = rule_for(path, rules)
        if rule is None:
            missing.append(path)
        matched[path] = rule
    if missing:
        raise ValueError(
            f"{len(missing)} parameter(s) match no sharding rule: {', '.join(missing)}. Add a "
            "rule for each to SHARDING_RULES in memjax/train/sharding.py (see its docstring: "
            "which dimension holds the heads, and whether it is a large weight for FSDP).")
    return matched


def spec_for(rule: Rule, shape: tuple[int, ...], axis_sizes: dict[str, int]) -> P:
    """The PartitionSpec `rule` gives a parameter of `shape` on a mesh with `axis_sizes`.

    An axis of size 1 (or absent) is left out; a dimension not divisible by an axis's size is
    not split over it (that axis then replicates the parameter).
    """
    dims: list[str | None] = [None] * len(shape)
    tensor = axis_sizes.get(TENSOR_AXIS, 1)
    if rule.tensor is not None and tensor > 1 and shape:
        dim = rule.tensor % len(shape) if -len(shape) <= rule.tensor < len(shape) else None
        if dim is not None and shape[dim] % tensor == 0:
            dims[dim] = TENSOR_AXIS
    fsdp = axis_sizes.get(FSDP_AXIS, 1)
    if rule.fsdp and fsdp > 1:
        free = [d for d in range(len(shape)) if dims[d] is None and shape[d] % fsdp == 0]
        if free:
            dims[max(free, key=lambda d: (shape[d], -d))] = FSDP_AXIS  # largest; first on ties
    while dims and dims[-1] is None:
        dims.pop()
    return P(*dims)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape) if mesh is not None else {}


def param_specs(params, mesh: Mesh, rules=SHARDING_RULES):
    """A tree like `params` (arrays or ShapeDtypeStructs) of PartitionSpecs (module doc).

    Under `model.scan_layers` the blocks' parameters sit in `blocks/` stacked on a leading layer
    axis: the rule applies to each layer's shape, and the layer axis is never split.
    """
    matched = check_rules(params, rules)
    sizes = _axis_sizes(mesh)

    def spec(path, x):
        rule, shape = matched[path_str(path)], tuple(x.shape)
        if key_name(path[0]) == SCANNED:
            return P(None, *spec_for(rule, shape[1:], sizes))
        return spec_for(rule, shape, sizes)

    return jax.tree_util.tree_map_with_path(spec, params)


def opt_state_specs(opt_state, params, specs):
    """PartitionSpecs for an optax state: a leaf whose key path ends with a parameter's path and
    has that parameter's shape gets the parameter's spec (Adam's `mu`/`nu`, Muon's momentum, the
    masked states of `optax.masked`/`multi_transform`); every other leaf (step counts, scalars,
    factored statistics) is replicated."""
    shapes = {path: tuple(x.shape) for path, x in flat_params(params).items()}
    by_path = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))[0]}

    def leaf_spec(path, x):
        names = [key_name(k) for k in path]
        shape = tuple(getattr(x, "shape", ()))
        for start in range(len(names)):
            candidate = "/".join(names[start:])
            if candidate in by_path and shapes[candidate] == shape:
                return by_path[candidate]
        return P()

    return jax.tree_util.tree_map_with_path(leaf_spec, opt_state)


def state_specs(state, rules=SHARDING_RULES, mesh: Mesh | None = None):
    """PartitionSpecs for a `TrainState` (arrays or `jax.eval_shape` output): params by the
    rules, the optimizer state mirroring them, `step` and `rng` replicated."""
    specs = param_specs(state.params, mesh, rules)
    return state.replace(step=P(), params=specs,
                         opt_state=opt_state_specs(state.opt_state, state.params, specs), rng=P())


def state_shardings(state, mesh: Mesh, rules=SHARDING_RULES):
    """NamedShardings on `mesh` for a `TrainState` (see `state_specs`)."""
    specs = state_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def init_sharded(init_fn, rng, mesh: Mesh, rules=SHARDING_RULES):
    """`(state, shardings)`: `init_fn(rng)` (a TrainState) computed straight into its shardings,
    so no device ever holds the whole state (the launch fails first if a parameter has no rule)."""
    shardings = state_shardings(jax.eval_shape(init_fn, rng), mesh, rules)
    return jax.jit(init_fn, out_shardings=shardings)(rng), shardings


def jit_train_step(step_fn, shardings, mesh: Mesh, *, num_extra: int = 0, donate: bool = True):
    """`jax.jit(step_fn)` for `step_fn(state, *extra, batch) -> (state, out)`: the state kept in
    `shardings` (from `state_shardings`), the batch split over the batch axes, the `num_extra`
    arguments between them (the metric buffer of `memjax.train.step_metrics`) and `out`
    replicated. With `donate`, the state and the extra arguments are donated."""
    rep = replicated(mesh)
    return jax.jit(step_fn, in_shardings=(shardings, *[rep] * num_extra, batch_sharded(mesh)),
                   out_shardings=(shardings, rep),
                   donate_argnums=tuple(range(1 + num_extra)) if donate else ())


def describe(params, mesh: Mesh | None = None, rules=SHARDING_RULES) -> list[str]:
    """One line per parameter: path, shape, spec and the rule's note (for logs and debugging)."""
    matched = check_rules(params, rules)
    sizes = _axis_sizes(mesh)
    return [f"{path} {tuple(x.shape)} -> {spec_for(matched[path], tuple(x.shape), sizes)}  "
            f"# {matched[path].note}" for path, x in flat_params(params).items()]


def bytes_per_device(tree) -> dict:
    """`{device: bytes}` of the shards of `tree`'s arrays that each device holds."""
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
