"""memjax.hippo: transition matrices, NPLR form, discretisation, online projection.

Golden values are written out by hand below; the references (exact ZOH projection of a step
function, matrix exponentials, quadrature) are computed here, not by the code under test.
"""

import itertools

import numpy as np
import pytest
from numpy.polynomial import laguerre, legendre
from scipy.linalg import expm

from memjax import hippo

R2, R3, R5, R15 = np.sqrt(2), np.sqrt(3), np.sqrt(5), np.sqrt(15)
PI2 = 2 * np.pi

GOLDEN = {  # measure -> (A, B) for n = 3, theta = 1, the paper's positive convention
    "legs": ([[1, 0, 0], [R3, 2, 0], [R5, R15, 3]], [1, R3, R5]),
    "legt": ([[1, -R3, R5], [R3, 3, -R15], [R5, R15, 5]], [1, R3, R5]),
    "lmu": ([[1, 1, 1], [-3, 3, 3], [5, -5, 5]], [1, -3, 5]),
    "lagt": ([[1, 0, 0], [1, 1, 0], [1, 1, 1]], [1, 1, 1]),
    "fout": ([[1, R2, 0], [R2, 2, -PI2], [0, PI2, 0]], [1, R2, 0]),
}


@pytest.mark.parametrize("measure", sorted(GOLDEN))
def test_transition_golden_n3(measure):
    A, B = hippo.transition(measure, 3)
    np.testing.assert_allclose(A, GOLDEN[measure][0], atol=1e-14)
    np.testing.assert_allclose(B, GOLDEN[measure][1], atol=1e-14)
    assert A.dtype == np.float64 and A.shape == (3, 3) and B.shape == (3,)


def test_transition_golden_n4_and_theta():
    A, B = hippo.transition("legs", 4)
    np.testing.assert_allclose(A[3], [np.sqrt(7), np.sqrt(21), np.sqrt(35), 4], atol=1e-14)
    np.testing.assert_allclose(B, [1, R3, R5, np.sqrt(7)], atol=1e-14)
    A, B = hippo.transition("fout", 4)  # the trailing cosine (index 3) has no sine partner
    e = np.array([1, R2, 0, R2])
    K = np.zeros((4, 4))
    K[1, 2], K[2, 1] = -PI2, PI2
    np.testing.assert_allclose(A, np.outer(e, e) + K, atol=1e-14)
    for measure in ("legt", "lmu", "lagt", "fout"):  # windows of length theta: A, B scale 1/theta
        A1, B1 = hippo.transition(measure, 5)
        A2, B2 = hippo.transition(measure, 5, theta=2.5)
        np.testing.assert_allclose(A2, A1 / 2.5, atol=1e-14)
        np.testing.assert_allclose(B2, B1 / 2.5, atol=1e-14)
    np.testing.assert_array_equal(hippo.transition("legs", 5, theta=3.0)[0], hippo.transition("legs", 5)[0])


def test_lmu_is_legt_rescaled():
    n = 6
    D = np.diag((-1.0) ** np.arange(n) * np.sqrt(2 * np.arange(n) + 1))
    A_t, B_t = hippo.transition("legt", n)
    A_l, B_l = hippo.transition("lmu", n)
    np.testing.assert_allclose(A_l, D @ A_t @ np.linalg.inv(D), atol=1e-12)
    np.testing.assert_allclose(B_l, D @ B_t, atol=1e-12)


@pytest.mark.parametrize("measure, rank, real_part", [
    ("legs", 1, -0.5), ("legs", 3, -0.5), ("legt", 2, 0.0), ("lagt", 1, -0.5), ("fout", 1, 0.0)])
