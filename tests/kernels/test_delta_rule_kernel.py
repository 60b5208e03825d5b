"""Tests for kernels/delta_rule.py: the chunked (gated) delta rule in Pallas, forward and
backward, Mosaic (TPU) and Triton (GPU) variants.

Correctness runs both variants in Pallas interpret mode on CPU against the float64 NumPy oracle
(forward), the chunk form (forward) and autodiff of the reference form in float64 (every
gradient). The kernels compute in float32 (float64 only in the x64 test). Portability: the
kernels, forward and forward + backward, are lowered for TPU and CUDA with ``jax.export``
without hardware (this checks the Pallas -> Mosaic / Triton-IR lowering and the MLIR verifier;
the Mosaic and Triton backend compilers only run on the devices).

Measured errors (relative RMS vs the float64 reference; this file's shapes, both variants): float32
kernel: o and state 4e-8 .. 1.3e-7, every gradient 8e-8 .. 5e-7, except dg under strong decay
(6e-6 at C = 8, 1.1e-5 at C = 16, the same as the XLA chunk form in float32); float64 kernel:
~1e-16. bfloat16 q, k, v: o ~2e-3 (its own bfloat16 rounding), state ~1e-7, gradients
6e-4 .. 3e-3 (dq, dk, dv and the cotangent of o are bfloat16), again equal to the chunk form's.

Interpret mode is slow to compile (~2 s a kernel): shapes are tiny, each jitted function is
built once per configuration (``_runner``) and the slower combinations are marked slow.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from numpy_reference import delta_rule_np, rel_rms  # noqa: E402

import kernels  # noqa: E402
from kernels import common  # noqa: E402
from kernels import delta_rule as kernel  # noqa: E402
from memjax.ops import delta_rule  # noqa: E402

VARIANTS = {"tpu": kernel.delta_rule_tpu, "gpu": kernel.delta_rule_gpu}
# (K = V, chunk) per variant: Triton's tl.dot needs powers of two >= 16.
SIZES = {"tpu": (8, 8), "gpu": (16, 16)}


def chunk_for(variant, dtype=jnp.float32):
    """The variant's chunk; Mosaic tiles 16-bit rows by 16."""
    return max(SIZES[variant][1], 16 if jnp.dtype(dtype).itemsize == 2 else 8)
ARGS = ("q", "k", "v", "beta", "g", "initial_state")
F32_TOL = 1e-5  # relative RMS vs float64, forward and every gradient
BF16_TOL = dict(o=1e-2, state=1e-5, grad=1e-2)


