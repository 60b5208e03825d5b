"""The (data, fsdp, tensor) mesh, the sharding-rules table, sharded train steps, gradient
accumulation and bfloat16 compute, on a tiny LM (d_model 16, 2 layers, vocab 32, T 16, batch 8)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memjax.config import LAYER_PATTERNS, MIXER_PRESETS, lm_config, to_dict, train_config
from memjax.config_validation import ConfigError, validate_config
from memjax.layers import MIXERS
from memjax.models import build_model
from memjax.tasks.data import IGNORE_INDEX
from memjax.train import sharding
from memjax.train.checkpoint import Checkpointer, abstract_like
from memjax.train.mesh import batch_sharded, build_mesh, mesh_shape
from memjax.train.optim import build_optimizer
from memjax.train.step import TrainState, make_train_step, supervised_batch

VOCAB, D, T, B = 32, 16, 16, 8


def model_config(mixer: str, **overrides) -> dict:
    return to_dict(lm_config(VOCAB, D, mixer, 2)) | overrides


def model_of(mixer: str, **overrides):
    return build_model(model_config(mixer, **overrides))


def optimizer():
    cfg = train_config(steps=10, lr=1e-2)
    cfg.warmup_steps = 1
    return build_optimizer(cfg)


def init_fn(model, opt):
    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        params = model.init(init_rng, jnp.zeros((1, T), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=opt.init(params), rng=state_rng)
    return init


def batch(seed=0):
    """Rows with different numbers of supervised positions (so micro-batch weights differ)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, VOCAB, (B, T))
    labels = np.where(rng.random((B, T)) < np.linspace(0.1, 0.9, B)[:, None],
                      rng.integers(0, VOCAB, (B, T)), IGNORE_INDEX)
    return supervised_batch({"inputs": inputs, "labels": labels})


def single_device_step(model, opt, data, **step_options):
    state = jax.jit(init_fn(model, opt))(jax.random.key(0))
    return jax.jit(make_train_step(model, opt, **step_options))(state, data)


@functools.cache
def reference_step(mixer: str):
    """The single-device step of `mixer` on `batch()` (computed once per test session)."""
    return single_device_step(model_of(mixer), optimizer(), batch())


def sharded_step(model, opt, data, mesh, **step_options):
    state, shardings = sharding.init_sharded(init_fn(model, opt), jax.random.key(0), mesh)
    step = sharding.jit_train_step(make_train_step(model, opt, **step_options), shardings, mesh,
                                   donate=False)
    new_state, metrics = step(state, jax.device_put(data, batch_sharded(mesh)))
    return state, new_state, metrics


def assert_states_close(a, b, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                                                         rtol=1e-5), a.params, b.params)


# --- the mesh -------------------------------------------------------------------------------

def test_mesh_shape_defaults_fill_and_backwards_compatibility():
    assert mesh_shape({"data": 1}, 8) == {"data": 1, "fsdp": 1, "tensor": 1}  # an old config
    assert mesh_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2,
                                                                   "tensor": 2}
    assert mesh_shape(3, 8) == {"data": 3, "fsdp": 1, "tensor": 1}  # an int: the data axis
    mesh = build_mesh({"data": 2, "fsdp": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("sizes, match", [
    ({"data": -1, "fsdp": -1}, r"at most one mesh axis may be -1, got 2 \(mesh.data, mesh.fsdp\)"),
    ({"data": 3, "fsdp": 3}, r"the mesh needs 9 devices .* but 8 device\(s\) are available"),
    ({"data": 3, "tensor": -1},
     r"product 3 does not divide the 8 device\(s\), so mesh.tensor = -1"),
    ({"data": 0}, r"mesh.data = 0: each mesh axis is an int >= 1, or -1"),
    ({"data": 1, "model": 2}, r"unknown mesh axes \['model'\]"),
])
def test_mesh_config_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        mesh_shape(sizes, 8)


def test_config_validation_accepts_mesh_axes_and_refuses_two_fills():
    from memjax.config import load_config
    config = load_config("configs/mqar.py:smoke", {"mesh.fsdp": 2, "mesh.tensor": -1,
                                                   "train.grad_accum_steps": 2,
                                                   "train.compute_dtype": "bfloat16"})
    validate_config(config, 2**34)
    with pytest.raises(ConfigError, match=r"config.mesh: at most one axis may be -1"):
        validate_config(load_config("configs/mqar.py:smoke",
                                    {"mesh.data": -1, "mesh.fsdp": -1}), 2**34)
    with pytest.raises(ConfigError, match=r"config.train.compute_dtype = 'float16'"):
        validate_config(load_config("configs/mqar.py:smoke",
                                    {"train.compute_dtype": "float16"}), 2**34)


# --- the rules table ------------------------------------------------------------------------

def param_shapes(model, inputs=None):
    inputs = jnp.zeros((1, T), jnp.int32) if inputs is None else inputs
    return jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))["params"]