@pytest.mark.parametrize("n", [1, 4, 9])
def test_nplr_reconstructs_A(measure, rank, real_part, n):
    w, P, B, V = hippo.nplr(measure, n, rank)
    assert w.shape == (n,) and P.shape == (rank, n) and B.shape == (n,) and V.shape == (n, n)
    assert all(a.dtype == np.complex128 for a in (w, P, B, V))
    A, B0 = hippo.transition(measure, n)
    np.testing.assert_allclose(V.conj().T @ V, np.eye(n), atol=1e-12)
    # The identity: -A = V (diag(w) - P^T conj(P)) V^*, with P and B in the eigenbasis.
    np.testing.assert_allclose(V @ (np.diag(w) - P.T @ P.conj()) @ V.conj().T, -A, atol=1e-11)
    np.testing.assert_allclose(V @ B, B0, atol=1e-12)
    np.testing.assert_allclose(w.real, real_part, atol=1e-12)


def test_nplr_legs_matches_hand_written_normal_part():
    n = 8
    q = np.sqrt(2 * np.arange(n) + 1.0)
    M = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(n) + 1.0)  # -A for LegS
    p = np.sqrt(np.arange(n) + 0.5)
    want = np.linalg.eigvals(M + np.outer(p, p))
    w = hippo.nplr("legs", n)[0]
    by_imag = lambda z: z[np.argsort(z.imag)]  # the real parts tie (all -1/2)
    np.testing.assert_allclose(by_imag(w), by_imag(want), atol=1e-10)
    lam, Bt, V = hippo.dplr("legs", n)
    np.testing.assert_allclose(lam, w, atol=1e-14)
    np.testing.assert_allclose(V @ Bt, q, atol=1e-12)


def test_nplr_errors():
    with pytest.raises(ValueError, match="rank >= 2"):
        hippo.nplr("legt", 4)
    with pytest.raises(ValueError, match="lmu"):
        hippo.nplr("lmu", 4, rank=2)
    with pytest.raises(ValueError, match="rank"):
        hippo.nplr("legs", 4, rank=0)
    with pytest.raises(ValueError, match="unknown HiPPO measure 'legx'.*legs"):
        hippo.nplr("legx", 4)


def test_transition_errors():
    with pytest.raises(ValueError, match="unknown HiPPO measure 'foo'; known measures: legs, legt, lmu, lagt, fout"):
        hippo.transition("foo", 3)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="order n"):
            hippo.transition("legs", bad)
    with pytest.raises(ValueError, match="theta"):
        hippo.transition("legt", 3, theta=0.0)


# ------------------------------------------------------------------------------- discretisation

def stable_matrix(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n)) / np.sqrt(n) - 1.5 * np.eye(n)


@pytest.mark.parametrize("method, order", [
    ("forward_euler", 1), ("backward_euler", 1), ("bilinear", 2), ("zoh", 12)])
def test_discretize_matches_expm_to_its_order(method, order):
    A, B = stable_matrix(5), np.arange(1.0, 6.0)
    errs = []
    for dt in (1e-2, 5e-3):
        Ad, Bd = hippo.discretize(A, B, dt, method)
        errs.append(np.abs(Ad - expm(dt * A)).max())
        # Bd -> int_0^dt exp(sA) B ds = A^-1 (exp(dt A) - I) B, the same order as Ad.
        np.testing.assert_allclose(Bd, np.linalg.solve(A, (expm(dt * A) - np.eye(5)) @ B),
                                   atol=10 * dt ** (order + 1))
    if order < 12:  # local error O(dt^(order+1)): halving dt divides it by 2^(order+1)
        assert errs[0] / errs[1] == pytest.approx(2 ** (order + 1), rel=0.1)
    else:
        assert max(errs) < 1e-14


def test_euler_forms_agree_to_first_order():
    A, B = stable_matrix(4, seed=1), np.ones(4)
    gaps = []
    for dt in (1e-2, 5e-3):
        gaps.append(np.abs(hippo.discretize(A, B, dt, "forward_euler")[0]
                           - hippo.discretize(A, B, dt, "backward_euler")[0]).max())
    assert gaps[0] < 1e-3 and gaps[0] / gaps[1] == pytest.approx(4, rel=0.1)


