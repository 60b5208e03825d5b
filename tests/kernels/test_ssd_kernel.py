"""kernels/ssd.py: Mamba-2 SSD through the linear-attention kernels (interpret mode on CPU)
against the float64 NumPy oracle and the float64 gradients of the op's reference form, the op's
impl="pallas", and lowering for TPU without hardware. Errors are printed (run with -s)."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "ops"))
from numpy_reference import rel_rms, ssd_np  # noqa: E402

from kernels.ssd import ssd_gpu, ssd_tpu  # noqa: E402
from memjax import ops  # noqa: E402

VARIANTS = {"tpu": ssd_tpu, "gpu": ssd_gpu}
ARGS = ("x", "dt", "A", "Bm", "Cm", "Dskip", "h0")
F32_TOL, BF16_TOL = 1e-5, 2e-2


def make_inputs(seed, B, T, H, N, P, *, with_skip=True, with_h0=True):
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return (f32(rng.standard_normal((B, T, H, P))),
            f32(rng.uniform(0.1, 1.0, (B, T, H))),  # dt > 0
            f32(-rng.uniform(0.5, 2.0, (H,))),  # A <= 0
            f32(rng.standard_normal((B, T, N))), f32(rng.standard_normal((B, T, N))),
            f32(rng.standard_normal(H)) if with_skip else None,
            f32(rng.standard_normal((B, H, N, P))) if with_h0 else None)


def value_and_grads(fn, inputs, seed):
    present = {n: x for n, x in zip(ARGS, inputs) if x is not None}
    (y, final), vjp = jax.vjp(lambda kw: fn(*(kw.get(n) for n in ARGS)), present)
    rng = np.random.default_rng(seed + 1000)
    cts = tuple(jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in (y, final))
    (grads,) = vjp(cts)
    as64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    return as64(y), as64(final), {n: as64(x) for n, x in grads.items()}


def op(impl, chunk=16):
    def fn(x, dt, A, Bm, Cm, Dskip, h0):
        return ops.ssd(x, dt, A, Bm, Cm, Dskip, initial_state=h0, impl=impl, chunk_size=chunk)
    return fn


@functools.lru_cache(maxsize=None)
def reference(config):
    seed, shape, with_skip, with_h0 = config
    inputs = make_inputs(seed, *shape, with_skip=with_skip, with_h0=with_h0)
    with jax.enable_x64(True):
        inputs64 = [None if x is None else jnp.asarray(x, jnp.float64) for x in inputs]
        out = value_and_grads(op("reference"), inputs64, seed)
    y_np, s_np = ssd_np(*inputs[:6], initial_state=inputs[6])
    assert rel_rms(out[0], y_np) < 1e-12 and rel_rms(out[1], s_np) < 1e-12
    return out


def kernel_errors(variant, config, *, chunk=16, dtype=jnp.float32):
    seed, shape, with_skip, with_h0 = config
    inputs = make_inputs(seed, *shape, with_skip=with_skip, with_h0=with_h0)
    inputs = [None if x is None else jnp.asarray(x, dtype if n in ("x", "Bm", "Cm") else
                                                  jnp.float32) for n, x in zip(ARGS, inputs)]
    fn = lambda x, dt, A, Bm, Cm, Dskip, h0: VARIANTS[variant](  # noqa: E731
        x, dt, A, Bm, Cm, Dskip, initial_state=h0, chunk_size=chunk, interpret=True)
    y, final, grads = value_and_grads(fn, inputs, seed)
    y_ref, final_ref, grads_ref = reference(config)
    errors = {"y": rel_rms(y, y_ref), "state": rel_rms(final, final_ref)}
    errors.update({f"d{n}": rel_rms(grads[n], grads_ref[n]) for n in grads_ref})
    print(f"\nssd {variant} {jnp.dtype(dtype).name} shape={shape} C={chunk}: "
          + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    assert set(grads) == set(grads_ref)
    return errors


def assert_errors_below(errors, tol):
    assert all(np.isfinite(e) and e < tol for e in errors.values()), errors


# (seed, (B, T, H, N, P), with_skip, with_h0); T = 20 is not a multiple of the chunk.
MAIN = (0, (2, 20, 2, 16, 16), True, True)


@pytest.mark.parametrize("variant", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])
def test_forward_and_gradients_match_float64(variant):
    assert_errors_below(kernel_errors(variant, MAIN), F32_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_no_skip_no_initial_state(variant):
    config = (1, (1, 40, 2, 16, 32), False, False)
    assert_errors_below(kernel_errors(variant, config), F32_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_bfloat16_inputs(variant):
    assert_errors_below(kernel_errors(variant, MAIN, dtype=jnp.bfloat16), BF16_TOL)


def test_op_pallas_equals_chunk_form():
    inputs = make_inputs(2, 1, 13, 2, 8, 8)
    y, s = op("pallas", chunk=8)(*inputs)
    y_ref, s_ref = op("chunk", chunk=8)(*inputs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)
    assert y.dtype == jnp.float32 and s.shape == (1, 2, 8, 8)


def test_lowers_for_tpu_without_hardware():
    B, T, H, N, P = 2, 256, 4, 64, 64
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, P), jnp.bfloat16), S((B, T, H), jnp.float32), S((H,), jnp.float32),
            S((B, T, N), jnp.bfloat16), S((B, T, N), jnp.bfloat16), S((H,), jnp.float32))

    def fwd_bwd(*a):
        out, vjp = jax.vjp(lambda *a: ssd_tpu(*a, chunk_size=64), *a)
        return out, vjp(out)

    text = export.export(jax.jit(fwd_bwd), platforms=["tpu"])(*args).mlir_module()
    assert text.count("tpu_custom_call") >= 2
