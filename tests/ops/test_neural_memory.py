"""Tests for memjax.ops.neural_memory (Titans / ATLAS / Miras test-time memories), float64.

The operator, per batch item and head (b = memory_chunk, c = window, Wbar_t = the weights at the
start of token t's mini-batch floor(t / b), tokens counted from the start of the stream):

    G_t = sum_{i = t-c+1 .. t} gamma_i grad_W loss_i(Wbar_t)     (tokens before the start absent)
    gd:   S_t = eta_t S_{t-1} + lr_t G_t;   W_t = (1 - decay_t) W_{t-1} - S_t
    muon: S_t = eta_t S_{t-1} + G_t;        W_t = (1 - decay_t) W_{t-1} - lr_t NS_k(S_t)
    o_t = M_{W_t}(q_t) (retrieve "after") or M_{W_{t-1}}(q_t) ("before");  S_0 = 0, W_0 = params

is checked against neural_memory_oracle.py (plain loops, float64, written from the equations):

- both forms (reference, chunk) equal the oracle, for every architecture x loss x optimizer at
  memory_chunk 4, T = 11, plus memory_chunk 1 / 3 / 5 / 16 (T not a multiple of it, or shorter),
  windows 1, 2, 3 and 6 (> memory_chunk), retrieve before / after, momentum on / off, mean
  reduction, SiLU, depth 3, residual off with V != K;
- gradients of a scalar function of the output and the final weights and momentum w.r.t. every
  input and the params: chunk form == reference form;
- degenerate cases: the linear memory with the l2 loss and plain online GD (b = 1, c = 1, no
  momentum) is the delta rule with beta = 2 lr (memjax.ops.delta_rule), and with a decay
  W_t = (1 - a_t) W_{t-1} - 2 lr_t (W_{t-1} k_t - v_t) k_t^T; for gd with c = 1, gamma is a
  factor on lr (gamma None == ones); window 3 with gamma nonzero on tokens >= 3 apart equals
  window 1 with each such token repeated over the next two positions;
- split-and-resume (splits inside a mini-batch and inside the Omega window, forms mixed) and
  prefill-then-decode with neural_memory_step equal the run in one piece;
- Newton-Schulz against the oracle and its near-orthogonality; T = 0; bad inputs.

Every case runs inside the x64 fixture. Inputs: unit-norm q and k, lr in (0.05, 0.3) (divided by
the window for gd, where the window's gradients add up, so that the memory stays bounded), decay in
(0.02, 0.2), momentum in (0, 0.9), gamma in (0.3, 1); params normal with std fan_in ** -0.5 on
every leaf (the last one included, unlike init_memory_params, so that no leaf starts at zero).
Compilation dominates the cost (the spec is a static argument): tests reuse specs and lengths
where they can so that the jit cache is shared.
"""

import dataclasses
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from neural_memory_oracle import (
    activation,
    apply_np,
    linear_l2_decay_np,
    linear_l2_gradient,
    loss_gradient_fn,
    memory_apply,
    neural_memory_oracle,
    newton_schulz_oracle,
)
from numpy_reference import delta_rule_np

from memjax.ops import delta_rule
from memjax.ops.memory_nets import newton_schulz, newton_schulz_factor
from memjax.ops.neural_memory import (
    MemorySpec,
    MemoryState,
    init_memory_params,
    initial_memory_state,
    neural_memory,
    neural_memory_step,
)

B, H, K = 2, 2, 4
FORMS = ("reference", "chunk")
F64_TOL = dict(rtol=1e-10, atol=1e-10)
GRAD_TOL = 1e-9
FIELDS = ("base", "weights", "momentum")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def param_shapes(spec, K, V):
    """{leaf: (out, in)} per head, from the documented layout (independent of memjax)."""
    hid = spec.expansion * K
    if spec.architecture == "linear":
        return {"w": (V, K)}
    if spec.architecture == "gated_mlp":
        return {"gate": (hid, K), "up": (hid, K), "down": (V, hid)}
    dims = [K] + [hid] * (spec.depth - 1) + [V]
    return {f"w{l}": (dims[l + 1], dims[l]) for l in range(spec.depth)}


def make_params(seed, spec, V):
    rng = np.random.default_rng(1000 + seed)
    return {n: rng.normal(size=(H, o, i)) / np.sqrt(i) for n, (o, i) in
            param_shapes(spec, K, V).items()}


