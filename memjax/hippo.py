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
_TRANSLATED = ("legt", "lmu", "lagt", "fout")


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
