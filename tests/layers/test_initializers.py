"""The initialisation scheme (`config.model.init`) and the weight-decay mask, for every mixer.

The initial standard deviation of every parameter of every class is checked against the scheme,
so a layer that forgets to take its initialiser from `memjax.layers.initializers` fails here.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.config import lm_config, to_dict, train_config
from memjax.layers import MIXERS, initializers
from memjax.models import build_model
from memjax.train.optim import build_optimizer

D_MODEL, VOCAB, NUM_LAYERS = 32, 64, 3


@functools.cache  # each (mixer, scheme) is initialised once for all tests
def _init(mixer: str, scheme: str):
    cfg = to_dict(lm_config(VOCAB, D_MODEL, mixer, num_layers=NUM_LAYERS)) | {"init": scheme}
    params = build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {tuple(str(k.key) for k in path): np.asarray(x, np.float64) for path, x in leaves}


def _expected_std(cls: str, scheme: str, name: tuple, x: np.ndarray) -> float | None:
    """The std the scheme prescribes for a parameter of class `cls`, or None (module-owned)."""
    if cls == "embedding":
        return 0.02
    if cls in ("projection", "output"):
        if scheme == "flax":
            return x.shape[0] ** -0.5  # lecun_normal: 1 / sqrt(fan_in)
        return 0.02 if cls == "projection" else 0.02 / math.sqrt(2 * NUM_LAYERS)
    if cls == "ssm_input":  # PyTorch's Linear default: uniform(+-1/sqrt(fan_in))
        return (3 * x.shape[0]) ** -0.5 if scheme == "reference" else x.shape[0] ** -0.5
    if cls == "conv":
        if name[-1] == "bias":
            return 0.0
        kernel_size = x.shape[0]
        return (3 * kernel_size) ** -0.5 if scheme == "reference" else kernel_size ** -0.5
    if cls == "bias":
        return 0.0
    return None


@pytest.mark.parametrize("scheme", initializers.SCHEMES)
@pytest.mark.parametrize("mixer", sorted(MIXERS.names()))
def test_initial_std_of_every_parameter_class(mixer, scheme):
    params = _init(mixer, scheme)
    seen = set()
    for name, x in params.items():
        cls = initializers.parameter_class(name)
        assert cls in initializers.PARAMETER_CLASSES
        seen.add(cls)
        if cls == "norm":
            assert np.all(x == (1.0 if name[-1] == "scale" else 0.0)), name
            continue
        expected = _expected_std(cls, scheme, name, x)
        if expected is None:
            continue
        if expected == 0.0:
            assert np.all(x == 0.0), name
            continue
        # The sample std of n normal draws is within a few / sqrt(2n) of the true one.
        tolerance = 4.0 / math.sqrt(2 * x.size) + 0.02
        assert abs(x.std() / expected - 1.0) < tolerance, (name, cls, x.std(), expected)
    assert {"embedding", "output", "conv", "norm"} <= seen


@pytest.mark.parametrize("mixer", sorted(MIXERS.names()))
def test_module_owned_parameters_do_not_depend_on_the_scheme(mixer):
    """Dynamics (decays, time steps, SSM matrices) and RNN cells keep their reference init."""
    reference, flax_default = _init(mixer, "reference"), _init(mixer, "flax")
    for name, x in reference.items():
        if initializers.parameter_class(name) in ("dynamics", "recurrent", "norm", "embedding"):
            np.testing.assert_array_equal(x, flax_default[name], err_msg=str(name))


def test_output_projections_shrink_with_depth():
    assert initializers.parameter_class(("block_0", "mixer", "out", "kernel")) == "output"
    assert initializers.parameter_class(("block_0", "mlp", "down", "kernel")) == "output"
    assert initializers.parameter_class(("block_0", "mixer", "w_lora", "down", "kernel")) == "dynamics"
    with initializers.init_scheme("reference", 8):
        x = initializers.output()(jax.random.key(0), (256, 256))
    assert abs(float(x.std()) / (0.02 / 4.0) - 1.0) < 0.05


def test_unknown_scheme_is_rejected():
    cfg = to_dict(lm_config(VOCAB, 16, "linear_attention")) | {"init": "xavier"}
    with pytest.raises(ValueError, match="unknown model.init 'xavier'"):
        build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def test_weight_decay_skips_exempt_classes():
    """With zero gradients only weight decay moves parameters: exactly the non-exempt ones."""
    cfg = to_dict(lm_config(VOCAB, 16, "gated_deltanet"))
    params = build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    train = train_config(steps=10, lr=1e-2)
    train.warmup_steps = 0
    optimizer = build_optimizer(train)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    classes = initializers.classify(params)
    exempt = {"bias", "norm", "dynamics"}
    nonzero = jax.tree.map(lambda p: bool(jnp.any(p != 0)), params)
    for did_move, cls, is_nonzero in zip(*map(jax.tree.leaves, (moved, classes, nonzero))):
        if is_nonzero:  # decay moves a parameter only if it is not zero
            assert did_move == (cls not in exempt), cls
    train.weight_decay_exempt = "bias,norms"
    with pytest.raises(ValueError, match="unknown parameter classes \\['norms'\\]"):
        build_optimizer(train)