def test_zoh_is_exact_for_constant_input():
    """x(dt) for constant u, from a series (valid for singular A: FouT's -A has a zero eigenvalue)."""
    A, B = hippo.transition("fout", 5)
    M, dt, u = -A, 0.05, 0.7
    x0 = np.linspace(-1, 1, 5)
    phi = sum(np.linalg.matrix_power(dt * M, j) / np.prod(np.arange(1.0, j + 2)) for j in range(30))
    want = expm(dt * M) @ x0 + dt * phi @ B * u
    Ad, Bd = hippo.discretize(M, B, dt, "zoh")
    np.testing.assert_allclose(Ad @ x0 + Bd * u, want, atol=1e-13)


@pytest.mark.parametrize("method", hippo.DISCRETIZATIONS)
def test_diagonal_equals_dense(method):
    a = np.array([-0.5 + 3j, -1.0 - 0.2j, 0.0, -2.0 + 0j])
    B = np.array([1.0, 2.0 - 1j, 0.5, -1.0])
    Ad, Bd = hippo.discretize(a, B, 0.1, method)
    Ad_dense, Bd_dense = hippo.discretize(np.diag(a), B, 0.1, method)
    np.testing.assert_allclose(Ad, np.diag(Ad_dense), atol=1e-13)
    np.testing.assert_allclose(Bd, Bd_dense, atol=1e-13)
    if method == "zoh":
        assert Bd[2] == pytest.approx(0.1 * 0.5)  # a = 0: (exp(dt a) - 1)/a -> dt


def test_discretize_errors():
    with pytest.raises(ValueError, match="unknown discretization 'rk4'.*zoh"):
        hippo.discretize(np.eye(2), np.ones(2), 0.1, "rk4")
    with pytest.raises(ValueError, match="B must have shape"):
        hippo.discretize(np.eye(2), np.ones(3), 0.1, "zoh")
    with pytest.raises(ValueError, match="square"):
        hippo.discretize(np.ones((2, 3)), np.ones(2), 0.1, "zoh")


# ----------------------------------------------------------------------------- online projection

def smooth_signal(s):
    return np.sin(PI2 * 2 * s) * np.sin(np.pi * s / 2) ** 2 + 0.3 * np.cos(PI2 * 3.3 * s) * (1 - np.exp(-5 * s))


@pytest.mark.parametrize("step", hippo.LEGS_STEPS)
@pytest.mark.parametrize("method", hippo.DISCRETIZATIONS)
def test_legs_projection_is_the_stepwise_recurrence(method, step):
    f = np.random.default_rng(0).normal(size=12)
    c, rows = np.zeros(5), []
    for k, fk in enumerate(f):
        Ad, Bd = hippo.legs_step_matrices(k, 5, method, step)
        c = Ad @ c + Bd * fk
        rows.append(c)
    np.testing.assert_allclose(hippo.project(f, "legs", 5, method, legs_step=step), rows, atol=1e-12)


def test_legs_paper_step_forward_euler_is_the_papers_update():
    """c_{k+1} = (I - A/t) c_k + (1/t) B f_k with t = k + 1; c_0 is then the running mean."""
    f = np.random.default_rng(1).normal(size=20)
    A, B = GOLDEN["legs"]
    A, B = np.array(A), np.array(B)
    c = np.zeros(3)
    for k, fk in enumerate(f):
        t = k + 1.0
        c = (np.eye(3) - A / t) @ c + B * fk / t
    got = hippo.project(f, "legs", 3, "forward_euler", legs_step="paper")
    np.testing.assert_allclose(got[-1], c, atol=1e-12)
    np.testing.assert_allclose(got[:, 0], np.cumsum(f) / np.arange(1, 21), atol=1e-12)


