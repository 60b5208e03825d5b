"""Parameter initialisation for the whole model zoo: one scheme, chosen in config, for every layer.

Every mixer, block and head takes its initialisers from here, by the role of the parameter:

  role          `reference` scheme (default)                   `flax` scheme (ablation)
  embedding     normal(0.02)                                   normal(0.02)
  projection    normal(0.02)                                   lecun_normal (Flax's Dense default)
  output        normal(0.02 / sqrt(2 num_layers))              lecun_normal
  ssm_input     uniform(+-1/sqrt(fan_in)) (PyTorch's Linear    lecun_normal
                default, which Mamba's reference keeps)
  conv          uniform(+-1/sqrt(kernel_size)) (PyTorch's      normal(kernel_size ** -0.5)
                Conv1d default for a depthwise convolution)
  bias, norm    zeros; norm scales ones                        the same

`reference` is the convention of the peer codebases (Zoology's and flash-linear-attention's
`_init_weights`: normal(0.02) linear layers and embeddings, output projections of each residual
branch shrunk to 0.02 / sqrt(2 num_layers)). `flax` is what memjax used before issue 12 (Flax's
Dense default, std about 1/sqrt(fan_in)): with it, the recurrent mixers' q/k/v activations start
at std ~1 and MQAR plateaus near 0.2 (docs/results/zoology_mqar/README.md). Parameters that set a
memory's dynamics (decay rates, time steps, SSM matrices, gate and LoRA maps) and the LSTM/GRU
cells keep the initialisation of their reference implementations in both schemes.

The scheme is a dynamic scope (`init_scheme`), entered by the model around its layers, so a layer
does not need it threaded through its fields; a layer initialised outside any scope gets
`reference` with one layer. `parameter_class(path)` names the role of every parameter of a model;
the optimizer's weight-decay mask and the initialisation test use it.
"""

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

SCHEMES = ("reference", "flax")
REFERENCE_STD = 0.02

# Parameter classes (see `parameter_class`). Those after "norm" are initialised by their module.
PARAMETER_CLASSES = ("embedding", "projection", "output", "ssm_input", "head", "conv", "bias",
                     "norm", "dynamics", "recurrent")
# Dense layers whose output is added to the residual stream (a mixer's or MLP's last projection).
OUTPUT_MODULES = ("out", "out_proj", "down")
# Mamba's and Mamba-2's input projections (they produce the selective scan's B and C).
SSM_INPUT_MODULES = ("in_proj", "x_proj")
# Dense layers between the task and the residual stream: float inputs in, logits or targets out.
# Initialised as projections; a class of their own so the optimizer can keep Muon off them.
HEAD_MODULES = ("input_proj", "head", "lm_head")
CONV_MODULES = ("short_conv", "conv", "conv_q", "conv_k", "conv_v")
# Dense layers that compute a memory's time step or decay: their reference inits are special.
DYNAMICS_MODULES = ("dt_proj", "a_lora", "w_lora", "g_lora")

_ACTIVE = contextvars.ContextVar("memjax_init_scheme", default=("reference", 1))


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown model.init {scheme!r}; known: {', '.join(SCHEMES)}")
    return scheme


@contextlib.contextmanager
def init_scheme(scheme: str, num_layers: int):
    """Within this scope, the role initialisers below follow `scheme` for a `num_layers` model."""
    token = _ACTIVE.set((check_scheme(scheme), num_layers))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _lazy(pick):
    """An initialiser that asks the active scheme which initialiser to use when it is called."""

    def init(key, shape, dtype=jnp.float32):
        scheme, num_layers = _ACTIVE.get()
        return pick(scheme, num_layers, shape)(key, shape, dtype)

    return init


def embedding():
    """Token and position embeddings: normal(0.02) in every scheme."""
    return nn.initializers.normal(REFERENCE_STD)


def projection():
    """Dense kernels that read the residual stream (q, k, v, gates, input projections, heads)."""
    return _lazy(lambda scheme, _, __: (
        nn.initializers.normal(REFERENCE_STD) if scheme == "reference"
        else nn.initializers.lecun_normal()))


