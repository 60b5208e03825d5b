"""kernels/linear_attention.py: the Pallas kernels (TPU variant and GPU/Triton variant, both in
interpret mode on CPU) against the float64 NumPy oracle and the float64 gradients of the
reference form; the op's impl="pallas"; poisoned outputs; tiling errors; lowering for TPU and
CUDA without hardware (jax.export); the sharded wrapper.

Measured errors are printed (run with -s to see them). Shapes are tiny: interpret mode is slow.
"""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import Mesh

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "ops"))
from numpy_reference import linear_attention_np, rel_rms  # noqa: E402

from kernels import common  # noqa: E402
from kernels.linear_attention import (  # noqa: E402
    linear_attention_gpu, linear_attention_sharded, linear_attention_tpu,
)
from memjax import ops  # noqa: E402

VARIANTS = {"tpu": linear_attention_tpu, "gpu": linear_attention_gpu}
ARGS = ("q", "k", "v", "g", "h0")
F32_TOL, BF16_TOL = 1e-5, 2e-2  # rel_rms against float64


def make_inputs(seed, B, T, H, K, V, *, decay=1.0, with_g=True, with_h0=True):
    """float32 NumPy inputs; g uniform in [-decay, 0] per head."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    g = -rng.uniform(0, decay, (B, T, H)).astype(np.float32) if with_g else None
    h0 = rng.standard_normal((B, H, K, V)).astype(np.float32) if with_h0 else None
    return q, k, v, g, h0


def cotangents(seed, o_shape, s_shape):
    rng = np.random.default_rng(seed + 1000)
    return rng.standard_normal(o_shape), rng.standard_normal(s_shape)


def value_and_grads(fn, inputs, cts):
    """(o, final, {name: grad}) of fn(q, k, v, g, h0) for the loss <o, ct_o> + <final, ct_s>."""
    present = {n: x for n, x in zip(ARGS, inputs) if x is not None}

    def run(**kw):
        return fn(*(kw.get(n) for n in ARGS))

    (o, final), vjp = jax.vjp(lambda kw: run(**kw), present)
    (grads,) = vjp(tuple(jnp.asarray(c, x.dtype) for c, x in zip(cts, (o, final))))
    return np.asarray(o, np.float64), np.asarray(final, np.float64), {
        n: np.asarray(x, np.float64) for n, x in grads.items()}


@functools.lru_cache(maxsize=None)
def reference(config):
    """float64 (o, final, grads) of the op's reference form for a config tuple."""
    seed, shape, decay, with_g, with_h0 = config
    inputs = make_inputs(seed, *shape, decay=decay, with_g=with_g, with_h0=with_h0)
    B, T, H, K, V = shape
    with jax.enable_x64(True):
        inputs64 = [None if x is None else jnp.asarray(x, jnp.float64) for x in inputs]
        fn = lambda q, k, v, g, h0: ops.linear_attention(  # noqa: E731
            q, k, v, g, initial_state=h0, impl="reference")
        out = value_and_grads(fn, inputs64, cotangents(seed, (B, T, H, V), (B, H, K, V)))
    o_np, s_np = linear_attention_np(*inputs[:4], initial_state=inputs[4])
    assert rel_rms(out[0], o_np) < 1e-12 and rel_rms(out[1], s_np) < 1e-12  # oracle agrees
    return out