def test_legs_log_zoh_is_exact_for_a_step_function():
    """Coefficients of f held piecewise-constant over unit cells, by exact cell integrals."""
    n, L = 6, 40
    f = np.random.default_rng(2).normal(size=L)
    got = hippo.project(f, "legs", n, "zoh")
    for k in (0, 1, 7, L - 1):
        t = k + 1.0
        edges = 2 * np.arange(k + 2) / t - 1  # the cells [j, j+1) mapped to x = 2 s/t - 1
        want = []
        for j in range(n):
            antider = legendre.Legendre.basis(j).integ()
            # c_j = (1/t) int_0^t f(s) sqrt(2j+1) P_j(2s/t - 1) ds, dx = 2 ds / t
            want.append(np.sqrt(2 * j + 1) / 2 * np.sum(f[: k + 1] * np.diff(antider(edges))))
        np.testing.assert_allclose(got[k], want, atol=1e-11)


@pytest.mark.parametrize("measure", ["legs", "legt", "lagt"])
def test_projection_resumes(measure):
    f = smooth_signal(np.linspace(0, 1, 50))
    whole = hippo.project(f, measure, 8, dt=0.02, theta=0.5)
    first = hippo.project(f[:23], measure, 8, dt=0.02, theta=0.5)
    rest = hippo.project(f[23:], measure, 8, dt=0.02, theta=0.5, initial_state=first[-1], start=23)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, atol=1e-13)


def weighted_rmse(measure, coeffs, t, points, f, theta):
    v = hippo.reconstruct(coeffs, measure, t, points, theta=theta)
    w = np.exp(-(t - points) / theta) if measure == "lagt" else np.ones_like(points)
    return np.sqrt(np.sum(w * (v - f) ** 2) / np.sum(w))


@pytest.mark.parametrize("measure, theta, orders", [
    ("legs", 1.0, (12, 16, 20, 24, 28)), ("legt", 0.5, (5, 6, 8, 10)), ("lmu", 0.5, (5, 6, 8, 10)),
    ("lagt", 0.125, (16, 32, 48, 64, 96))])
