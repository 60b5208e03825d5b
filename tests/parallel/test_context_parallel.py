"""Tests for memjax/parallel/context.py: context (sequence) parallelism for linear attention, the
(gated) delta rule and SSD on the 8 simulated CPU devices (tests/conftest.py).

Every case compares the context-parallel forward (outputs and final state) and the gradients of a
random linear functional of both w.r.t. every input (initial_state included) with the
single-device op, in float32; the x64 case compares the forward with the float64 NumPy oracle.
T = 48 with chunk 8 makes the shards 24 (3 chunks), 12 (1.5 chunks) and 6 tokens (shorter than a
chunk) long at 2, 4 and 8 shards. Shapes are tiny; the remaining combinations are marked slow.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from numpy_reference import delta_rule_np, linear_attention_np, rel_rms, ssd_np  # noqa: E402

from memjax import ops  # noqa: E402
from memjax.parallel import (context_parallel_delta_rule,  # noqa: E402
                             context_parallel_linear_attention, context_parallel_ssd)

B, T, H, K, V, N = 2, 48, 2, 8, 8, 8
CHUNK = 8
TOL = 2e-5  # relative RMS, float32 (measured: 1e-8 .. 3e-7, dA of SSD up to 3e-6)


def _mesh(shape, names):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names)


def make_inputs(op, *, decay=True, init=True, per_channel=False, normalize=False, seed=0):
    """Named float32 inputs (a dict; absent optional inputs are left out)."""
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s)  # noqa: E731
    if op == "ssd":
        x = {"x": f(B, T, H, V), "dt": r.uniform(0.05, 0.5, (B, T, H)),
             "A": -r.uniform(0.2, 1.0, H), "Bm": f(B, T, N) / 3, "Cm": f(B, T, N) / 3,
             "Dskip": f(H)}
        if init:
            x["initial_state"] = f(B, H, N, V)
        if not decay:  # A = 0: no decay
            x["A"] = np.zeros(H)
    else:
        x = {"q": f(B, T, H, K), "k": f(B, T, H, K), "v": f(B, T, H, V)}
        if op == "delta_rule":
            x["k"] /= np.linalg.norm(x["k"], axis=-1, keepdims=True)
            x["beta"] = r.uniform(0.1, 1.9, (B, T, H))
        else:
            x["k"] /= 2
        if decay:
            x["g"] = -r.uniform(0.0, 0.4, (B, T, H, K) if per_channel else (B, T, H))
        if init:
            x["initial_state"] = f(B, H, K, V + int(normalize))
        if normalize:  # positive features keep the normalizer away from 0
            x["q"], x["k"] = np.abs(x["q"]), np.abs(x["k"])
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return {name: jnp.asarray(a, dtype) for name, a in x.items()}


POSITIONAL = {"linear_attention": ("q", "k", "v", "g"),
              "delta_rule": ("q", "k", "v", "beta", "g"),
              "ssd": ("x", "dt", "A", "Bm", "Cm", "Dskip")}
SINGLE = {"linear_attention": ops.linear_attention, "delta_rule": ops.delta_rule, "ssd": ops.ssd}
PARALLEL = {"linear_attention": context_parallel_linear_attention,
            "delta_rule": context_parallel_delta_rule, "ssd": context_parallel_ssd}


def _call(fn, op, inputs, **kw):
    args = [inputs.get(name) for name in POSITIONAL[op]]
    return fn(*args, initial_state=inputs.get("initial_state"), chunk_size=CHUNK, **kw)


@functools.lru_cache(maxsize=None)
def _runner(op, mesh=None, axis=None, batch_axis=None, head_axis=None, normalize=False):
    """Jitted ``(inputs, weights) -> (o, final_state, grads of <weights, (o, final)>)``: the
    single-device op (mesh None) or the context-parallel one."""
    kw = {"normalize": True} if normalize else {}
    if mesh is None:
        fn = functools.partial(SINGLE[op], **kw)
    else:
        fn = functools.partial(PARALLEL[op], mesh=mesh, axis=axis, batch_axis=batch_axis,
                               head_axis=head_axis, **kw)

    def loss(inputs, weights):
        o, final = _call(fn, op, inputs)
        return jnp.sum(weights[0] * o) + jnp.sum(weights[1] * final), (o, final)

    @jax.jit
    def run(inputs, weights):
        grads, (o, final) = jax.grad(loss, has_aux=True)(inputs, weights)
        return o, final, grads

    return run


def _weights(op, inputs):
    o, final = jax.eval_shape(lambda x: _call(SINGLE[op], op, x), inputs)
    r = np.random.default_rng(1)
    return tuple(jnp.asarray(r.standard_normal(s.shape), s.dtype) for s in (o, final))


def _weights_normalized(inputs):
    o, final = jax.eval_shape(
        lambda x: _call(functools.partial(ops.linear_attention, normalize=True),
                        "linear_attention", x), inputs)
    r = np.random.default_rng(1)
    return tuple(jnp.asarray(r.standard_normal(s.shape), s.dtype) for s in (o, final))


def _assert_close(got, ref, tol=TOL):
    o, final, grads = got
    o_ref, final_ref, grads_ref = ref
    assert o.shape == o_ref.shape and final.shape == final_ref.shape
    assert rel_rms(o, o_ref) < tol, ("o", rel_rms(o, o_ref))
    assert rel_rms(final, final_ref) < tol, ("final", rel_rms(final, final_ref))
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        err = rel_rms(grads[name], grads_ref[name])
        assert err < tol, (f"d{name}", err)


def _check(op, n, *, decay, init):
    inputs = make_inputs(op, decay=decay, init=init)
    w = _weights(op, inputs)
    got = _runner(op, _mesh((n,), ("seq",)), "seq")(inputs, w)
    _assert_close(got, _runner(op)(inputs, w))


OPS = ("linear_attention", "delta_rule", "ssd")
FAST = [(op, 4, True, True) for op in OPS] + [(op, 8, False, False) for op in OPS]
SLOW = [(op, n, d, i) for op in OPS for n in (2, 4, 8) for d in (True, False)
        for i in (True, False) if (op, n, d, i) not in FAST]


@pytest.mark.parametrize("op,n,decay,init", FAST)
def test_forward_and_gradients_equal_single_device(op, n, decay, init):
    _check(op, n, decay=decay, init=init)


@pytest.mark.slow
@pytest.mark.parametrize("op,n,decay,init", SLOW)
def test_forward_and_gradients_equal_single_device_all(op, n, decay, init):
    _check(op, n, decay=decay, init=init)


@pytest.mark.parametrize("op", OPS)
def test_forward_equals_float64_oracle(op, x64):
    """Float64 throughout: the context-parallel forward equals the NumPy oracle to ~1e-14."""
    inputs = make_inputs(op)
    assert inputs[POSITIONAL[op][0]].dtype == jnp.float64
    mesh = _mesh((4,), ("seq",))
    o, final = jax.jit(lambda x: _call(functools.partial(PARALLEL[op], mesh=mesh, axis="seq"),
                                       op, x))(inputs)
    npx = {name: np.asarray(a) for name, a in inputs.items()}
    oracle = {"linear_attention": linear_attention_np, "delta_rule": delta_rule_np,
              "ssd": ssd_np}[op]
    args = [npx.get(name) for name in POSITIONAL[op]]
    o_ref, final_ref = oracle(*args, initial_state=npx.get("initial_state"))
    assert o.dtype == jnp.float64 and final.dtype == jnp.float64
    assert rel_rms(o, o_ref) < 1e-12
    assert rel_rms(final, final_ref) < 1e-12


@pytest.mark.parametrize("op", OPS)
def test_batch_sharded_on_another_axis(op):
    """Mesh (2, 4) = batch x sequence."""
    inputs = make_inputs(op, seed=2)
    w = _weights(op, inputs)
    mesh = _mesh((2, 4), ("data", "seq"))
    got = _runner(op, mesh, "seq", batch_axis="data")(inputs, w)
    assert got[0].sharding.spec[:2] == ("data", "seq")
    _assert_close(got, _runner(op)(inputs, w))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_batch_and_heads_sharded(op):
    """Mesh (2, 2, 2) = batch x heads x sequence."""
    inputs = make_inputs(op, seed=3)
    w = _weights(op, inputs)
    mesh = _mesh((2, 2, 2), ("data", "model", "seq"))
    got = _runner(op, mesh, "seq", batch_axis="data", head_axis="model")(inputs, w)
    _assert_close(got, _runner(op)(inputs, w))


def test_linear_attention_per_channel_decay_and_normalizer():
    """Per-key-channel g and normalize=True (the state carries z as its last column)."""
    inputs = make_inputs("linear_attention", per_channel=True, normalize=True, seed=4)
    w = _weights_normalized(inputs)
    mesh = _mesh((4,), ("seq",))
    got = _runner("linear_attention", mesh, "seq", normalize=True)(inputs, w)
    _assert_close(got, _runner("linear_attention", normalize=True)(inputs, w))


@pytest.mark.parametrize("op", OPS)
def test_sequence_not_divisible_by_shards(op):
    inputs = {name: a[:, :30] if a.ndim >= 3 else a for name, a in make_inputs(op).items()}
    inputs["initial_state"] = make_inputs(op)["initial_state"]
    mesh = _mesh((4,), ("seq",))
    with pytest.raises(ValueError, match=r"T = 30 .*'seq' = 4"):
        _call(functools.partial(PARALLEL[op], mesh=mesh, axis="seq"), op, inputs)


def test_unknown_axis():
    inputs = make_inputs("linear_attention")
    with pytest.raises(ValueError, match="not a mesh axis"):
        _call(functools.partial(context_parallel_linear_attention,
                                mesh=_mesh((4,), ("seq",)), axis="time"),
              "linear_attention", inputs)


def test_explicit_mesh_axes():
    """``jax.make_mesh``'s default Explicit axes: inputs are resharded, results unchanged."""
    inputs = make_inputs("delta_rule", seed=5)
    w = _weights("delta_rule", inputs)
    mesh = jax.make_mesh((2, 4), ("data", "seq"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    got = _runner("delta_rule", mesh, "seq", batch_axis="data")(inputs, w)
    _assert_close(got, _runner("delta_rule")(inputs, w))
