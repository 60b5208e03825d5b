"""Tests for the diagonal-SSM mixers (memjax.layers.s4d, memjax.layers.s5).

The operator numerics are covered in tests/ops/test_diagonal_ssm.py; here: forms agree through
the layer, carried state (prefill pieces and one-token steps) equals one pass, the cache size
against its formula, and the initialisation (eigenvalues, projections of B and C)
against HiPPO-LegS built here from its defining equations. Tiny float32 shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.layers import build_mixer
from memjax.layers.cache import cache_bytes

FLOAT32_BYTES = 4

D = 16
F32_TOL = dict(rtol=2e-5, atol=2e-5)


def hippo_legs_normal_eigenvalues(n):
    """Eigenvalues of S = A + P P^T for HiPPO-LegS, written from the equations:
    A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k); P_n = sqrt(n + 1/2)."""
    q = np.sqrt(2 * np.arange(n) + 1.0)
    A = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(n) + 1.0)
    P = np.sqrt(np.arange(n) + 0.5)
    return np.linalg.eigvals(A + np.outer(P, P))


def build(name, **options):
    return build_mixer(D, {"name": name, **options})


def init(layer, T=12, seed=0):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, T, D)), jnp.float32)
    return layer.init(jax.random.key(seed), x)["params"], x


def eigenvalues(params):
    return -np.exp(np.asarray(params["log_neg_re"], np.float64)) + 1j * np.asarray(params["im"])


def as_complex(pair):
    pair = np.asarray(pair, np.float64)
    return pair[..., 0] + 1j * pair[..., 1]


@pytest.mark.parametrize("init_kind", ["lin", "legs"])
def test_s4d_conv_scan_reference_agree(init_kind):
    layer = build("s4d", state_dim=8, lambda_init=init_kind)
    params, x = init(layer, T=13)
    y_conv = layer.apply({"params": params}, x)
    for impl in ("scan", "reference"):
        y = build("s4d", state_dim=8, lambda_init=init_kind, impl=impl).apply({"params": params}, x)
        np.testing.assert_allclose(y, y_conv, err_msg=impl, **F32_TOL)
    assert np.abs(np.asarray(y_conv)).max() > 1e-2  # not vacuous


def test_s5_forms_agree():
    layer = build("s5", state_dim=8)
    params, x = init(layer, T=13)
    y = layer.apply({"params": params}, x)
    for impl in ("chunk", "reference"):
        other = build("s5", state_dim=8, impl=impl, chunk_size=4).apply({"params": params}, x)
        np.testing.assert_allclose(other, y, err_msg=impl, **F32_TOL)
    assert np.abs(np.asarray(y)).max() > 1e-2


@pytest.mark.parametrize("name, options", [
    ("s4d", {"lambda_init": "lin"}),
    ("s4d", {"lambda_init": "legs", "impl": "scan"}),
    ("s5", {}),
    ("s5", {"conj_sym": False, "impl": "chunk", "chunk_size": 4}),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={o}" for k, o in v.items()))
def test_split_and_resume_equals_whole(name, options):
    """Pieces of 5, 1 (the one-token step path) and 6 tokens, carrying the cache."""
    layer = build(name, state_dim=8, **options)
    params, x = init(layer)
    whole = layer.apply({"params": params}, x)
    cache = layer.init_cache(2, x.shape[1])
    pieces = []
    for start, stop in ((0, 5), (5, 6), (6, 12)):
        y, cache = layer.apply({"params": params}, x[:, start:stop], cache=cache)
        pieces.append(y)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, **F32_TOL)
    assert cache["state"].dtype == jnp.complex64


@pytest.mark.parametrize("name, options, expected", [
    ("s4d", {"state_dim": 8}, D * 4 * 2 * FLOAT32_BYTES),  # H channels x 4 complex modes
    ("s4d", {"state_dim": 64}, D * 32 * 2 * FLOAT32_BYTES),
    ("s5", {"state_dim": 8}, 4 * 2 * FLOAT32_BYTES),  # 4 shared complex modes
    ("s5", {"state_dim": 8, "conj_sym": False}, 8 * 2 * FLOAT32_BYTES),
])
def test_state_size_formula_matches_cache(name, options, expected):
    layer = build(name, **options)
    assert cache_bytes(layer, 100) == expected


def test_s4d_init_eigenvalues():
    lin, _ = init(build("s4d", state_dim=8, lambda_init="lin"))
    np.testing.assert_allclose(eigenvalues(lin), np.broadcast_to(-0.5 + 1j * np.pi * np.arange(4),
                                                                 (D, 4)), rtol=1e-6, atol=1e-6)
    legs, _ = init(build("s4d", state_dim=8, lambda_init="legs"))
    lam = eigenvalues(legs)
    assert lam.shape == (D, 4) and np.all(lam.real < 0)
    # One member of each conjugate pair of HiPPO-LegS's normal part (all with Re = -1/2).
    want = hippo_legs_normal_eigenvalues(8)
    want = np.sort(want[want.imag > 0].imag)
    np.testing.assert_allclose(np.sort(lam[0].imag), want, rtol=1e-5)
    np.testing.assert_allclose(lam.real, -0.5, rtol=1e-5)
    # log dt in [log 1e-3, log 1e-1]; B = 1; D = 1.
    assert np.all((legs["log_dt"] >= np.log(1e-3)) & (legs["log_dt"] <= np.log(1e-1)))
    np.testing.assert_array_equal(as_complex(legs["B"]), 1.0)
    np.testing.assert_array_equal(legs["D"], 1.0)


def test_s5_init_eigenvalues_and_projections():
    P = 8
    half, _ = init(build("s5", state_dim=P))
    full, _ = init(build("s5", state_dim=P, conj_sym=False))
    want = hippo_legs_normal_eigenvalues(P)
    for params, modes in ((half, P // 2), (full, P)):
        lam = eigenvalues(params)
        assert lam.shape == (modes,) and np.all(lam.real < 0)
    by_imag = lambda z: z[np.argsort(z.imag)]
    np.testing.assert_allclose(by_imag(eigenvalues(full)), by_imag(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sort(eigenvalues(half).imag), np.sort(want.imag[want.imag > 0]),
                               rtol=1e-5)
    # B~ = V^-1 B and C~ = C V with B, C real: C~ diag(Lambda^l) B~ = C S^l B is real whatever
    # the eigenvectors' phases, and with conjugate symmetry 2 Re of the half-mode product equals
    # it (the same keys draw the same real B, C).
    for l in range(3):
        m_full = markov(full, l)
        assert np.abs(m_full.imag).max() < 1e-5 * np.abs(m_full).max(), l
        np.testing.assert_allclose(2 * markov(half, l).real, m_full.real, rtol=1e-4,
                                   atol=1e-5 * np.abs(m_full).max())
    # C B: [H, H] with B lecun normal (fan_in H) and C lecun normal (fan_in P).
    np.testing.assert_allclose(markov(full, 0).real.std(), D**-0.5, rtol=0.3)


def markov(params, l):
    """``C~ diag(Lambda^l) B~`` ([H, H]) from the layer's parameters."""
    return (as_complex(params["C"]) * eigenvalues(params) ** l) @ as_complex(params["B"])


def test_bad_options_raise():
    with pytest.raises(ValueError, match="state_dim must be an even int"):
        init(build("s4d", state_dim=7))
    with pytest.raises(ValueError, match="unknown init"):
        init(build("s4d", state_dim=8, lambda_init="legt"))
    with pytest.raises(ValueError, match="state_dim must be an even int"):
        cache_bytes(build("s5", state_dim=5), 1)