MODELS = sorted(MIXERS.names()) + sorted(MIXER_PRESETS) + sorted(LAYER_PATTERNS)


def test_every_parameter_of_every_mixer_has_a_rule():
    unmatched = {}
    for name in MODELS:
        layers = 5 if name in LAYER_PATTERNS else 2
        model = build_model(to_dict(lm_config(VOCAB, D, name, layers)))
        paths = sharding.flat_params(param_shapes(model))
        missing = [p for p in paths if sharding.rule_for(p) is None]
        if missing:
            unmatched[name] = missing
    # The LM's other parts: a gated MLP, learned positions, an untied head, float inputs/outputs.
    extras = [model_of("attention", mlp_ratio=2.0, pos_emb="learned", max_len=T,
                       tie_embeddings=False)]
    float_io = model_of("attention", input_dim=3, output_dim=2, vocab_size=0)
    for model, inputs in [(extras[0], None), (float_io, jnp.zeros((1, T, 3)))]:
        missing = [p for p in sharding.flat_params(param_shapes(model, inputs))
                   if sharding.rule_for(p) is None]
        if missing:
            unmatched[repr(type(model))] = missing
    assert not unmatched, unmatched


class NewLayer(nn.Module):
    """A layer a researcher just wrote: one known Dense name, two names the table lacks."""

    @nn.compact
    def __call__(self, x):
        decay = self.param("mystery_decay", nn.initializers.ones, (x.shape[-1],))
        return nn.Dense(8, name="my_proj")(x * decay) + nn.Dense(8, name="q")(x)


def test_a_parameter_without_a_rule_is_named_in_the_error():
    params = param_shapes(NewLayer(), jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"2 parameter\(s\) match no sharding rule: "
                                         r"my_proj/kernel, mystery_decay\. Add a rule"):
        sharding.param_specs(params, build_mesh({"fsdp": 8}))
    # With the explicit catch-all appended, they are FSDP-split where divisible.
    specs = sharding.param_specs(params, build_mesh({"fsdp": 8}),
                                 sharding.SHARDING_RULES + (sharding.CATCH_ALL,))
    assert specs["my_proj"]["kernel"] == P(None, "fsdp") and specs["mystery_decay"] == P()


def test_rules_split_heads_over_tensor_and_the_largest_divisible_dim_over_fsdp():
    mesh = build_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    specs = sharding.param_specs(param_shapes(model_of("gated_deltanet")), mesh)["block_0"]["mixer"]
    assert specs["q"]["kernel"] == P("fsdp", "tensor")  # [16, 16]: heads out over tensor
    assert specs["out"]["kernel"] == P("tensor", "fsdp")  # [16, 16]: heads in over tensor
    assert specs["a"]["kernel"] == P("fsdp")  # [16, 2]: per-head map, FSDP only
    assert specs["A_log"] == P() and specs["conv_q"]["weight"] == P()
    # Not divisible: replicated over that axis (48 = 3 x 16 is, 2 heads on tensor 4 is not).
    rule = sharding.rule_for("block_0/mixer/beta/kernel")
    assert sharding.spec_for(rule, (16, 2), {"fsdp": 3, "tensor": 4}) == P()
    embedding = sharding.rule_for("embed/embedding")
    assert sharding.spec_for(embedding, (32, 16), {"fsdp": 8}) == P("fsdp")