def kernel_errors(variant, config, *, chunk, dtype=jnp.float32, block_v=None):
    """rel_rms of the kernel's o, final state and every gradient against float64."""
    seed, shape, decay, with_g, with_h0 = config
    inputs = make_inputs(seed, *shape, decay=decay, with_g=with_g, with_h0=with_h0)
    inputs = [None if x is None else jnp.asarray(x, dtype if i < 3 else jnp.float32)
              for i, x in enumerate(inputs)]
    B, T, H, K, V = shape
    fn = lambda q, k, v, g, h0: VARIANTS[variant](  # noqa: E731
        q, k, v, g, initial_state=h0, chunk_size=chunk, block_v=block_v, interpret=True)
    o, final, grads = value_and_grads(fn, inputs, cotangents(seed, (B, T, H, V), (B, H, K, V)))
    o_ref, final_ref, grads_ref = reference(config)
    errors = {"o": rel_rms(o, o_ref), "state": rel_rms(final, final_ref)}
    errors.update({f"d{n}": rel_rms(grads[n], grads_ref[n]) for n in grads_ref})
    print(f"\n{variant} {jnp.dtype(dtype).name} shape={shape} C={chunk} decay={decay} "
          f"g={with_g} h0={with_h0}: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    assert set(grads) == set(grads_ref)
    return errors


def assert_errors_below(errors, tol):
    assert all(np.isfinite(e) and e < tol for e in errors.values()), errors


# ---------------------------------------------------------------------------------------------
# Against float64: forward and every gradient
# ---------------------------------------------------------------------------------------------

# (seed, (B, T, H, K, V), decay, with_g, with_h0); T = 20 is not a multiple of the chunk.
MAIN = (0, (2, 20, 2, 16, 16), 1.0, True, True)


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_forward_and_gradients_match_float64(variant):
    assert_errors_below(kernel_errors(variant, MAIN, chunk=16), F32_TOL)


CASES = {
    "no_g_no_h0": ((1, (1, 24, 2, 16, 16), 1.0, False, False), False),
    "strong_decay": ((2, (1, 20, 2, 16, 16), 10.0, True, True), False),  # g ~ -5 on average
    "multi_chunk": ((3, (2, 40, 1, 16, 16), 1.0, True, False), True),
    "k_ne_v": ((4, (1, 40, 2, 16, 32), 0.5, True, True), True),
}


@pytest.mark.parametrize("variant, case", [
    pytest.param(variant, case, marks=[pytest.mark.slow] if slow or variant == "gpu" else [])
    for case, (_, slow) in sorted(CASES.items()) for variant in ("tpu", "gpu")])
def test_configurations_match_float64(variant, case):
    config, _ = CASES[case]
    assert_errors_below(kernel_errors(variant, config, chunk=16), F32_TOL)


def test_tpu_chunk_8_and_small_heads():
    """The TPU variant accepts chunk 8 and K = V = 8 (Triton's tl.dot could not)."""
    config = (5, (1, 20, 2, 8, 8), 1.0, True, True)
    assert_errors_below(kernel_errors("tpu", config, chunk=8), F32_TOL)


@pytest.mark.parametrize("variant, V, block_v", [
    pytest.param("tpu", 256, 128, marks=pytest.mark.slow), ("gpu", 32, 16)])
def test_value_blocks_match_float64(variant, V, block_v):
    config = (6, (1, 16, 1, 16, V), 1.0, True, True)
    assert_errors_below(kernel_errors(variant, config, chunk=16, block_v=block_v), F32_TOL)


@pytest.mark.parametrize("variant", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])
def test_bfloat16_inputs(variant):
    errors = kernel_errors(variant, MAIN, chunk=16, dtype=jnp.bfloat16)
    assert_errors_below(errors, BF16_TOL)


# ---------------------------------------------------------------------------------------------
# Through the op
# ---------------------------------------------------------------------------------------------


def test_op_pallas_equals_chunk_form():
    q, k, v, g, h0 = make_inputs(7, 1, 13, 2, 16, 16)
    kw = dict(initial_state=h0, chunk_size=8)
    o, s = ops.linear_attention(q, k, v, g, impl="pallas", **kw)
    o_ref, s_ref = ops.linear_attention(q, k, v, g, impl="chunk", **kw)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32 and o.shape == (1, 13, 2, 16)


