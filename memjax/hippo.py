"""HiPPO transition matrices, their normal-plus-low-rank form, discretisation, online projection.

NumPy float64 throughout (these are constants: initialisations and references, not traced code).

Conventions (Gu et al. 2020, "HiPPO", appendix D). ``transition`` returns the paper's positive
``(A, B)``: the coefficients ``c`` of the projection of the history of ``f`` obey

    LegS (scaled, timescale-free):  dc/dt = -(1/t) A c + (1/t) B f      history [0, t]
    translated (legt, lmu, lagt, fout): dc/dt = -A c + B f               window  [t - theta, t]

so the *state matrix* of the linear ODE ``dx/dt = M x + B u`` is ``M = -A`` (or ``-A/t``). The
translated measures take a window length ``theta`` (default 1): ``A`` and ``B`` scale as ``1/theta``.

Measures and the basis their coefficients refer to (``reconstruct`` evaluates them):

- ``legs``: uniform measure on [0, t]; ``f(s) ~ sum_n c_n sqrt(2n+1) P_n(2 s/t - 1)``.
- ``legt``: uniform on [t - theta, t]; ``f(s) ~ sum_n c_n sqrt(2n+1) P_n(2 (s - t)/theta + 1)``.
- ``lmu``: the Legendre Memory Unit (Voelker et al. 2019): LegT in the unnormalised basis
  ``c_lmu = D c_legt`` with ``D = diag((-1)^n sqrt(2n+1))``, so ``A_lmu = D A_legt D^-1``,
  ``B_lmu = D B_legt`` and ``f(s) ~ sum_n c_n (-1)^n P_n(2 (s - t)/theta + 1)``.
- ``lagt``: exponential measure ``exp(-(t - s)/theta)/theta`` on (-inf, t];
  ``f(s) ~ sum_n c_n L_n((t - s)/theta)`` (Laguerre polynomials, alpha = 0).
- ``fout``: uniform on [t - theta, t] with the real Fourier basis on ``x = (s - t)/theta + 1`` in
  [0, 1]: ``phi_0 = 1``, ``phi_{2k-1} = sqrt2 cos(2 pi k x)``, ``phi_{2k} = sqrt2 sin(2 pi k x)``.
  The value leaving the window, ``f(t - theta)``, is replaced by the reconstruction at the window's
  start, which puts the rank-one term ``e e^T`` (``e_n = phi_n(0)``) into ``A``.
"""

from __future__ import annotations

import numpy as np

MEASURES = ("legs", "legt", "lmu", "lagt", "fout")


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"unknown HiPPO measure {measure!r}; known measures: {', '.join(MEASURES)}")


def _check_order(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"HiPPO order n must be an int >= 1, got {n!r}")
    return int(n)


def _check_theta(theta) -> float:
    theta = float(theta)
    if not np.isfinite(theta) or theta <= 0:
        raise ValueError(f"window length theta must be a finite number > 0, got {theta!r}")
    return theta


def _fourier_boundary(n: int) -> np.ndarray:
    """``e_n = phi_n(0) = phi_n(1)``: 1 for the constant, sqrt2 for each cosine, 0 for each sine."""
    e = np.zeros(n)
    e[0] = 1.0
    e[1::2] = np.sqrt(2.0)
    return e