def test_scanned_layers_get_each_layers_spec_and_keep_the_layer_axis_whole():
    mesh = build_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    loop = sharding.param_specs(param_shapes(model_of("gated_deltanet")), mesh)
    scanned = sharding.param_specs(
        param_shapes(model_of("gated_deltanet", scan_layers=True)), mesh)
    per_layer = loop["block_0"]["mixer"]
    stacked = scanned["blocks"]["block_0"]["mixer"]
    assert stacked["q"]["kernel"] == P(None, *per_layer["q"]["kernel"])
    assert stacked["out"]["kernel"] == P(None, "tensor", "fsdp")
    assert scanned["embed"] == loop["embed"]


def test_optimizer_state_mirrors_its_parameter():
    model, opt = model_of("gated_deltanet"), optimizer()
    mesh = build_mesh({"data": 2, "fsdp": 4})
    shapes = jax.eval_shape(init_fn(model, opt), jax.random.key(0))
    specs = sharding.state_specs(shapes, mesh=mesh)
    q_spec = specs.params["block_0"]["mixer"]["q"]["kernel"]
    assert q_spec == P("fsdp")
    adam = specs.opt_state[1][0]  # chain(clip, adam, decay): scale_by_adam's state
    assert adam.mu["block_0"]["mixer"]["q"]["kernel"] == q_spec
    assert adam.nu["block_0"]["mixer"]["q"]["kernel"] == q_spec
    assert adam.count == P() and specs.step == P() and specs.rng == P()


# --- sharded steps equal the single-device step --------------------------------------------

# gated_deltanet's step takes ~4x attention's to compile on CPU: its cases are slow tests.
@pytest.mark.parametrize("mixer", ["attention",
                                   pytest.param("gated_deltanet", marks=pytest.mark.slow)])
@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 4}, {"data": 2, "tensor": 4}])
def test_sharded_step_equals_single_device_step(mixer, axes):
    model, opt, data = model_of(mixer), optimizer(), batch()
    expected, expected_metrics = reference_step(mixer)
    mesh = build_mesh(axes)
    before, after, metrics = sharded_step(model, opt, data, mesh)
    split_axis = "fsdp" if "fsdp" in axes else "tensor"
    split = [leaf.sharding.spec for leaf in jax.tree.leaves(after.params)
             if split_axis in jax.tree.leaves(tuple(leaf.sharding.spec))]
    assert split, f"no parameter is split over {split_axis}"
    # Parameters and optimizer state stay in their shardings across the step.
    jax.tree.map(lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim) or pytest.fail(),
                 before.params, after.params)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected_metrics["loss"]), rtol=1e-5)
    assert_states_close(after, expected)


# --- gradient accumulation and bfloat16 compute -------------------------------------------

@pytest.mark.parametrize("mixer", ["attention",
                                   pytest.param("gated_deltanet", marks=pytest.mark.slow)])
def test_grad_accumulation_equals_one_step_on_the_whole_batch(mixer):
    model, opt, data = model_of(mixer), optimizer(), batch()
    one, one_metrics = reference_step(mixer)
    two, two_metrics = single_device_step(model, opt, data, grad_accum_steps=2)
    for name in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(float(two_metrics[name]), float(one_metrics[name]), rtol=1e-5)
    assert_states_close(two, one)


def test_grad_accumulation_needs_a_divisible_batch():
    model, opt = model_of("attention"), optimizer()
    state = jax.eval_shape(init_fn(model, opt), jax.random.key(0))
    step = make_train_step(model, opt, grad_accum_steps=3)
    with pytest.raises(ValueError, match=r"8 rows does not split into train.grad_accum_steps = 3"):
        jax.eval_shape(step, state, batch())


@pytest.mark.parametrize("mixer", ["attention",
                                   pytest.param("gated_deltanet", marks=pytest.mark.slow)])
