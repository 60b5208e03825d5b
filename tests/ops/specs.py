"""One OpSpec per operator of memjax.ops: what the contract tests (contract.py) run.

Inputs are float64 NumPy, tiny, and chosen to exercise each operator's delicate cases: decays
from none to very strong (g ~ -30, A = -40) and exactly zero, delta-rule betas up to 2
(negative transition eigenvalues), stable complex SSM eigenvalues. The chunk sizes make every
``T`` odd and not a multiple of the chunk.
"""

from __future__ import annotations

import numpy as np
from contract import Bad, OpSpec
from numpy_reference import (
    delta_rule_np,
    generalized_delta_rule_np,
    linear_attention_np,
    linear_scan_np,
    s4d_np,
    s5_np,
    selective_scan_np,
    softmax_attention_np,
    ssd_np,
)

from memjax import ops
from memjax.ops import dispatch
from memjax.ops.attention import softmax_attention

B, H, K, V = 2, 2, 4, 3
CHUNK = 4  # every chunked form but generalized_delta_rule's (a multiple of 16)


def gate(rng, shape, kind="mixed"):
    """Log decays g <= 0 of ``shape`` and the named strength, or None.

    "mixed": along the last axis (heads or key channels) the typical magnitude sweeps
    geometrically from 0.01 to 30, per-token random, and about a quarter are exactly zero.
    """
    if kind == "none":
        return None
    if kind == "zero":
        return np.zeros(shape)
    if kind == "weak":
        return -0.01 * rng.uniform(0.5, 1.5, shape)
    if kind == "strong":
        return -30.0 * rng.uniform(0.9, 1.1, shape)
    g = -rng.uniform(0.0, 2.0, shape) * np.geomspace(0.01, 30.0, shape[-1])
    return np.where(rng.random(shape) < 0.25, 0.0, g)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _forms(op):
    return dispatch.FORMS[op]


def _qkv_bad(state_what="[B, H, K, V]"):
    """Bad inputs shared by the q, k, v operators (messages from memjax.ops._common)."""
    return (
        Bad("q-rank", lambda c: {**c, "q": c["q"][..., 0]}, r"q must have rank 4 \[B, T, H, K\]"),
        Bad("k-T", lambda c: {**c, "k": c["k"][:, :4]},
            r"k must have shape \[B, T, H, K\] \(same as q\) = \(2, 5, 2, 4\), got \(2, 4"),
        Bad("v-T", lambda c: {**c, "v": c["v"][:, :4]}, r"v must have shape \[B, T, H, V\]"),
        Bad("state", lambda c: {**c, "initial_state": c["initial_state"][..., :2, :]},
            rf"initial_state must have shape {state_what}".replace("[", r"\[").replace("]", r"\]")
            .replace("+", r"\+")),
        Bad("chunk-0", lambda c: {**c, "chunk_size": 0}, r"chunk_size must be a positive int"),
        Bad("chunk-float", lambda c: {**c, "chunk_size": 4.0}, r"chunk_size must be a positive"),
        Bad("step-q-rank", lambda c: {**c, "q": c["q"][None]}, r"q must have rank 3", step=True),
        Bad("step-state", lambda c: {**c, "state": c["state"][..., :-1]},
            r"state must have shape", step=True),
    )


# ---------------------------------------------------------------------------------------------
# Linear attention: per-head decay; per-channel decay with the normalizer
# ---------------------------------------------------------------------------------------------