def make_inputs(seed, *, B=1, T=20, H=2, K=8, V=8, gate="mild", init=True, beta_max=1.9):
    """float64 inputs as a dict: L2-normalised keys, beta in (0.1, beta_max), g per ``gate``
    ("mild": -U(0, 1); "strong": -U(4, 6); None: DeltaNet), an initial state or None."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(B, T, H, K))
    x = dict(q=rng.normal(size=(B, T, H, K)), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
             v=rng.normal(size=(B, T, H, V)), beta=rng.uniform(0.1, beta_max, (B, T, H)))
    x["g"] = {None: None, "mild": -rng.uniform(0.0, 1.0, (B, T, H)),
              "strong": -rng.uniform(4.0, 6.0, (B, T, H))}[gate]
    x["initial_state"] = rng.normal(size=(B, H, K, V)) if init else None
    return x


def cast(x, dtype):
    """Inputs in ``dtype``, except beta, g and the state (float32 unless float64)."""
    side = jnp.float64 if dtype == jnp.float64 else jnp.float32
    out = {}
    for name, value in x.items():
        if value is not None:
            value = jnp.asarray(value, dtype if name in ("q", "k", "v") else side)
        out[name] = value
    return out


def loss_weights(x, seed=1):
    """Random weights of o and the final state for a scalar loss (float64)."""
    rng = np.random.default_rng(seed)
    B, T, H, _ = x["q"].shape
    V = x["v"].shape[-1]
    return rng.normal(size=(B, T, H, V)), rng.normal(size=(B, H, x["q"].shape[-1], V))


def _present(x):
    return tuple(name for name in ARGS if x[name] is not None)


def _function(kind, chunk):
    """``f(q, k, v, beta, g, initial_state)`` for kind "tpu" / "gpu" (the kernel, interpreted)
    or an impl of memjax.ops.delta_rule ("reference", "chunk", "pallas")."""
    if kind in VARIANTS:
        return functools.partial(VARIANTS[kind], chunk_size=chunk, interpret=True)
    return functools.partial(delta_rule, impl=kind, chunk_size=chunk)


def _build(fn, names):
    """jit(inputs, w_o, w_s) -> (o, state, grads of sum(o w_o) + sum(state w_s) w.r.t. names)."""

    def run(inputs, w_o, w_s):
        def loss(diff):
            o, s = fn(**{**inputs, **diff})
            return jnp.sum(o * w_o.astype(o.dtype)) + jnp.sum(s * w_s.astype(s.dtype)), (o, s)

        grads, (o, s) = jax.grad(loss, has_aux=True)({n: inputs[n] for n in names})
        return o, s, grads

    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _runner(kind, chunk, names):
    """``_build`` for a kind of function, compiled once and shared between tests."""
    return _build(_function(kind, chunk), names)


def run_kernel(variant, x, dtype=jnp.float32):
    xc = cast(x, dtype)
    w = loss_weights(x)
    return _runner(variant, chunk_for(variant, dtype), _present(x))(xc, *w)


def run_reference(x):
    """Reference form in float64 (inside the x64 fixture): (o, state, grads)."""
    w = loss_weights(x)
    return _runner("reference", 64, _present(x))(cast(x, jnp.float64), *w)


def errors(got, ref):
    """{name: relative RMS} for o, state and every gradient."""
    (o, s, grads), (o_ref, s_ref, grads_ref) = got, ref
    out = {"o": rel_rms(o, o_ref), "state": rel_rms(s, s_ref)}
    out.update({f"d{n}": rel_rms(grads[n], grads_ref[n]) for n in grads_ref})
    return out


def kernel_inputs(variant, **kw):
    K, _ = SIZES[variant]
    return make_inputs(0, K=K, V=K, **kw)


def check_against_reference(variant, x, dtype=jnp.float32):
    """Kernel vs the float64 oracle (forward) and vs reference-form gradients; returns errors."""
    got = run_kernel(variant, x, dtype)
    rounded = {n: None if v is None else np.asarray(jnp.asarray(v, dtype if n in ("q", "k", "v")
                                                                 else jnp.float32), np.float64)
               for n, v in x.items()}
    oracle = delta_rule_np(**rounded)
    ref = run_reference(rounded)
    assert rel_rms(ref[0], oracle[0]) < 1e-10  # the float64 reference is the oracle
    err = errors(got, ref)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    assert all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in got[2].values())
    return err


# ---------------------------------------------------------------------------------------------
# Forward and gradients vs the float64 reference
# ---------------------------------------------------------------------------------------------

CASES = {
    "gated-init": dict(gate="mild", init=True),
    "deltanet": dict(gate=None, init=False),
    "strong-decay": dict(gate="strong", init=True),
}


def slow_for_gpu(*values):
    """Parameters (variant, *values) for both variants, the Triton one marked slow."""
    return [pytest.param("tpu", *values),
            pytest.param("gpu", *values, marks=pytest.mark.slow)]


@pytest.mark.parametrize("variant, case", [
    ("tpu", "gated-init"), ("gpu", "gated-init"), ("tpu", "deltanet"), ("gpu", "deltanet"),
    *slow_for_gpu("strong-decay"),
])
def test_float32_matches_float64_reference(x64, variant, case):
    """T = 20 (not a multiple of the chunk), beta up to 1.9, unit keys: forward and every
    gradient (q, k, v, beta, g and the initial state where present) within 1e-5; dg within
    5e-5 under strong decay (g ~ -5 per token), where the XLA chunk form's float32 dg has the
    same error (1.2e-5 at C = 16): float32 conditioning, not the kernel."""
    err = check_against_reference(variant, kernel_inputs(variant, **CASES[case]))
    tol = {n: 5e-5 if (n, case) == ("dg", "strong-decay") else F32_TOL for n in err}
    assert all(err[n] < tol[n] for n in err), err


@pytest.mark.parametrize("variant", slow_for_gpu())
def test_bfloat16_inputs(x64, variant):
    """bfloat16 q, k, v: o is bfloat16 (its rounding dominates), the state float32; the
    gradients of q, k, v and the cotangent of o are bfloat16."""
    err = check_against_reference(variant, kernel_inputs(variant), jnp.bfloat16)
    assert err["o"] < BF16_TOL["o"] and err["state"] < BF16_TOL["state"], err
    assert max(v for n, v in err.items() if n.startswith("d")) < BF16_TOL["grad"], err


@pytest.mark.slow
def test_float64_kernel_is_exact(x64):
    """In float64 (interpret mode) the kernel equals the reference to rounding: the chunk
    equations and the hand-written VJP are exact, not merely close."""
    x = kernel_inputs("tpu")
    got = _runner("tpu", 8, _present(x))(cast(x, jnp.float64), *loss_weights(x))
    err = errors(got, run_reference(x))
    assert max(err.values()) < 1e-12, err


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_matches_chunk_form(x64, variant):
    """The kernel equals impl="chunk" at the same chunk size (float32): forward and every
    gradient. (x64 only so that the compiled functions are shared with the tests above.)"""
    x = kernel_inputs(variant)
    got = run_kernel(variant, x)
    ref = _runner("chunk", chunk_for(variant), _present(x))(cast(x, jnp.float32), *loss_weights(x))
    err = errors(got, ref)
    assert max(err.values()) < F32_TOL, err


# ---------------------------------------------------------------------------------------------
# Through the operator, poisoning, tiling errors, registration
# ---------------------------------------------------------------------------------------------


def test_registered_for_every_platform():
    for platform in ("cpu", "gpu", "tpu"):
        assert kernels.lookup("delta_rule", platform) is not None


def test_op_pallas_equals_chunk(x64):
    """memjax.ops.delta_rule(impl="pallas") on CPU (the TPU kernel interpreted) equals
    impl="chunk": forward and the gradient w.r.t. every input (float32 inputs)."""
    x = cast(kernel_inputs("tpu"), jnp.float32)
    w = loss_weights(x)
    names = _present(x)
    got = _runner("pallas", 8, names)(x, *w)
    ref = _runner("chunk", 8, names)(x, *w)
    err = errors(got, ref)
    assert max(err.values()) < F32_TOL, err


@pytest.mark.parametrize("variant", slow_for_gpu())
def test_poisoned_outputs_are_all_written(variant):
    """With every output pre-filled with NaN, forward and backward stay finite and unchanged
    (the kernels write every tile). Traced afresh: poisoning is decided at trace time."""
    x = cast(kernel_inputs(variant), jnp.float32)
    w = loss_weights(x)
    plain = run_kernel(variant, kernel_inputs(variant))
    with common.poisoned_outputs():
        poisoned = _build(_function(variant, chunk_for(variant)), _present(x))(x, *w)
    for a, b in zip(jax.tree.leaves(poisoned), jax.tree.leaves(plain)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant, dtype, sizes, match", [
    ("tpu", jnp.float32, dict(chunk=12), r"chunk_size = 12 must be a multiple of 8"),
    ("tpu", jnp.bfloat16, dict(chunk=8), r"chunk_size = 8 must be a multiple of 16"),
    ("tpu", jnp.float32, dict(K=12), r"K = 12 must be a multiple of 8"),
    ("tpu", jnp.float32, dict(V=20), r"V = 20 must be a multiple of 8"),
    ("gpu", jnp.float32, dict(chunk=8), r"chunk_size = 8 must be a power of two >= 16"),
    ("gpu", jnp.float32, dict(K=24), r"K = 24 must be a power of two >= 16"),
    ("gpu", jnp.float32, dict(V=8), r"V = 8 must be a power of two >= 16"),
])
def test_tiling_errors_name_the_constraint(variant, dtype, sizes, match):
    sizes = {"chunk": 16, "K": 16, "V": 16, **sizes}
    x = cast(make_inputs(0, T=8, K=sizes["K"], V=sizes["V"]), dtype)
    with pytest.raises(common.TilingError, match=match):
        VARIANTS[variant](**x, chunk_size=sizes["chunk"], interpret=True)


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


def test_sharded_equals_unsharded():
    """On the simulated (2, 4) CPU mesh, B over "data" and H over "model": forward and
    gradients equal the unsharded kernel."""
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = cast(make_inputs(3, B=2, H=4, T=12), jnp.float32)
    w = loss_weights(x)
    sharded = kernel.delta_rule_sharded(mesh, batch_axis="data", head_axis="model",
                                        interpret=True)
    names = _present(x)
    got = _build(functools.partial(sharded, chunk_size=8), names)(x, *w)
    ref = _runner("tpu", 8, names)(x, *w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Lowering for TPU and CUDA without hardware
# ---------------------------------------------------------------------------------------------

def _export(variant, *, K, T, dtype, backward, B=2, H=2, chunk=64):
    """jax.export of the kernel (forward, or forward + VJP) for the variant's platform."""
    fn = functools.partial(VARIANTS[variant], chunk_size=chunk)

    def run(q, k, v, beta, g, s0):
        return fn(q, k, v, beta, g, initial_state=s0)

    def run_with_vjp(*args):
        out, vjp = jax.vjp(run, *args)
        return out, vjp(out)

    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), dtype), S((B, T, H, K), dtype), S((B, T, H, K), dtype),
            S((B, T, H), jnp.float32), S((B, T, H), jnp.float32), S((B, H, K, K), jnp.float32))
    platform = "tpu" if variant == "tpu" else "cuda"
    return common.export_without_hardware(run_with_vjp if backward else run, args,
                                          platform).mlir_module()


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("K, T", [(64, 256), (64, 1024), (128, 256), (128, 1024)])
@pytest.mark.parametrize("variant, target", [("tpu", "tpu_custom_call"),
                                             ("gpu", common.TRITON_CALL)])
def test_lowers_without_hardware(variant, target, K, T, dtype, backward):
    """Forward: one kernel call; forward + backward: the forward (saving states) and the
    backward kernel."""
    text = _export(variant, K=K, T=T, dtype=dtype, backward=backward)
    assert text.count(f"@{target}(") == (2 if backward else 1)


def test_triton_lowering_needs_a_target_gpu():
    """Without an abstract GPU (no GPU here) the Triton lowering cannot pick an architecture."""
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
            ((1, 16, 1, 16), (1, 16, 1, 16), (1, 16, 1, 16), (1, 16, 1))]
    f = jax.jit(functools.partial(kernel.delta_rule_gpu, chunk_size=16))
    with pytest.raises(RuntimeError, match="No supported GPU devices found"):
        export.export(f, platforms=["cuda"])(*args)