def test_bfloat16_compute_keeps_float32_state_and_a_close_loss(mixer):
    model, opt, data = model_of(mixer), optimizer(), batch()
    f32, f32_metrics = reference_step(mixer)
    bf16, bf16_metrics = single_device_step(model, opt, data, compute_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves((bf16.params, bf16.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(bf16_metrics["loss"]))
    np.testing.assert_allclose(float(bf16_metrics["loss"]), float(f32_metrics["loss"]), rtol=2e-2)
    with pytest.raises(ValueError, match="train.compute_dtype = 'float16'"):
        make_train_step(model, opt, compute_dtype="float16")


# --- checkpoints and memory -----------------------------------------------------------------

@pytest.mark.parametrize("target", [{"data": 2, "tensor": 4}, {"data": 2, "fsdp": 4}, {"data": 1}],
                         ids=["data2_tensor4", "data2_fsdp4", "one_device"])
def test_checkpoint_restores_into_the_state_shardings(tmp_path, target):
    """Saved with the state split 8 ways (FSDP over every device), restored onto another layout:
    tensor parallel, a 2 x 4 mesh, and a single device."""
    config = model_config("attention")
    model, opt = build_model(config), optimizer()
    saved, _ = sharding.init_sharded(init_fn(model, opt), jax.random.key(0), build_mesh({"fsdp": 8}))
    checkpoints = Checkpointer(tmp_path, keep=1)
    try:
        checkpoints.save(1, saved, {"model": config})
        mesh = build_mesh(target)
        shardings = sharding.state_shardings(jax.eval_shape(init_fn(model, opt),
                                                            jax.random.key(0)), mesh)
        restored, _ = checkpoints.restore(1, abstract_like(saved, shardings), config)
    finally:
        checkpoints.close()
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(
        f"{x.sharding} != {s}"), (restored.params, restored.opt_state),
        (shardings.params, shardings.opt_state))
    assert {d for x in jax.tree.leaves(restored.params) for d in x.devices()} == set(
        mesh.devices.flat)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (restored.params, restored.opt_state), (saved.params, saved.opt_state))


def test_fsdp_divides_parameter_and_optimizer_memory_per_device():
    model, opt = model_of("attention"), optimizer()
    per_device = {}
    for fsdp in (1, 2, 4, 8):
        state, _ = sharding.init_sharded(init_fn(model, opt), jax.random.key(0),
                                         build_mesh({"fsdp": fsdp}))
        per_device[fsdp] = max(sharding.bytes_per_device((state.params, state.opt_state)).values())
    assert per_device[1] > per_device[2] > per_device[4] > per_device[8]
    assert per_device[8] < 0.35 * per_device[1]  # the small replicated vectors stay whole


# --- the trainer ----------------------------------------------------------------------------

@pytest.mark.slow
def test_trainer_on_a_3d_mesh_with_micro_batches_matches_one_device_and_resumes(tmp_path):
    from memjax.config import load_config
    from memjax.train.metrics import read_metrics
    from memjax.train.trainer import train

    smoke = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 6,
             "train.checkpoint_every": 3, "train.keep_checkpoints": 2}
    sharded = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.grad_accum_steps": 2}
    seen = {}

    def record(step, state):
        seen[step] = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}

    def crash_at_4(step, state):
        if step == 4:
            raise RuntimeError("simulated crash")

    one = train(load_config("configs/mqar.py:smoke", smoke), tmp_path / "one")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config("configs/mqar.py:smoke", smoke | sharded), tmp_path / "mesh",
              hooks=[record, crash_at_4])
    assert any("fsdp" in spec for spec in seen[1]) and any("tensor" in spec for spec in seen[1])
    resumed = train(load_config("configs/mqar.py:smoke", smoke | sharded), tmp_path / "mesh")
    losses = {name: [r["train/loss"] for r in read_metrics(tmp_path / name) if "train/loss" in r]
              for name in ("one", "mesh")}
    assert len(losses["one"]) == 6 and len(losses["mesh"]) >= 6
    np.testing.assert_allclose(losses["mesh"][-6:], losses["one"], rtol=1e-4)
    assert abs(one["test/accuracy"] - resumed["test/accuracy"]) < 1e-6