def transition(measure: str, n: int, theta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO ``(A [n, n], B [n])``, float64, in the paper's positive convention (module docstring).

    legs: ``A_nk = sqrt(2n+1) sqrt(2k+1)`` (n > k), ``n + 1`` (n = k), 0 (n < k); ``B_n = sqrt(2n+1)``.
    legt: ``A_nk = sqrt(2n+1) sqrt(2k+1) / theta`` (k <= n), times ``(-1)^(n-k)`` (k > n);
    ``B_n = sqrt(2n+1) / theta``.
    lmu:  ``A_nk = (2n+1)/theta * (-1)^(n-k)`` (k <= n), ``(2n+1)/theta`` (k > n);
    ``B_n = (-1)^n (2n+1)/theta``.
    lagt: ``A_nk = 1/theta`` (k <= n), 0 (k > n); ``B_n = 1/theta``.
    fout: ``A = (e e^T + K)/theta`` with ``K_{2k-1, 2k} = -2 pi k``, ``K_{2k, 2k-1} = 2 pi k``;
    ``B = e/theta``.
    ``theta`` is ignored by legs (timescale-free).
    """
    _check_measure(measure)
    n = _check_order(n)
    theta = _check_theta(theta)
    idx = np.arange(n)
    row, col = idx[:, None], idx[None, :]
    if measure == "legs":
        q = np.sqrt(2.0 * idx + 1.0)
        A = np.where(row > col, np.outer(q, q), 0.0) + np.diag(idx + 1.0)
        return A, q.copy()
    if measure == "legt":
        q = np.sqrt(2.0 * idx + 1.0)
        sign = np.where(col <= row, 1.0, (-1.0) ** (row - col))
        return np.outer(q, q) * sign / theta, q / theta
    if measure == "lmu":
        r = 2.0 * idx + 1.0
        sign = np.where(col <= row, (-1.0) ** (row - col), 1.0)
        return r[:, None] * sign / theta, (-1.0) ** idx * r / theta
    if measure == "lagt":
        return np.where(col <= row, 1.0, 0.0) / theta, np.ones(n) / theta
    # fout
    e = _fourier_boundary(n)
    K = np.zeros((n, n))
    for k in range(1, n // 2 + 1):
        cos_i, sin_i = 2 * k - 1, 2 * k
        if sin_i < n:  # an odd-length truncation keeps the last cosine without its sine
            K[cos_i, sin_i] = -2.0 * np.pi * k
            K[sin_i, cos_i] = 2.0 * np.pi * k
    return (np.outer(e, e) + K) / theta, e / theta


def _low_rank_factor(measure: str, n: int) -> np.ndarray:
    """``P [r, n]`` (the smallest rank r) with ``-A + P^T P`` normal, for ``transition(measure, n)``.

    legs: ``P = sqrt(n + 1/2)`` gives ``-A + P P^T = -I/2 + skew``. lagt: ``P = 1/sqrt2`` gives the
    same. fout: ``P = e`` cancels the boundary term, leaving ``-K`` (skew). legt needs rank 2:
    ``-A + P P^T`` is skew iff ``P_n . P_k = sqrt(2n+1) sqrt(2k+1)`` for ``n - k`` even and 0 for
    ``n - k`` odd, i.e. ``sqrt(2n+1)`` split by parity into two rows.
    """
    idx = np.arange(n)
    if measure == "legs":
        return np.sqrt(idx + 0.5)[None, :]
    if measure == "lagt":
        return np.full((1, n), np.sqrt(0.5))
    if measure == "fout":
        return _fourier_boundary(n)[None, :]
    if measure == "legt":
        q = np.sqrt(2.0 * idx + 1.0)
        return np.stack([np.where(idx % 2 == 0, q, 0.0), np.where(idx % 2 == 1, q, 0.0)])
    raise ValueError(
        "measure 'lmu' has no normal-plus-low-rank form P P^T in its own (non-orthonormal) basis; "
        "use 'legt', the same system up to the diagonal change of basis D = diag((-1)^n sqrt(2n+1))"
    )


def nplr(measure: str, n: int, rank: int = 1):
    """Normal-plus-low-rank form of the HiPPO state matrix, in S4's sign convention.

    The state matrix is ``M = -A`` (``A`` from ``transition(measure, n)``, theta = 1; for legs the
    ``1/t`` factor is left out). With a real ``P0 [rank, n]`` (``_low_rank_factor``),
    ``S = M + P0^T P0`` is normal, ``S = d I + K`` with K real skew-symmetric, diagonalised by a
    unitary ``V``: ``S = V diag(w) V^*``. Hence the identity (tested)

        -A = V (diag(w) - P^T conj(P)) V^*,   i.e.  -A = V diag(w) V^* - P0^T P0,

    where ``P[r] = V^* P0[r]`` is the low-rank factor in the eigenbasis and ``B = V^* B0``.

    Returns ``(w [n] complex128, P [rank, n] complex128, B [n] complex128, V [n, n] complex128)``.
    ``Re w`` is constant: -1/2 for legs and lagt, 0 for legt and fout. ``rank`` must be at least the
    measure's minimal rank (1; 2 for legt); extra rows of P are zero. lmu raises ValueError (no such
    form in its basis; use legt). Dropping the low-rank term gives HiPPO-N (``dplr``).
    """
    _check_measure(measure)
    n = _check_order(n)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    A, B0 = transition(measure, n)
    P0 = _low_rank_factor(measure, n)
    if rank < P0.shape[0]:
        raise ValueError(f"measure {measure!r} needs rank >= {P0.shape[0]} for a normal part, got {rank}")
    P0 = np.concatenate([P0, np.zeros((rank - P0.shape[0], n))])
    S = -A + P0.T @ P0
    d = float(np.mean(np.diag(S)))
    K = S - d * np.eye(n)
    # S = d I + K by construction; check it, since eigh below relies on it.
    if not (np.allclose(np.diag(S), d, atol=1e-9) and np.allclose(K, -K.T, atol=1e-9)):
        raise AssertionError(f"{measure}: -A + P P^T is not of the form d I + skew")
    # -i K is Hermitian: its eigh gives real lam and a unitary V, and K = V diag(i lam) V^*.
    lam, V = np.linalg.eigh(-1j * K)
    w = (d + 1j * lam).astype(np.complex128)
    Vh = V.conj().T
    P = (Vh @ P0.T).T.astype(np.complex128)
    B = (Vh @ B0).astype(np.complex128)
    return w, P, B, V.astype(np.complex128)


def dplr(measure: str, n: int):
    """HiPPO-N (S5's initialisation): the normal part alone, ``(Lambda [n], V^* B [n], V [n, n])``.

    ``Lambda`` and ``V`` diagonalise ``-A + P P^T`` (see ``nplr``); the low-rank term is dropped.
    """
    w, _, B, V = nplr(measure, n, rank=2 if measure == "legt" else 1)
    return w, B, V


# --------------------------------------------------------------------------------------------
# Discretisation

DISCRETIZATIONS = ("forward_euler", "backward_euler", "bilinear", "zoh")


def discretize(A, B, dt, method: str = "bilinear"):
    """Discretises ``dx/dt = A x + B u`` (A is the *state matrix*: pass ``-A`` for HiPPO's A).

    With ``u`` held constant over one step of length ``dt``, ``x_{k+1} = Ad x_k + Bd u_k``:

        forward_euler:  Ad = I + dt A                     Bd = dt B
        backward_euler: Ad = (I - dt A)^-1                Bd = (I - dt A)^-1 dt B
        bilinear:       Ad = (I - dt/2 A)^-1 (I + dt/2 A)  Bd = (I - dt/2 A)^-1 dt B
        zoh:            Ad = exp(dt A)                    Bd = A^-1 (exp(dt A) - I) B   (exact)

    ``A`` is dense ``[n, n]`` (B ``[n]`` or ``[n, m]``, dt a scalar; zoh uses the exponential of
    the augmented matrix ``[[A, B], [0, 0]]``, so a singular A is fine) or diagonal given as a
    vector ``[n]`` (elementwise, real or complex; B and dt broadcast against it; zoh's
    ``(exp(dt a) - 1)/a`` is taken as ``dt`` where ``a = 0``). Returns ``(Ad, Bd)``.
    """
    if method not in DISCRETIZATIONS:
        raise ValueError(f"unknown discretization {method!r}; known: {', '.join(DISCRETIZATIONS)}")
    A, B = np.asarray(A), np.asarray(B)
    if A.ndim == 1:
        return _discretize_diagonal(A, B, np.asarray(dt), method)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix [n, n] or a diagonal [n], got shape {A.shape}")
    n = A.shape[0]
    if B.ndim not in (1, 2) or B.shape[0] != n:
        raise ValueError(f"B must have shape [{n}] or [{n}, m] to match A {A.shape}, got {B.shape}")
    if np.ndim(dt) != 0:
        raise ValueError(f"dt must be a scalar for a dense A, got shape {np.shape(dt)}")
    dt = float(dt) if np.isrealobj(dt) else complex(dt)
    eye = np.eye(n)
    if method == "forward_euler":
        return eye + dt * A, dt * B
    if method == "backward_euler":
        inv = np.linalg.inv(eye - dt * A)
        return inv, inv @ (dt * B)
    if method == "bilinear":
        left = eye - (dt / 2) * A
        return np.linalg.solve(left, eye + (dt / 2) * A), np.linalg.solve(left, dt * B)
    from scipy.linalg import expm  # scipy is a dependency of jax

    B2 = B.reshape(n, -1)
    m = B2.shape[1]
    aug = np.zeros((n + m, n + m), dtype=np.result_type(A, B2, dt))
    aug[:n, :n], aug[:n, n:] = A, B2
    E = expm(dt * aug)
    return E[:n, :n], E[:n, n:].reshape(B.shape)


def _discretize_diagonal(a, B, dt, method):
    if method == "forward_euler":
        return 1 + dt * a, dt * B
    if method == "backward_euler":
        inv = 1 / (1 - dt * a)
        return inv, inv * dt * B
    if method == "bilinear":
        inv = 1 / (1 - dt / 2 * a)
        return inv * (1 + dt / 2 * a), inv * dt * B
    dta = dt * a
    safe = np.where(dta == 0, 1.0, dta)
    # expm1(z)/z -> 1 as z -> 0; expm1 keeps digits for small |z|.
    phi = np.where(dta == 0, 1.0, np.expm1(safe) / safe)
    return np.exp(dta), phi * dt * B


# --------------------------------------------------------------------------------------------
# Online projection and reconstruction


LEGS_STEPS = ("log", "paper")


def _check_legs_step(step: str) -> None:
    if step not in LEGS_STEPS:
        raise ValueError(f"unknown LegS step {step!r}; known: {', '.join(LEGS_STEPS)}")


def legs_step_matrices(k: int, n: int, method: str = "bilinear", step: str = "log"):
    """LegS's discrete update for the step that consumes sample ``k`` (0-based): ``(Ad [n, n], Bd [n])``.

    Sample k is held over ``[k, k+1)`` and ``c_{k+1} = Ad c_k + Bd f_k``. Both forms are
    timescale-free (t counts samples):

    - ``step="log"`` (default): in log time ``tau = log t`` LegS is time-invariant,
      ``dc/dtau = -A c + B f``, so the step is ``discretize(-A, B, dtau, method)`` with
      ``dtau = log((k+1)/k)``. For ``k = 0`` (``dtau`` infinite) the result is exact for every
      method: the history is the one held sample, ``c_1 = e_0 f_0`` (``Ad = 0``, ``Bd = e_0``;
      ``A e_0 = B``). With ``method="zoh"`` every step is exact for a piecewise-constant input.
    - ``step="paper"``: the HiPPO paper's update, the ``1/t`` factor frozen at ``t = k + 1`` over
      a unit step: ``discretize(-A/t, B/t, 1, method)``; with forward Euler this is the paper's
      ``c_{k+1} = (I - A/t) c_k + (1/t) B f_k``.

    Measured (docs/results/hippo_approx, bilinear, L = 2000): RMSE 7.0e-5 with "log" against
    1.7e-3 with "paper" at N = 64; "paper" stops improving past N = 32.
    """
    _check_legs_step(step)
    n = _check_order(n)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"sample index k must be an int >= 0, got {k!r}")
    A, B = transition("legs", n)
    if step == "paper":
        t = k + 1.0
        return discretize(-A / t, B / t, 1.0, method)
    if method not in DISCRETIZATIONS:
        raise ValueError(f"unknown discretization {method!r}; known: {', '.join(DISCRETIZATIONS)}")
    if k == 0:
        return np.zeros((n, n)), np.eye(n)[0]
    return discretize(-A, B, np.log1p(1.0 / k), method)


def _legs_project(f, n, method, step, c, start):
    from scipy.linalg import solve_triangular

    A, B = transition("legs", n)
    eye = np.eye(n)
    out = np.empty((len(f), n))
    for k, fk in enumerate(f, start=start):
        if step == "log" and k == 0:
            c = eye[0] * fk
            out[k - start] = c
            continue
        # Both forms are discretize(-A h, B h, 1, method) with h = 1/t or h = dtau.
        h = 1.0 / (k + 1.0) if step == "paper" else np.log1p(1.0 / k)
        # A is lower triangular, so the implicit methods need one O(n^2) triangular solve.
        if method == "forward_euler":
            c = c - h * (A @ c) + h * B * fk
        elif method == "backward_euler":
            c = solve_triangular(eye + h * A, c + h * B * fk, lower=True)
        elif method == "bilinear":
            c = solve_triangular(eye + (h / 2) * A, c - (h / 2) * (A @ c) + h * B * fk, lower=True)
        else:
            Ad, Bd = discretize(-h * A, h * B, 1.0, "zoh")
            c = Ad @ c + Bd * fk
        out[k - start] = c
    return out


def project(signal, measure: str, n: int, method: str = "bilinear", dt: float | None = None,
            theta: float = 1.0, legs_step: str = "log", initial_state=None,
            start: int = 0) -> np.ndarray:
    """Streams ``signal [L]`` through the HiPPO ``measure`` of order ``n``: coefficients ``[L, n]``.

    Row k holds the coefficients after consuming samples 0..k. Sample j is read as the value held
    over ``[j dt, (j+1) dt)`` (``u`` constant per step), so after row k the time is
    ``t = (k+1) dt`` and sample j sits at the cell midpoint ``(j + 1/2) dt``; ``reconstruct``
    takes times in the same units. legs: timescale-free, ``dt`` is ignored and t counts samples
    (``t = k + 1``; ``legs_step`` picks the update, see ``legs_step_matrices``); its coefficients
    depend on s/t only.
    Translated measures: one constant ``(Ad, Bd) = discretize(-A, B, dt, method)`` with window
    ``theta`` and ``dt`` defaulting to ``1/L`` (the signal spans [0, 1]; pass dt when resuming).

    Resuming: ``initial_state [n]`` (default zeros: the history before the first sample is zero)
    and, for legs, ``start``, the number of samples already consumed (its time index), so
    ``project(f[m:], ..., initial_state=C[m-1], start=m)`` continues ``C = project(f[:m], ...)``.
    """
    _check_measure(measure)
    n = _check_order(n)
    if method not in DISCRETIZATIONS:
        raise ValueError(f"unknown discretization {method!r}; known: {', '.join(DISCRETIZATIONS)}")
    f = np.asarray(signal, dtype=np.float64)
    if f.ndim != 1 or f.shape[0] < 1:
        raise ValueError(f"signal must be a non-empty 1-D array [L], got shape {f.shape}")
    c = np.zeros(n) if initial_state is None else np.asarray(initial_state, dtype=np.float64)
    if c.shape != (n,):
        raise ValueError(f"initial_state must have shape ({n},), got {c.shape}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if measure == "legs":
        _check_legs_step(legs_step)
        return _legs_project(f, n, method, legs_step, c, int(start))
    dt = 1.0 / f.shape[0] if dt is None else float(dt)
    if not np.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    A, B = transition(measure, n, theta)
    Ad, Bd = discretize(-A, B, dt, method)
    out = np.empty((f.shape[0], n))
    for k, fk in enumerate(f):
        c = Ad @ c + Bd * fk
        out[k] = c
    return out


def basis(measure: str, n: int, t: float, points, theta: float = 1.0) -> np.ndarray:
    """The functions the coefficients at time ``t`` refer to, at times ``points [P]``: ``[P, n]``.

    ``reconstruct`` is ``basis(...) @ c``. Points must lie in the measure's support: [0, t] for
    legs, [t - theta, t] for legt, lmu and fout, (-inf, t] for lagt (a ValueError otherwise).
    """
    _check_measure(measure)
    n = _check_order(n)
    theta = _check_theta(theta)
    s = np.asarray(points, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"points must be a 1-D array of times, got shape {s.shape}")
    t = float(t)
    tol = 1e-9 * max(1.0, abs(t), theta)
    lo = {"legs": 0.0, "lagt": -np.inf}.get(measure, t - theta)
    if measure == "legs" and t <= 0:
        raise ValueError(f"legs needs t > 0, got {t}")
    if s.size and (s.min() < lo - tol or s.max() > t + tol):
        raise ValueError(f"points must lie in [{lo}, {t}] for measure {measure!r}; "
                         f"got [{s.min()}, {s.max()}]")
    eye = np.eye(n)
    if measure in ("legs", "legt", "lmu"):
        x = 2 * s / t - 1 if measure == "legs" else 2 * (s - t) / theta + 1
        x = np.clip(x, -1.0, 1.0)
        P = np.polynomial.legendre.legval(x, eye).T  # [P, n]: P_k(x)
        k = np.arange(n)
        scale = (-1.0) ** k if measure == "lmu" else np.sqrt(2.0 * k + 1)
        return P * scale
    if measure == "lagt":
        u = np.maximum((t - s) / theta, 0.0)
        return np.polynomial.laguerre.lagval(u, eye).T
    x = (s - t) / theta + 1  # fout
    out = np.empty((s.size, n))
    out[:, 0] = 1.0
    for j in range(1, n):
        k = (j + 1) // 2
        trig = np.cos if j % 2 == 1 else np.sin
        out[:, j] = np.sqrt(2.0) * trig(2 * np.pi * k * x)
    return out


def reconstruct(coeffs, measure: str, t: float, points, theta: float = 1.0) -> np.ndarray:
    """Evaluates the history approximated by ``coeffs [n]`` (from ``project``) at times ``points``.

    ``f(s) ~ sum_n coeffs_n g_n(t, s)`` with the basis of the module docstring; returns ``[P]``.
    """
    c = np.asarray(coeffs, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"coeffs must be a 1-D array [n], got shape {c.shape}")
    return basis(measure, c.shape[0], t, points, theta) @ c