def _la_inputs(rng, T, channel=False):
    q, k = rng.normal(size=(B, T, H, K)), rng.normal(size=(B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    h0 = rng.normal(size=(B, H, K, V))
    if not channel:
        return dict(q=q, k=k, v=v, g=gate(rng, (B, T, H))), h0
    # Positive features keep the normalizer q . z away from zero; z (last state column) > 0.
    z0 = rng.uniform(0.5, 2.0, (B, H, K, 1))
    return (dict(q=np.abs(q) + 0.1, k=np.abs(k) + 0.1, v=v, g=gate(rng, (B, T, H, K))),
            np.concatenate([h0, z0], axis=-1))


def _la_spec(id, channel):
    def run(c):
        return ops.linear_attention(c["q"], c["k"], c["v"], c["g"],
                                    initial_state=c["initial_state"],
                                    normalize=channel, impl=c["impl"],
                                    chunk_size=c.get("chunk_size", CHUNK))

    def step(c, state):
        return ops.linear_attention_step(c["q"], c["k"], c["v"], state, c["g"], normalize=channel)

    bad = _qkv_bad("[B, H, K, V + 1]" if channel else "[B, H, K, V]") + (
        Bad("g-shape", lambda c: {**c, "g": c["g"][..., :1] if channel else c["g"][..., None]},
            r"g must have shape \[B, T, H\] = \(2, 5, 2\) \(per head\) or \[B, T, H, K\] = "
            r"\(2, 5, 2, 4\) \(per key channel\), got"),
        Bad("step-g", lambda c: {**c, "g": c["g"][:, None]},
            r"g must have shape \[B, H\].*or \[B, H, K\]", step=True),
    )
    return OpSpec(
        id=id, op="linear_attention", forms=_forms("linear_attention"), run=run, step=step,
        make_inputs=lambda rng, T: _la_inputs(rng, T, channel),
        oracle=lambda a, h0: linear_attention_np(a["q"], a["k"], a["v"], a["g"], initial_state=h0,
                                                 normalize=channel),
        time_args=("q", "k", "v", "g"), T=11, bad_inputs=bad,
    )


# ---------------------------------------------------------------------------------------------
# Delta rules
# ---------------------------------------------------------------------------------------------


def _delta_inputs(rng, T):
    q, k = rng.normal(size=(B, T, H, K)), unit(rng.normal(size=(B, T, H, K)))
    v, beta = rng.normal(size=(B, T, H, V)), rng.uniform(0.0, 2.0, (B, T, H))
    return dict(q=q, k=k, v=v, beta=beta, g=gate(rng, (B, T, H))), rng.normal(size=(B, H, K, V))


DELTA_RULE = OpSpec(
    id="delta_rule", op="delta_rule", forms=_forms("delta_rule"),
    run=lambda c: ops.delta_rule(c["q"], c["k"], c["v"], c["beta"], c["g"],
                                 initial_state=c["initial_state"], impl=c["impl"],
                                 chunk_size=c.get("chunk_size", CHUNK)),
    step=lambda c, s: ops.delta_rule_step(c["q"], c["k"], c["v"], c["beta"], s, c["g"]),
    make_inputs=_delta_inputs,
    oracle=lambda a, h0: delta_rule_np(a["q"], a["k"], a["v"], a["beta"], a["g"], initial_state=h0),
    time_args=("q", "k", "v", "beta", "g"), T=11,
    bad_inputs=_qkv_bad() + (
        Bad("beta", lambda c: {**c, "beta": c["beta"][..., :1]},
            r"beta must have shape \[B, T, H\]"),
        Bad("g-channel", lambda c: {**c, "g": c["k"]}, r"g must have shape \[B, T, H\]"),
        Bad("step-beta", lambda c: {**c, "beta": c["beta"][:, None]},
            r"beta must have shape \[B, H\]", step=True),
    ),
    f64_tol=1e-9, f64_grad_tol=1e-8,
    low_precision_tol={"float32": dict(y=5e-6, state=5e-6), "bfloat16": dict(y=5e-3, state=5e-6)},
)


def _gdr_inputs(rng, T):
    """RWKV-7 form: a = -kappa_hat, b = kappa_hat * lr, lr in (0, 2) (negative eigenvalues)."""
    kappa = unit(rng.normal(size=(B, T, H, K)))
    lr = rng.uniform(0.0, 2.0, (B, T, H, K))
    args = dict(q=rng.normal(size=(B, T, H, K)), k=rng.normal(size=(B, T, H, K)) * K**-0.5,
                v=rng.normal(size=(B, T, H, V)), g=gate(rng, (B, T, H, K)), a=-kappa, b=kappa * lr)
    return args, rng.normal(size=(B, H, K, V))


GENERALIZED_DELTA_RULE = OpSpec(
    id="generalized_delta_rule", op="generalized_delta_rule",
    forms=_forms("generalized_delta_rule"),
    run=lambda c: ops.generalized_delta_rule(c["q"], c["k"], c["v"], c["g"], c["a"], c["b"],
                                             initial_state=c["initial_state"], impl=c["impl"],
                                             chunk_size=c.get("chunk_size", 16)),
    step=lambda c, s: ops.generalized_delta_rule_step(c["q"], c["k"], c["v"], c["g"], c["a"],
                                                      c["b"], s),
    make_inputs=_gdr_inputs,
    oracle=lambda a, h0: generalized_delta_rule_np(a["q"], a["k"], a["v"], a["g"], a["a"], a["b"],
                                                   initial_state=h0),
    time_args=("q", "k", "v", "g", "a", "b"), T=19,
    bad_inputs=_qkv_bad()[:4] + (
        Bad("a-shape", lambda c: {**c, "a": c["a"][..., :2]},
            r"a must have shape \[B, T, H, K\] \(same as q\)"),
        Bad("chunk-not-16", lambda c: {**c, "chunk_size": 24},
            r"chunk_size must be a positive multiple of 16, got 24"),
        Bad("step-b", lambda c: {**c, "b": c["b"][None]}, r"b must have rank 3", step=True),
    ),
    f64_tol=1e-9, f64_grad_tol=1e-8,
    low_precision_tol={"float32": dict(y=5e-6, state=5e-6), "bfloat16": dict(y=5e-3, state=5e-6)},
)


# ---------------------------------------------------------------------------------------------
# Selective SSMs: Mamba's selective scan, Mamba-2's SSD
# ---------------------------------------------------------------------------------------------

D_SEL, N_SSM, P_SSD = 3, 4, 2


def _selective_inputs(rng, T):
    A = -rng.uniform(0.1, 3.0, (D_SEL, N_SSM))
    A[:, 0], A[:, 1] = 0.0, -40.0  # decay exactly 1; strong decay (e^-40)
    args = dict(x=rng.normal(size=(B, T, D_SEL)), dt=rng.uniform(0.01, 1.0, (B, T, D_SEL)), A=A,
                Bm=rng.normal(size=(B, T, N_SSM)), Cm=rng.normal(size=(B, T, N_SSM)),
                Dskip=rng.normal(size=(D_SEL,)))
    return args, rng.normal(size=(B, D_SEL, N_SSM))


def _ssd_inputs(rng, T):
    args = dict(x=rng.normal(size=(B, T, H + 1, P_SSD)), dt=rng.uniform(0.01, 1.0, (B, T, H + 1)),
                A=np.array([0.0, -40.0, -rng.uniform(0.1, 3.0)]),  # decay 1, strong, ordinary
                Bm=rng.normal(size=(B, T, N_SSM)), Cm=rng.normal(size=(B, T, N_SSM)),
                Dskip=rng.normal(size=(H + 1,)))
    return args, rng.normal(size=(B, H + 1, N_SSM, P_SSD))


def _ssm_spec(id, fn, step_fn, make_inputs, oracle):
    """Selective scan and SSD share their argument names (x, dt, A, Bm, Cm, Dskip)."""
    names = ("x", "dt", "A", "Bm", "Cm", "Dskip")
    return OpSpec(
        id=id, op=id, forms=_forms(id),
        run=lambda c: fn(*(c[n] for n in names), initial_state=c["initial_state"], impl=c["impl"],
                         chunk_size=c.get("chunk_size", CHUNK)),
        step=lambda c, s: step_fn(*(c[n] for n in names[:5]), s, c["Dskip"]),
        make_inputs=make_inputs,
        oracle=lambda a, h0: oracle(*(a[n] for n in names), initial_state=h0),
        time_args=("x", "dt", "Bm", "Cm"), T=11,
        bad_inputs=(
            Bad("x-rank", lambda c: {**c, "x": c["x"][0]}, r"^x must have rank"),
            Bad("dt", lambda c: {**c, "dt": c["dt"][:, :4]}, r"^dt must have shape"),
            Bad("A", lambda c: {**c, "A": c["A"][:2]}, r"^A must have shape"),
            Bad("Cm", lambda c: {**c, "Cm": c["Cm"][:, :4]}, r"^Cm must have shape"),
            Bad("Dskip", lambda c: {**c, "Dskip": c["Dskip"][:1]}, r"^Dskip must have shape"),
            Bad("state", lambda c: {**c, "initial_state": c["initial_state"][:1]},
                r"^initial_state must have shape"),
            Bad("chunk-0", lambda c: {**c, "chunk_size": 0}, r"chunk_size must be a positive int"),
            Bad("step-state", lambda c: {**c, "state": c["state"][:, :2]}, r"^state must",
                step=True),
        ),
        low_precision_tol={"float32": dict(y=2e-6, state=2e-6),
                           "bfloat16": dict(y=1e-2, state=1e-5)},
    )


SELECTIVE_SCAN = _ssm_spec("selective_scan", ops.selective_scan, ops.selective_scan_step,
                           _selective_inputs, selective_scan_np)
SSD = _ssm_spec("ssd", ops.ssd, ops.ssd_step, _ssd_inputs, ssd_np)


# ---------------------------------------------------------------------------------------------
# Linear time-invariant and elementwise scans: S4D, S5, linear_scan
# ---------------------------------------------------------------------------------------------


def crandn(rng, *shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def stable_eigs(rng, *shape):
    return -rng.uniform(0.1, 1.0, shape) + 1j * rng.uniform(-3.0, 3.0, shape)


def _s4d_inputs(rng, T, N=4):
    args = dict(u=rng.standard_normal((B, T, H + 1)), Lambda=stable_eigs(rng, H + 1, N),
                B=crandn(rng, H + 1, N), C=crandn(rng, H + 1, N),
                log_dt=np.log(rng.uniform(0.05, 0.5, H + 1)), D=rng.standard_normal(H + 1))
    return args, crandn(rng, B, H + 1, N)


def _s5_inputs(rng, T, P=4):
    args = dict(u=rng.standard_normal((B, T, H + 1)), Lambda=stable_eigs(rng, P),
                B=crandn(rng, P, H + 1), C=crandn(rng, H + 1, P),
                log_dt=np.log(rng.uniform(0.05, 0.5, P)), D=rng.standard_normal(H + 1))
    return args, crandn(rng, B, P)


def _lti_spec(id, fn, step_fn, make_inputs, oracle, **options):
    names = ("u", "Lambda", "B", "C", "log_dt", "D")
    return OpSpec(
        id=id, op=id, forms=_forms(id),
        run=lambda c: fn(*(c[n] for n in names), initial_state=c["initial_state"], impl=c["impl"],
                         **options),
        step=lambda c, s: step_fn(c["u"], s, *(c[n] for n in names[1:])),
        make_inputs=make_inputs, oracle=lambda a, h0: oracle(*(a[n] for n in names), h0),
        time_args=("u",), T=11,
        bad_inputs=(
            Bad("u-rank", lambda c: {**c, "u": c["u"][0]}, r"u must have rank 3 \[B, T, H\]"),
            Bad("u-H", lambda c: {**c, "u": c["u"][..., :2]},
                r"u must have shape \[B, T, H\] with H"),
            Bad("C", lambda c: {**c, "C": c["C"][:1]}, r"C must have shape"),
            Bad("log_dt", lambda c: {**c, "log_dt": c["log_dt"][:1]}, r"log_dt must have shape"),
            Bad("state", lambda c: {**c, "initial_state": c["initial_state"][:1]},
                r"initial_state must have shape"),
            Bad("step-state", lambda c: {**c, "state": c["state"][:1]}, r"state must have shape",
                step=True),
        ),
        low_precision_tol={"float32": dict(y=1e-5, state=1e-5),
                           "bfloat16": dict(y=1e-2, state=1e-5)},
    )


S4D = _lti_spec("s4d", ops.s4d, ops.s4d_step, _s4d_inputs, s4d_np)
S5 = _lti_spec("s5", ops.s5, ops.s5_step, _s5_inputs, s5_np, chunk_size=CHUNK)


def _linear_scan_inputs(rng, T):
    """Decays in (-1, 1) (signs included, so cancellations are exercised), inputs O(1)."""
    shape = (B, T, H, K)
    return dict(a=rng.uniform(-0.99, 0.99, shape), b=rng.standard_normal(shape)), rng.normal(
        size=(B, H, K))


LINEAR_SCAN = OpSpec(
    id="linear_scan", op="linear_scan", forms=_forms("linear_scan"),
    run=lambda c: ops.linear_scan(c["a"], c["b"], initial_state=c["initial_state"], impl=c["impl"],
                                  chunk_size=c.get("chunk_size", CHUNK)),
    step=lambda c, s: ops.linear_scan_step(c["a"], c["b"], s),
    make_inputs=_linear_scan_inputs,
    oracle=lambda a, h0: linear_scan_np(
        a["a"], a["b"], np.zeros(a["a"].shape[:1] + a["a"].shape[2:]) if h0 is None else h0),
    time_args=("a", "b"), T=11, y_in_input_dtype=False,
    bad_inputs=(
        Bad("a-rank", lambda c: {**c, "a": c["a"][:, 0, 0, 0], "b": c["b"][:, 0, 0, 0]},
            r"a must have rank >= 2"),
        Bad("b-shape", lambda c: {**c, "b": c["b"][:, :4]}, r"b must have the same shape as a"),
        Bad("state", lambda c: {**c, "initial_state": c["initial_state"][:1]},
            r"initial_state must have shape \[B, \*S\]"),
        Bad("chunk-0", lambda c: {**c, "chunk_size": 0}, r"chunk_size must be a positive int"),
        Bad("step-state", lambda c: {**c, "state": c["state"][:1]},
            r"a_t, b_t and state must have one shape", step=True),
    ),
)


# ---------------------------------------------------------------------------------------------
# Softmax attention: no recurrent state (its cache is the keys and values)
# ---------------------------------------------------------------------------------------------


def _attention_inputs(rng, T):
    # Logits of norm ~2 so the softmax is far from uniform.
    return dict(q=1.5 * rng.normal(size=(B, T, H, K)), k=1.5 * rng.normal(size=(B, T, H, K)),
                v=rng.normal(size=(B, T, H, V))), None


def _attention_spec(id, window):
    return OpSpec(
        id=id, op="softmax_attention", forms=_forms("softmax_attention"),
        run=lambda c: (softmax_attention(c["q"], c["k"], c["v"], window=window, impl=c["impl"],
                                         chunk_size=CHUNK), None),
        make_inputs=_attention_inputs,
        oracle=lambda a, h0: (softmax_attention_np(a["q"], a["k"], a["v"], window=window), None),
        time_args=("q", "k", "v"), T=11, stateful=False,
        bad_inputs=(
            Bad("k-H", lambda c: {**c, "k": c["k"][:, :, :1]}, r"softmax_attention expects q"),
            Bad("k-T", lambda c: {**c, "k": c["k"][:, :4], "v": c["v"][:, :4]}, r"pass q_offset"),
        ),
        f64_tol=1e-12,
    )


SPECS = (
    _la_spec("linear_attention", channel=False),
    _la_spec("linear_attention_channel_normalize", channel=True),
    DELTA_RULE,
    GENERALIZED_DELTA_RULE,
    SELECTIVE_SCAN,
    SSD,
    S4D,
    S5,
    LINEAR_SCAN,
    _attention_spec("softmax_attention_window", window=4),
    _attention_spec("softmax_attention_full", window=None),
)