def test_op_pallas_short_sequence_shrinks_the_chunk():
    """T = 3 with the default chunk 64: the kernel pads to one chunk of 8, not 64."""
    q, k, v, g, _ = make_inputs(8, 1, 3, 1, 8, 8)
    o, s = ops.linear_attention(q, k, v, g, impl="pallas")
    o_ref, s_ref = linear_attention_np(q, k, v, g)
    assert rel_rms(o, o_ref) < F32_TOL and rel_rms(s, s_ref) < F32_TOL


# ---------------------------------------------------------------------------------------------
# Poisoned outputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, chunk", [
    ("tpu", 8), pytest.param("gpu", 16, marks=pytest.mark.slow)])
def test_poisoned_outputs_stay_finite_and_correct(variant, chunk):
    """Under poisoning every output tile of the forward and backward kernels is written."""
    config = (9, (1, 20, 2, 16, 16), 1.0, True, True)
    with common.poisoned_outputs():
        errors = kernel_errors(variant, config, chunk=chunk)
    assert_errors_below(errors, F32_TOL)


def _first_tile_only(x_ref, o_ref):
    """A broken kernel: copies its input tile at grid step 0 only."""
    @pl.when(pl.program_id(0) == 0)
    def _():
        o_ref[...] = x_ref[...]


def test_poisoning_catches_an_unwritten_tile():
    x = jnp.ones((16, 8), jnp.float32)
    spec = pl.BlockSpec((8, 8), lambda i: (i, 0))

    def run():
        (out,) = common.pallas_call(_first_tile_only, [jax.ShapeDtypeStruct(x.shape, x.dtype)],
                             grid=(2,), in_specs=[spec], out_specs=[spec], interpret=True,
                             args=(x,))
        return out

    with common.poisoned_outputs():
        poisoned = np.asarray(run())
    np.testing.assert_array_equal(poisoned[:8], 1.0)
    assert np.isnan(poisoned[8:]).all()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, shape, chunk, block_v, match", [
    ("tpu", (1, 16, 1, 12, 16), 16, None, r"\(tpu\): K = 12 must be a multiple of 8 \(the sublane"),
    ("tpu", (1, 16, 1, 16, 16), 12, None, r"chunk_size = 12 must be a multiple of 8"),
    ("tpu", (1, 16, 1, 16, 20), 16, None, r"V = 20 must be a multiple of 8"),
    ("tpu", (1, 16, 1, 16, 256), 16, 64, r"block_v = 64 must be a multiple of 128"),
    ("gpu", (1, 16, 1, 8, 16), 16, None, r"\(gpu\): K = 8 must be a power of two >= 16"),
    ("gpu", (1, 16, 1, 16, 16), 24, None, r"chunk_size = 24 must be a power of two >= 16"),
    ("gpu", (1, 16, 1, 16, 48), 16, None, r"block_v = 48 must be a power of two"),
    ("gpu", (1, 16, 1, 16, 32), 16, 24, r"V = 32 must be a multiple of 24"),
])
def test_untileable_shapes_raise_tiling_error(variant, shape, chunk, block_v, match):
    q, k, v, g, _ = make_inputs(0, *shape)
    with pytest.raises(common.TilingError, match=match):
        VARIANTS[variant](q, k, v, g, chunk_size=chunk, block_v=block_v, interpret=True)


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_unsupported_features_raise(variant):
    q, k, v, _, _ = make_inputs(0, 1, 16, 1, 16, 16)
    fn = functools.partial(VARIANTS[variant], chunk_size=16, interpret=True)
    with pytest.raises(ValueError, match=r"per-channel decay g \[B, T, H, K\] is not supported"):
        fn(q, k, v, jnp.zeros((1, 16, 1, 16)))
    with pytest.raises(ValueError, match="normalize=True is not supported"):
        fn(q, k, v, normalize=True)
    with pytest.raises(ValueError, match="scale must be a static number"):
        jax.jit(lambda s: fn(q, k, v, scale=s))(0.5)