def make_inputs(seed, T, V, spec, gamma=True):
    """float64 NumPy inputs by name (momentum None unless spec.momentum; gamma None if not
    asked for)."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return dict(
        q=unit(rng.normal(size=(B, T, H, K))),
        k=unit(rng.normal(size=(B, T, H, K))),
        v=rng.normal(size=(B, T, H, V)),
        lr=rng.uniform(0.05, 0.3, (B, T, H)) / (spec.window if spec.optimizer == "gd" else 1),
        decay=rng.uniform(0.02, 0.2, (B, T, H)),
        momentum=rng.uniform(0.0, 0.9, (B, T, H)) if spec.momentum else None,
        gamma=rng.uniform(0.3, 1.0, (B, T, H)) if gamma else None,
    )


def jx(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


def run(spec, args, impl, params=None, initial_state=None):
    a = jx(args)
    return neural_memory(a["q"], a["k"], a["v"], a["lr"], a["decay"], a["momentum"], a["gamma"],
                         spec=spec, params=None if params is None else jx(params),
                         initial_state=initial_state, impl=impl)


def sliced(args, start, stop):
    return {n: None if x is None else x[:, start:stop] for n, x in args.items()}


def assert_tree_close(got, want, what, **tol):
    tol = tol or F64_TOL
    assert set(got) == set(want), what
    for n in want:
        np.testing.assert_allclose(np.asarray(got[n]), np.asarray(want[n]), **tol,
                                   err_msg=f"{what}[{n}]")


def assert_states_close(got, want, what, **tol):
    for field in FIELDS:
        assert_tree_close(getattr(got, field), getattr(want, field), f"{what} state.{field}",
                          **tol)
    assert int(got.phase) == int(want.phase), f"{what} phase"
    for field in ("tail_k", "tail_v", "tail_gamma"):
        np.testing.assert_allclose(np.asarray(getattr(got, field)),
                                   np.asarray(getattr(want, field)), **(tol or F64_TOL),
                                   err_msg=f"{what} state.{field}")


def check_against_oracle(spec, T, V, seed=0, gamma=True, forms=FORMS):
    args = make_inputs(seed, T, V, spec, gamma)
    params = make_params(seed, spec, V)
    o_ref, base, weights, mom = neural_memory_oracle(**args, params=params, spec=spec)
    c = spec.window
    for impl in forms:
        o, s = run(spec, args, impl, params=params)
        assert o.dtype == jnp.float64 and o.shape == (B, T, H, V), impl
        np.testing.assert_allclose(np.asarray(o), o_ref, **F64_TOL, err_msg=f"o, impl={impl}")
        for field, want in zip(FIELDS, (base, weights, mom)):
            assert_tree_close(getattr(s, field), want, f"state.{field}, impl={impl}")
        assert int(s.phase) == T % spec.memory_chunk, impl
        # The Omega window's history: the last c - 1 tokens (absent ones have gamma 0).
        g = np.ones((B, T, H)) if args["gamma"] is None else args["gamma"]
        g_hist = np.concatenate([np.zeros((B, c - 1, H)), g], axis=1)[:, T:]
        np.testing.assert_allclose(np.asarray(s.tail_gamma), g_hist, **F64_TOL)
        absent = max(0, c - 1 - T)  # the first `absent` slots are before the stream start
        for name, x in (("tail_k", args["k"]), ("tail_v", args["v"])):
            got = np.asarray(getattr(s, name))
            assert got.shape == (B, c - 1, H, x.shape[-1]), name
            np.testing.assert_allclose(got[:, absent:], x[:, T - (c - 1 - absent):],
                                       **F64_TOL, err_msg=f"{name}, impl={impl}")


# ---------------------------------------------------------------------------------------------
# The oracle itself (cheap: checks of the oracle's pieces against hand-derived formulas)
# ---------------------------------------------------------------------------------------------


def _spec(**kw):
    return MemorySpec(**{"huber_delta": 0.7, "lp": 2.5, "memory_chunk": 4, **kw})


def test_oracle_linear_gradients_hand_derived(x64):
    """jax.grad of the oracle's losses vs hand-derived gradients for the linear memory:
    l2 2 r k^T; dot -v k^T; huber clip(r, -d, d) k^T; lp p |r|^(p-1) sign(r) k^T; mean / V."""
    rng = np.random.default_rng(0)
    W, k, v = rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=3)
    r = W @ k - v
    d, p = 0.7, 2.5
    assert (np.abs(r) > d).any() and (np.abs(r) < d).any()
    hand = {
        "l2": linear_l2_gradient(W, k, v),
        "dot": -np.outer(v, k),
        "huber": np.outer(np.clip(r, -d, d), k),
        "lp": np.outer(p * np.abs(r) ** (p - 1) * np.sign(r), k),
    }
    np.testing.assert_allclose(hand["l2"], 2 * np.outer(r, k))
    for (loss, want), reduction in itertools.product(hand.items(), ("sum", "mean")):
        spec = _spec(loss=loss, reduction=reduction)
        got = loss_gradient_fn(spec)({"w": W}, k, v)["w"]
        scale = 1 / 3 if reduction == "mean" else 1
        np.testing.assert_allclose(got, scale * want, rtol=1e-13, atol=1e-14, err_msg=loss)


def test_oracle_linear_l2_is_delta_rule(x64):
    """The oracle (linear, l2, b = c = 1, no momentum, decay 0) == the NumPy delta rule with
    beta = 2 lr, and with decay == the written-out update."""
    spec = _spec(memory_chunk=1, momentum=False)
    args = make_inputs(3, 9, 3, spec)
    args["gamma"] = None
    W0 = make_params(3, spec, 3)["w"]
    o, base, w, _ = neural_memory_oracle(**{**args, "decay": 0 * args["decay"]},
                                         params={"w": W0}, spec=spec)
    o_d, s_d = delta_rule_np(args["q"], args["k"], args["v"], 2 * args["lr"], scale=1.0,
                             initial_state=np.broadcast_to(W0.transpose(0, 2, 1), (B, H, K, 3)))
    np.testing.assert_allclose(o, o_d, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w["w"], s_d.transpose(0, 1, 3, 2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(base["w"], w["w"])  # T % 1 == 0: the next mini-batch's base
    o, _, w, _ = neural_memory_oracle(**args, params={"w": W0}, spec=spec)
    o_w, w_w = linear_l2_decay_np(args["q"], args["k"], args["v"], args["lr"], args["decay"], W0)
    np.testing.assert_allclose(o, o_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w["w"], w_w, rtol=1e-12, atol=1e-12)


def test_oracle_activations_and_networks(x64):
    """Exact GELU and SiLU; the NumPy network (outputs) == the jnp one (differentiated)."""
    x = jnp.linspace(-4.0, 4.0, 41, dtype=jnp.float64)
    np.testing.assert_allclose(activation("gelu", x), jax.nn.gelu(x, approximate=False),
                               rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(activation("silu", x), jax.nn.silu(x), rtol=1e-14, atol=1e-15)
    rng = np.random.default_rng(1)
    for arch, depth, act, residual in [("linear", 2, "gelu", True), ("mlp", 3, "gelu", True),
                                       ("mlp", 2, "silu", False), ("gated_mlp", 2, "gelu", True),
                                       ("gated_mlp", 2, "silu", True)]:
        spec = _spec(architecture=arch, depth=depth, activation=act, residual=residual)
        W = {n: w[0] for n, w in make_params(depth, spec, K).items()}
        xk = rng.normal(size=K)
        np.testing.assert_allclose(apply_np(spec, W, xk), memory_apply(spec, jx(W), jx(xk)),
                                   rtol=1e-13, atol=1e-14, err_msg=f"{arch} {act}")


# ---------------------------------------------------------------------------------------------
# Forward: both forms == the oracle
# ---------------------------------------------------------------------------------------------

ARCHS = (("linear", {}), ("mlp", {"depth": 2}), ("gated_mlp", {}))
LOSSES = ("l2", "dot", "huber", "lp")
OPTIMIZERS = ("gd", "muon")


def product_spec(ai, li, oi):
    """The full product's spec: memory_chunk 4 and, rotating through the product so that every
    architecture meets each setting: window 3 when li + oi is odd (else 1); retrieve "before"
    when ai + li is odd (else "after"); momentum off when ai + li + oi = 2 mod 3; reduction
    "mean" when ai + li = 1 mod 3; SiLU when ai + 2 li + oi = 1 mod 3 (else exact GELU)."""
    arch, extra = ARCHS[ai]
    return _spec(architecture=arch, loss=LOSSES[li], optimizer=OPTIMIZERS[oi],
                 window=3 if (li + oi) % 2 else 1,
                 retrieve="before" if (ai + li) % 2 else "after",
                 momentum=(ai + li + oi) % 3 != 2,
                 reduction="mean" if (ai + li) % 3 == 1 else "sum",
                 activation="silu" if (ai + 2 * li + oi) % 3 == 1 else "gelu", **extra)


def spec_id(spec):
    act = "" if spec.architecture == "linear" else f"-{spec.activation}"
    return (f"{spec.architecture}-{spec.loss}-{spec.optimizer}-c{spec.window}-{spec.retrieve}"
            f"-{'mom' if spec.momentum else 'nomom'}-{spec.reduction}{act}")


# Muon on the MLP memories is the slowest third of the product: `make test` keeps it in EXTRA's
# two Muon MLP cases and leaves these eight to `make test-slow`. The other MLP cases run in `make
# test-extended`, the linear memory's in `make test` (EXTRA covers each MLP architecture there).
PRODUCT = [
    pytest.param(ai, li, oi, id=spec_id(product_spec(ai, li, oi)),
                 marks=[pytest.mark.slow] if ai and OPTIMIZERS[oi] == "muon"
                 else [pytest.mark.extended] if ai else [])
    for ai, li, oi in itertools.product(range(3), range(4), range(2))
]


@pytest.mark.parametrize("ai, li, oi", PRODUCT)
def test_forms_match_oracle_product_f64(x64, ai, li, oi):
    """memory_chunk 4, T = 11 (3 mini-batches, the last one short), momentum, decay."""
    spec = product_spec(ai, li, oi)
    check_against_oracle(spec, 11, K, seed=ai * 8 + li * 2 + oi)


EXTRA = [
    # (id, spec fields, T, V, gamma given)
    ("b1-T7-mlp-huber-muon-c3-before",
     dict(architecture="mlp", loss="huber", optimizer="muon", memory_chunk=1, window=3,
          retrieve="before"), 7, K, True),
    ("b16-T13-gated-lp-gd-c3-nomom-mean-silu",
     dict(architecture="gated_mlp", loss="lp", memory_chunk=16, window=3, momentum=False,
          reduction="mean", activation="silu"), 13, K, True),
    ("b5-T13-mlp3-dot-muon-c2-before",
     dict(architecture="mlp", depth=3, loss="dot", optimizer="muon", memory_chunk=5, window=2,
          retrieve="before"), 13, K, True),
    ("b4-T11-linear-V3-l2-gd-c6", dict(loss="l2", window=6), 11, 3, True),
    ("b3-T11-mlp-noresidual-V3-l2-gd-c2-silu-gammaNone",
     dict(architecture="mlp", residual=False, activation="silu", memory_chunk=3, window=2),
     11, 3, False),
]


@pytest.mark.parametrize("fields, T, V, gamma", [pytest.param(*c[1:], id=c[0]) for c in EXTRA])
def test_forms_match_oracle_extra_f64(x64, fields, T, V, gamma):
    check_against_oracle(_spec(**fields), T, V, seed=T + V, gamma=gamma)


@pytest.mark.parametrize("fields", [
    pytest.param(dict(memory_chunk=4, window=3, retrieve="before"), id="c3-b4-before"),
    pytest.param(dict(memory_chunk=1, window=4, loss="huber"), id="c4-b1-huber"),
])
def test_muon_on_a_far_from_square_memory_matches_oracle_f64(x64, monkeypatch, fields):
    """A linear Muon memory of [8 x 32] takes newton_schulz's Gram-space iteration (m >= 8,
    n >= 3 m), which ATLAS's polynomial-feature memories ([16 x 273]) run; the other cases'
    K = 4 memories do not reach it."""
    monkeypatch.setattr(sys.modules[__name__], "K", 32)
    spec = _spec(architecture="linear", optimizer="muon", **fields)
    check_against_oracle(spec, 9, 8, seed=17)


# ---------------------------------------------------------------------------------------------
# Gradients: chunk form == reference form
# ---------------------------------------------------------------------------------------------

GRAD_CASES = [
    pytest.param(dict(loss="l2", window=3), id="linear-l2-gd-c3"),
    pytest.param(dict(architecture="mlp", loss="huber", optimizer="muon"), id="mlp-huber-muon"),
    pytest.param(dict(architecture="gated_mlp", loss="lp", retrieve="before", window=2,
                      memory_chunk=3), id="gated-lp-gd-before-b3-c2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("fields", GRAD_CASES)
def test_gradients_chunk_match_reference_f64(x64, fields):
    """d/d(q, k, v, lr, decay, momentum, gamma, params) of sum(o wo) + sum over the final
    weights and momentum leaves of (leaf w_leaf): chunk == reference, all finite."""
    spec, T, V = _spec(**fields), 11, K
    args = jx(make_inputs(7, T, V, spec))
    params = jx(make_params(7, spec, V))
    rng = np.random.default_rng(8)
    wo = jnp.asarray(rng.normal(size=(B, T, H, V)))
    ws = {f: {n: jnp.asarray(rng.normal(size=(B, *w.shape))) for n, w in params.items()}
          for f in ("weights", "momentum")}

    def objective(diff, impl):
        o, s = neural_memory(diff["q"], diff["k"], diff["v"], diff["lr"], diff["decay"],
                             diff["momentum"], diff["gamma"], spec=spec, params=diff["params"],
                             impl=impl)
        out = jnp.sum(o * wo)
        for f in ("weights", "momentum"):
            out += sum(jnp.sum(getattr(s, f)[n] * ws[f][n]) for n in params)
        return out

    diff = {**args, "params": params}
    want = jax.jit(jax.grad(lambda d: objective(d, "reference")))(diff)
    got = jax.jit(jax.grad(lambda d: objective(d, "chunk")))(diff)
    for name in diff:
        got_leaves = jax.tree_util.tree_flatten_with_path(got[name])[0]
        want_leaves = jax.tree_util.tree_flatten_with_path(want[name])[0]
        for (path, g_got), (_, g_want) in zip(got_leaves, want_leaves, strict=True):
            what = f"d{name}{jax.tree_util.keystr(path)}"
            g_got, g_want = np.asarray(g_got), np.asarray(g_want)
            assert np.isfinite(g_want).all() and np.isfinite(g_got).all(), what
            assert np.abs(g_want).max() > 0, f"{what} is all zero"
            np.testing.assert_allclose(g_got, g_want, rtol=GRAD_TOL,
                                       atol=GRAD_TOL * np.abs(g_want).max(), err_msg=what)


# ---------------------------------------------------------------------------------------------
# Degenerate equalities
# ---------------------------------------------------------------------------------------------


def test_linear_l2_online_gd_is_delta_rule_f64(x64):
    """Linear, l2 sum, no momentum, b = c = 1, retrieve after: decay 0 is the delta rule with
    beta = 2 lr and S_0 = W_0^T; with decay, W_t = (1 - a_t) W_{t-1} - 2 lr_t (W_{t-1} k_t - v_t)
    k_t^T, o_t = W_t q_t. And for gd with c = 1, gamma is a factor on lr; gamma None == ones."""
    spec, T, V = _spec(memory_chunk=1, momentum=False), 9, 3
    args = make_inputs(11, T, V, spec, gamma=True)
    W0 = make_params(11, spec, V)["w"]
    ones = np.ones((B, T, H))
    no_decay = {**args, "decay": 0 * args["decay"], "gamma": ones}
    h0 = jnp.asarray(np.broadcast_to(W0.transpose(0, 2, 1), (B, H, K, V)))
    a = jx(no_decay)
    o_d, s_d = delta_rule(a["q"], a["k"], a["v"], 2 * a["lr"], initial_state=h0, scale=1.0,
                          impl="reference")
    o_w, w_w = linear_l2_decay_np(args["q"], args["k"], args["v"], args["lr"], args["decay"], W0)
    for impl in FORMS:
        o, s = run(spec, no_decay, impl, params={"w": W0})
        np.testing.assert_allclose(np.asarray(o), np.asarray(o_d), **F64_TOL, err_msg=impl)
        np.testing.assert_allclose(np.asarray(s.weights["w"]),
                                   np.asarray(s_d).transpose(0, 1, 3, 2), **F64_TOL,
                                   err_msg=impl)
        o, s = run(spec, {**args, "gamma": ones}, impl, params={"w": W0})
        np.testing.assert_allclose(np.asarray(o), o_w, **F64_TOL, err_msg=impl)
        np.testing.assert_allclose(np.asarray(s.weights["w"]), w_w, **F64_TOL, err_msg=impl)
        # gamma multiplies lr (gd, c = 1); None means ones.
        o_g, s_g = run(spec, args, impl, params={"w": W0})
        scaled = {**args, "lr": args["lr"] * args["gamma"]}
        o_l, s_l = run(spec, {**scaled, "gamma": ones}, impl, params={"w": W0})
        o_n, s_n = run(spec, {**scaled, "gamma": None}, impl, params={"w": W0})
        for o2, s2 in ((o_l, s_l), (o_n, s_n)):
            np.testing.assert_allclose(np.asarray(o2), np.asarray(o_g), **F64_TOL)
            assert_tree_close(s2.weights, s_g.weights, f"gamma as lr factor, {impl}")


def test_window_of_sparse_gammas_equals_repeated_tokens_f64(x64):
    """c = 3 with gamma nonzero only on tokens j in {1, 4, 7, 10} (>= 3 apart, so no two share a
    window) == c = 1 where tokens j + 1, j + 2 carry token j's (k, v, gamma): both give
    G_t = gamma_j grad loss_j(Wbar_t) for t in j..j+2 (and 0 at t = 0). memory_chunk 4: the
    windows of tokens 7 and 10 cross mini-batch boundaries."""
    T, V = 11, K
    spec3 = product_spec(1, 3, 0)  # mlp, lp, gd, window 3 (shares the product's compilation)
    assert spec3.window == 3 and spec3.memory_chunk == 4
    spec1 = dataclasses.replace(spec3, window=1)
    args = make_inputs(12, T, V, spec3)
    params = make_params(12, spec3, V)
    sparse = np.zeros((B, T, H))
    repeated = {n: args[n].copy() for n in ("k", "v")}
    rep_gamma = np.zeros((B, T, H))
    for j in (1, 4, 7, 10):
        sparse[:, j] = args["gamma"][:, j]
        for t in range(j, min(j + 3, T)):
            rep_gamma[:, t] = args["gamma"][:, j]
            for n in ("k", "v"):
                repeated[n][:, t] = args[n][:, j]
    for impl in FORMS:
        o3, s3 = run(spec3, {**args, "gamma": sparse}, impl, params=params)
        o1, s1 = run(spec1, {**args, **repeated, "gamma": rep_gamma}, impl, params=params)
        np.testing.assert_allclose(np.asarray(o1), np.asarray(o3), **F64_TOL, err_msg=impl)
        for field in FIELDS:
            assert_tree_close(getattr(s1, field), getattr(s3, field), f"{field}, {impl}")


# ---------------------------------------------------------------------------------------------
# Split-and-resume, prefill-then-decode
# ---------------------------------------------------------------------------------------------

# (spec, [(T1, form of the first part, form of the rest)]): memory_chunk 4, window 3, T = 11,
# specs of the product (whole runs share its compilation). T1 = 1 leaves the window's history
# part absent; 5 and 6 split the second mini-batch inside the window.
MIXED = ("chunk", "reference")
RESUME_CASES = [
    pytest.param(product_spec(1, 3, 0),
                 [(1, *MIXED), (5, "chunk", "chunk"),
                  (6, "reference", "reference"), (6, "chunk", "chunk"), (6, *MIXED)],
                 id="mlp-lp-gd-c3-after"),
    pytest.param(product_spec(1, 2, 1), [(6, "chunk", "chunk"), (6, *MIXED)],
                 id="mlp-huber-muon-c3-before"),
]


@pytest.mark.parametrize("spec, splits", RESUME_CASES)
def test_split_and_resume_f64(x64, spec, splits):
    """Whole == first T1 tokens then the rest from the returned state, for both forms and with
    the forms mixed (first part chunk, second part reference)."""
    assert spec.window == 3 and spec.memory_chunk == 4 and spec.momentum
    T, V = 11, K
    args = make_inputs(13, T, V, spec)
    params = make_params(13, spec, V)
    whole = {impl: run(spec, args, impl, params=params) for impl in FORMS}
    for T1, first, second in splits:
        o1, s1 = run(spec, sliced(args, 0, T1), first, params=params)
        assert int(s1.phase) == T1 % spec.memory_chunk
        o2, s2 = run(spec, sliced(args, T1, T), second, initial_state=s1)
        o_w, s_w = whole[second]
        what = f"T1={T1} {first}->{second}"
        np.testing.assert_allclose(np.concatenate([o1, o2], axis=1), np.asarray(o_w),
                                   **F64_TOL, err_msg=what)
        assert_states_close(s2, s_w, what)


@pytest.mark.parametrize("spec, splits", RESUME_CASES)
def test_prefill_then_decode_f64(x64, spec, splits):
    """The sequence form on the first 6 tokens, then neural_memory_step token by token, equals
    the chunk form over the whole sequence (outputs and final state; in the first case also the
    state after 10 tokens)."""
    T, V, T1 = 11, K, 6
    args = make_inputs(13, T, V, spec)
    params = make_params(13, spec, V)
    o_w, s_w = run(spec, args, "chunk", params=params)
    o1, state = run(spec, sliced(args, 0, T1), "chunk", params=params)
    a = jx(args)
    outs = [np.asarray(o1)]
    for t in range(T1, T):
        tok = {n: None if x is None else x[:, t] for n, x in a.items()}
        o_t, state = neural_memory_step(tok["q"], tok["k"], tok["v"], tok["lr"], tok["decay"],
                                        tok["momentum"], tok["gamma"], state, spec=spec)
        assert o_t.shape == (B, H, V)
        outs.append(np.asarray(o_t)[:, None])
        if t + 1 == 10 and splits[0][0] == 1:  # reference over 10 tokens is compiled already
            _, s_mid = run(spec, sliced(args, 0, 10), "reference", params=params)
            assert_states_close(state, s_mid, "after 10 tokens")
    np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(o_w), **F64_TOL)
    assert_states_close(state, s_w, "decoded")


# ---------------------------------------------------------------------------------------------
# Newton-Schulz
# ---------------------------------------------------------------------------------------------


# (8, 24), (2, 16, 60) and (40, 8) are far from square: they take the Gram-space iteration.
@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (6, 2), (2, 3, 5), (8, 24), (2, 16, 60), (40, 8)],
                         ids=str)
def test_newton_schulz_matches_oracle_f64(x64, shape):
    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    X = rng.normal(size=shape) * 3.0
    for steps in (5, 2):
        got = np.asarray(newton_schulz(jnp.asarray(X), steps=steps))
        assert got.shape == shape
        flat = X.reshape(-1, *shape[-2:])
        want = np.stack([newton_schulz_oracle(x, steps) for x in flat]).reshape(shape)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"steps={steps}")


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (2, 6, 20)], ids=str)
def test_newton_schulz_factor_from_the_gram_matrix_alone_matches_oracle_f64(x64, shape):
    """F from G = X X^T with NS(X) = F X: the chunk form's Muon (wide X; 5 steps run in two
    blocks, 2 in one). A zero matrix gives F X = 0, not NaN."""
    rng = np.random.default_rng(shape[-1])
    X = rng.normal(size=shape) * 3.0
    flat = X.reshape(-1, *shape[-2:])
    for steps in (5, 2):
        F = newton_schulz_factor(jnp.asarray(X @ np.swapaxes(X, -1, -2)), steps=steps)
        assert F.shape == (*shape[:-1], shape[-2])
        want = np.stack([newton_schulz_oracle(x, steps) for x in flat]).reshape(shape)
        np.testing.assert_allclose(np.asarray(F) @ X, want, rtol=1e-11, atol=1e-11,
                                   err_msg=f"steps={steps}")
    zero = np.zeros(shape[-2:])
    assert not np.any(np.asarray(newton_schulz_factor(jnp.asarray(zero @ zero.T))) @ zero)


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (8, 3)], ids=str)
def test_newton_schulz_near_orthogonal_f64(x64, shape):
    """For singular values of X / ||X||_F >= 0.01, the 5-step quintic gives singular values in
    [0.68, 1.14] (the scalar map a s + b s^3 + c s^5 iterated 5 times); asserted band [0.65,
    1.15], which the input itself (condition number 10) does not pass."""
    rng = np.random.default_rng(sum(shape))
    m, n = shape
    r = min(m, n)
    U, _ = np.linalg.qr(rng.normal(size=(m, r)))
    Vt, _ = np.linalg.qr(rng.normal(size=(n, r)))
    s = np.geomspace(5.0, 0.5, r)  # condition number 10
    X = U @ np.diag(s) @ Vt.T
    sv_in = np.linalg.svd(X / np.linalg.norm(X), compute_uv=False)
    assert not ((sv_in >= 0.65) & (sv_in <= 1.15)).all()
    assert sv_in.min() >= 0.01
    Y = np.asarray(newton_schulz(jnp.asarray(X)))
    sv = np.linalg.svd(Y, compute_uv=False)
    assert ((sv >= 0.65) & (sv <= 1.15)).all(), sv
    # Same singular vectors: Y = U diag(f(s)) V^T.
    np.testing.assert_allclose(U.T @ Y @ Vt, np.diag(np.diag(U.T @ Y @ Vt)), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# T = 0, parameters, bad inputs
# ---------------------------------------------------------------------------------------------


def test_empty_sequence_returns_initial_state_f64(x64):
    spec = product_spec(2, 0, 1)  # gated_mlp, l2, muon, window 3
    params = make_params(14, spec, K)
    args = make_inputs(14, 0, K, spec)
    for impl in FORMS:
        o, s = run(spec, args, impl, params=params)
        assert o.shape == (B, 0, H, K) and o.dtype == jnp.float64
        want = initial_memory_state(jx(params), B, spec, K, K, jnp.float64)
        assert_states_close(s, want, f"T=0 from params, {impl}")
        for n, w in params.items():
            np.testing.assert_array_equal(np.asarray(s.weights[n]),
                                          np.broadcast_to(w, (B, *w.shape)))
            np.testing.assert_array_equal(np.asarray(s.base[n]),
                                          np.broadcast_to(w, (B, *w.shape)))
            assert not np.asarray(s.momentum[n]).any()
        assert int(s.phase) == 0 and not np.asarray(s.tail_gamma).any()
        # From a mid-stream state: returned unchanged.
        _, mid = run(spec, make_inputs(15, 11, K, spec), impl, params=params)
        o, s = run(spec, args, impl, initial_state=mid)
        assert o.shape == (B, 0, H, K)
        assert_states_close(s, mid, f"T=0 from a state, {impl}", rtol=0, atol=0)


@pytest.mark.parametrize("arch, depth", [("linear", 2), ("mlp", 2), ("mlp", 3),
                                         ("gated_mlp", 2)])
def test_init_memory_params_layout(arch, depth):
    spec = MemorySpec(architecture=arch, depth=depth, expansion=2)
    V = K if arch != "linear" else 3
    params = init_memory_params(jax.random.PRNGKey(0), spec, H, K, V)
    want = param_shapes(spec, K, V)
    assert set(params) == set(want)
    for n, (o, i) in want.items():
        assert params[n].shape == (H, o, i), n


def _bad_call(change):
    spec = _spec()
    args = make_inputs(16, 3, K, spec)
    call = dict(args=args, spec=spec, params=make_params(16, spec, K), initial_state=None)
    change(call)
    run(call["spec"], call["args"], "reference", params=call["params"],
        initial_state=call["initial_state"])


def _state(call):
    return initial_memory_state(jx(call["params"]), B, call["spec"], K, K, jnp.float64)


BAD_CALLS = [
    pytest.param(lambda c: c["args"].update(v=c["args"]["v"][:, :2]), r"\bv\b", id="v-T"),
    pytest.param(lambda c: c["args"].update(v=c["args"]["v"][:, :, :1]), r"\bv\b", id="v-H"),
    pytest.param(lambda c: c["args"].update(momentum=None), "momentum", id="no-momentum"),
    pytest.param(lambda c: c.update(initial_state=_state(c)), "params.*initial_state",
                 id="params-and-state"),
    pytest.param(lambda c: c.update(params=None), "params.*initial_state", id="neither"),
    pytest.param(lambda c: c.update(spec=_spec(architecture="mlp"),
                                    params=make_params(16, _spec(architecture="mlp"), 3),
                                    args={**c["args"], "v": c["args"]["v"][..., :3]}),
                 "K == V|residual", id="residual-K!=V"),
]


@pytest.mark.parametrize("change, message", BAD_CALLS)
def test_bad_inputs(x64, change, message):
    with pytest.raises(ValueError, match=message):
        _bad_call(change)


@pytest.mark.parametrize("field, value", [("architecture", "transformer"), ("loss", "l1"),
                                          ("optimizer", "adam"), ("reduction", "max"),
                                          ("retrieve", "during")])
def test_bad_spec_raises_at_construction(field, value):
    with pytest.raises(ValueError, match=field):
        MemorySpec(**{field: value})


def test_residual_needs_k_equals_v():
    spec = MemorySpec(architecture="gated_mlp", residual=True)
    with pytest.raises(ValueError, match="K == V"):
        init_memory_params(jax.random.PRNGKey(0), spec, H, K, 3)
    init_memory_params(jax.random.PRNGKey(0), MemorySpec(architecture="gated_mlp",
                                                         residual=False), H, K, 3)


def test_state_type_is_memory_state(x64):
    spec = _spec(momentum=False)
    state = initial_memory_state(jx(make_params(0, spec, K)), B, spec, K, K, jnp.float64)
    assert isinstance(state, MemoryState)