def test_reconstruction_error_decreases_with_n(measure, theta, orders):
    L, T = 1000, 2.0
    dt = T / L
    s = (np.arange(L) + 0.5) * dt
    f = smooth_signal(s)
    keep = s >= T - theta if measure in ("legt", "lmu") else np.ones(L, bool)
    errs = []
    for n in orders:
        c = hippo.project(f, measure, n, dt=dt, theta=theta)[-1]
        # legs counts time in samples: t = L, sample j at j + 1/2.
        t, pts = (L, s / dt) if measure == "legs" else (T, s)
        errs.append(weighted_rmse(measure, c, t, pts[keep], f[keep], theta))
    # Past these orders the error sits at the floor of holding samples constant (~2e-4).
    assert all(b < 0.8 * a for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 1e-3, errs


def test_fout_error_decreases_with_n_on_a_periodic_window():
    """FouT is exact only where f(t - theta) = f(t): start from the window's exact coefficients
    of a theta-periodic signal (Fourier integrals by the midpoint rule) and stream one more window."""
    theta, L = 1.0, 500
    dt = theta / L
    g = lambda s: np.sin(PI2 * 3 * s) + 0.5 * np.cos(PI2 * 5 * s + 1) + 0.2 * np.sin(PI2 * 9 * s)
    s0 = (np.arange(L) + 0.5) * dt
    errs = []
    for n in (5, 11, 19):
        cols = [np.ones(L)]
        for k in range(1, (n - 1) // 2 + 1):  # x = s - t + 1 = s at t = theta = 1
            cols += [R2 * np.cos(PI2 * k * s0), R2 * np.sin(PI2 * k * s0)]
        c0 = np.stack(cols, axis=1).T @ g(s0) * dt
        c = hippo.project(g(s0 + theta), "fout", n, "zoh", dt=dt, initial_state=c0)[-1]
        errs.append(weighted_rmse("fout", c, 2 * theta, s0 + theta, g(s0 + theta), theta))
    assert all(b < 0.8 * a for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 1e-3, errs


def test_legs_is_invariant_to_time_dilation_translated_measures_are_not():
    """The same curve over [0, 1] sampled at L and at 2L points: LegS's final coefficients agree;
    LegT, stepping a fixed dt per sample, sees the curve stretched over [0, 2] the second time."""
    L, n = 300, 12
    curve = lambda s: np.cos(PI2 * 1.5 * s) + s ** 2
    f1, f2 = curve((np.arange(L) + 0.5) / L), curve((np.arange(2 * L) + 0.5) / (2 * L))
    c1, c2 = hippo.project(f1, "legs", n)[-1], hippo.project(f2, "legs", n)[-1]
    assert np.linalg.norm(c1 - c2) < 1e-3 * np.linalg.norm(c1)
    for measure in ("legt", "lagt"):
        d1 = hippo.project(f1, measure, n, dt=1 / L, theta=0.5)[-1]
        d2 = hippo.project(f2, measure, n, dt=1 / L, theta=0.5)[-1]
        assert np.linalg.norm(d1 - d2) > 0.1 * np.linalg.norm(d1)


@pytest.mark.parametrize("measure, theta", [("legs", 1.0), ("legt", 0.7), ("lmu", 0.7), ("fout", 0.7)])
def test_basis_is_orthonormal_under_its_measure(measure, theta):
    n, t = 7, 3.0
    x, wq = legendre.leggauss(40)
    lo = 0.0 if measure == "legs" else t - theta
    pts = lo + (x + 1) / 2 * (t - lo)
    G = hippo.basis(measure, n, t, pts, theta=theta)
    gram = (G * (wq / 2)[:, None]).T @ G
    if measure == "lmu":  # unnormalised: <P_j, P_k> = delta_jk / (2k + 1)
        np.testing.assert_allclose(gram, np.diag(1 / (2 * np.arange(n) + 1.0)), atol=1e-12)
    else:
        np.testing.assert_allclose(gram, np.eye(n), atol=1e-12)


def test_lagt_basis_is_orthonormal_under_exponential_measure():
    u, wq = laguerre.laggauss(30)
    t, theta = 5.0, 0.4
    G = hippo.basis("lagt", 6, t, t - theta * u, theta=theta)
    np.testing.assert_allclose((G * wq[:, None]).T @ G, np.eye(6), atol=1e-10)


def test_projection_errors():
    with pytest.raises(ValueError, match="signal must be a non-empty 1-D"):
        hippo.project(np.ones((3, 2)), "legs", 4)
    with pytest.raises(ValueError, match="unknown discretization"):
        hippo.project(np.ones(3), "legs", 4, method="euler")
    with pytest.raises(ValueError, match="unknown HiPPO measure"):
        hippo.project(np.ones(3), "legx", 4)
    with pytest.raises(ValueError, match="unknown LegS step"):
        hippo.project(np.ones(3), "legs", 4, legs_step="midpoint")
    with pytest.raises(ValueError, match=r"initial_state must have shape \(4,\)"):
        hippo.project(np.ones(3), "legt", 4, initial_state=np.zeros(3))
    with pytest.raises(ValueError, match="dt must be"):
        hippo.project(np.ones(3), "legt", 4, dt=-1.0)
    with pytest.raises(ValueError, match=r"points must lie in \[0.5, 1.5\]"):
        hippo.reconstruct(np.ones(4), "legt", 1.5, [0.2, 1.0])
    with pytest.raises(ValueError, match="points must lie"):
        hippo.reconstruct(np.ones(4), "legs", 10, [11.0])
    with pytest.raises(ValueError, match="coeffs must be a 1-D"):
        hippo.reconstruct(np.ones((2, 4)), "legs", 10, [1.0])
    with pytest.raises(ValueError, match="sample index k"):
        hippo.legs_step_matrices(-1, 4)