def test_float64_inputs_raise(x64):
    q, k, v = (jnp.asarray(x, jnp.float64) for x in make_inputs(0, 1, 16, 1, 16, 16)[:3])
    with pytest.raises(ValueError, match="float64 inputs are not supported"):
        linear_attention_tpu(q, k, v, chunk_size=16)


# ---------------------------------------------------------------------------------------------
# Lowering without hardware
# ---------------------------------------------------------------------------------------------

def lower(platform, B, T, H, K, V, chunk, dtype, backward):
    """jax.export of the TPU (platform "tpu") or GPU ("cuda") variant; returns the MLIR text."""
    variant = "tpu" if platform == "tpu" else "gpu"
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), dtype), S((B, T, H, K), dtype), S((B, T, H, V), dtype),
            S((B, T, H), jnp.float32), S((B, H, K, V), jnp.float32))

    def fn(q, k, v, g, h0):
        return VARIANTS[variant](q, k, v, g, initial_state=h0, chunk_size=chunk)

    if backward:
        def fn(*a, forward=fn):  # noqa: F811  (forward + backward)
            out, vjp = jax.vjp(forward, *a)
            return out, vjp(out)

    return common.export_without_hardware(fn, args, platform).mlir_module()


CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": common.TRITON_CALL}
LOWERING_FAST = [("tpu", 64, 256, jnp.float32), ("tpu", 128, 1024, jnp.bfloat16),
                 ("cuda", 64, 256, jnp.float32), ("cuda", 128, 1024, jnp.bfloat16)]
LOWERING_ALL = [(p, kv, T, dt) for p in ("tpu", "cuda") for kv in (64, 128) for T in (256, 1024)
                for dt in (jnp.float32, jnp.bfloat16)]


@pytest.mark.parametrize("platform, KV, T, dtype", LOWERING_FAST)
@pytest.mark.parametrize("backward", [False, True])
def test_lowers_without_hardware(platform, KV, T, dtype, backward):
    text = lower(platform, 2, T, 2, KV, KV, 64, dtype, backward)
    assert text.count(CUSTOM_CALL[platform]) >= (2 if backward else 1)


@pytest.mark.slow
def test_lowering_table():
    """Every (platform, K = V, T, dtype, fwd / fwd+bwd); prints the table, all must lower."""
    rows = []
    for platform, KV, T, dtype in LOWERING_ALL + [("cuda", 64, 192, jnp.bfloat16),
                                                  ("tpu", 64, 200, jnp.float32)]:
        for backward in (False, True):
            try:
                lower(platform, 2, T, 4, KV, KV, 64, dtype, backward)
                status = "ok"
            except Exception as err:  # noqa: BLE001  (recorded in the table)
                status = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append((platform, KV, T, jnp.dtype(dtype).name,
                         "fwd+bwd" if backward else "fwd", status))
    print("\nplatform K=V T dtype pass status")
    for row in rows:
        print(*row)
    assert all(row[-1] == "ok" for row in rows), [r for r in rows if r[-1] != "ok"]


# ---------------------------------------------------------------------------------------------
# Sharded wrapper
# ---------------------------------------------------------------------------------------------


def test_sharded_equals_unsharded():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    q, k, v, g, h0 = make_inputs(10, 2, 12, 4, 8, 8)
    kw = dict(initial_state=h0, chunk_size=8)
    sharded = linear_attention_sharded(mesh, batch_axis="data", head_axis="model",
                                       interpret=True)
    o, s = jax.jit(lambda *a: sharded(*a, **kw))(q, k, v, g)
    o_ref, s_ref = linear_attention_tpu(q, k, v, g, interpret=True, **kw)
    np.testing.assert_allclose(o, o_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s, s_ref, rtol=1e-6, atol=1e-6)
    P = jax.sharding.PartitionSpec
    for x, spec in ((o, P("data", None, "model")), (s, P("data", "model"))):
        assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), x.ndim)