def output():
    """The last Dense of a residual branch: std 0.02 / sqrt(2 num_layers) under `reference`."""
    return _lazy(lambda scheme, num_layers, _: (
        nn.initializers.normal(REFERENCE_STD / math.sqrt(2 * num_layers)) if scheme == "reference"
        else nn.initializers.lecun_normal()))


def ssm_input():
    """Mamba's in_proj / x_proj kernels: PyTorch's Linear default under `reference`.

    mamba_ssm re-initialises only biases and output projections, keeping uniform(+-1/sqrt(fan_in))
    here. Its B and C are not normalised (unlike the delta rule's L2-normalised keys), so their
    scale sets the initial read-out `C_t . B_s`: at normal(0.02) it starts about 10x smaller and
    Mamba and Mamba-2 stayed near 0.1 accuracy for 800 steps on MQAR (docs/results/ssm_recall).
    """
    return _lazy(lambda scheme, _, shape: (
        symmetric_uniform(shape[0] ** -0.5) if scheme == "reference"
        else nn.initializers.lecun_normal()))


def dense(features: int, name: str, *, bias: bool = False) -> nn.Dense:
    """A Dense layer that reads the residual stream (role `projection`), bias-free by default."""
    return nn.Dense(features, use_bias=bias, kernel_init=projection(), name=name)


def dense_out(features: int, name: str, *, bias: bool = False) -> nn.Dense:
    """The last Dense of a residual branch (role `output`), bias-free by default."""
    return nn.Dense(features, use_bias=bias, kernel_init=output(), name=name)


def conv():
    """Depthwise causal convolution taps `[kernel_size, channels]`."""

    def pick(scheme, _, shape):
        bound = shape[0] ** -0.5
        return symmetric_uniform(bound) if scheme == "reference" else nn.initializers.normal(bound)

    return _lazy(pick)


def symmetric_uniform(bound: float):
    """Uniform in `[-bound, bound]` (Mamba's dt projection uses `bound = dt_rank ** -0.5`)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def parameter_class(path: tuple[str, ...]) -> str:
    """The role of the parameter at `path` (module names then the parameter's name).

    One of PARAMETER_CLASSES: `embedding`, `projection`, `output`, `ssm_input` and `head` (Dense
    kernels; `head`: the model's input projection and output heads), `conv`
    (short convolution taps and biases), `bias` (Dense biases), `norm` (norm scales and biases),
    `dynamics` (decay, time-step, SSM and gate parameters, whose init the module owns) and
    `recurrent` (LSTM/GRU/HiPPO-RNN cells, Flax's cell init).
    """
    leaf, modules = path[-1], path[:-1]
    parent = modules[-1] if modules else ""
    if leaf in ("embedding", "pos_embed"):
        return "embedding"
    if "cell" in modules:
        return "recurrent"
    if any(m.endswith("norm") for m in modules):
        return "norm"
    if any(m in DYNAMICS_MODULES for m in modules):
        return "dynamics"
    if parent in CONV_MODULES:
        return "conv"
    if leaf == "kernel":
        if parent in SSM_INPUT_MODULES:
            return "ssm_input"
        if parent in HEAD_MODULES:
            return "head"
        return "output" if parent in OUTPUT_MODULES else "projection"
    if leaf == "bias" and parent:
        return "bias"
    return "dynamics"  # a parameter a mixer declares itself: A_log, dt_bias, D, w0, ...


def classify(params) -> dict:
    """`params` with every leaf replaced by its `parameter_class` (same tree structure)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: parameter_class(tuple(str(getattr(k, "key", k)) for k in path)), params)


def dt_bias_init(dt_min: float, dt_max: float):
    """Bias whose softplus is a time step log-uniform in [dt_min, dt_max] (Mamba's dt init).

    Inverse softplus: ``b = dt + log(-expm1(-dt))``, so ``softplus(b) = dt``. dt is floored at
    1e-4 as in Mamba, which only matters for dt_min below that.
    """

    def init(key, shape, dtype=jnp.float32):
        log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
        return dt + jnp.log(-jnp.expm1(-dt))

    return init
