"""Independent float64 NumPy references for the memory operators, written from the equations.

These are the test oracles: plain loops over time, no JAX, no chunking, no shared code with
memjax. Inputs are converted to float64 first (so low-precision inputs are compared after their
own rounding, which isolates the operator's error from the input quantization).
"""

import numpy as np


def linear_attention_np(
    q, k, v, g=None, scale=None, initial_state=None, normalize=False, eps=1e-6
):
    """Decayed linear attention, token by token, in float64.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T;  o_t = scale * S_t^T q_t  (current token included).
    With normalize: z_t = diag(exp(g_t)) z_{t-1} + k_t and o_t = scale * S_t^T q_t /
    (scale * q_t . z_t + eps); the state returned is [S | z] ([B, H, K, V + 1]) and initial_state
    must have that shape too.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] (per head), [B, T, H, K] (per key channel)
    or None; initial_state: [B, H, K, V] (V + 1 with normalize) or None (zeros). Returns
    (o [B, T, H, V], final_state), both float64.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    S = np.zeros((B, H, K, V))
    z = np.zeros((B, H, K))
    if initial_state is not None:
        h0 = np.array(initial_state, dtype=np.float64)
        S = h0[..., :V].copy()
        if normalize:
            z = h0[..., V].copy()
    if g is None:
        gamma = np.ones((B, T, H, K))
    else:
        gamma = np.exp(np.asarray(g, dtype=np.float64))
        if gamma.ndim == 3:
            gamma = np.repeat(gamma[..., None], K, axis=-1)

    o = np.zeros((B, T, H, V))
    for t in range(T):
        for b in range(B):
            for h in range(H):
                S[b, h] = gamma[b, t, h][:, None] * S[b, h] + np.outer(k[b, t, h], v[b, t, h])
                z[b, h] = gamma[b, t, h] * z[b, h] + k[b, t, h]
                o[b, t, h] = scale * (S[b, h].T @ q[b, t, h])
                if normalize:
                    o[b, t, h] /= scale * (q[b, t, h] @ z[b, h]) + eps
    if normalize:
        return o, np.concatenate([S, z[..., None]], axis=-1)
    return o, S


def _start(q, v, scale, initial_state):
    """(scale, S_0) for q [B, T, H, K], v [B, T, H, V]: K ** -0.5 and zeros by default."""
    B, _, H, K = q.shape
    S = np.zeros((B, H, K, v.shape[-1])) if initial_state is None else np.array(initial_state)
    return (K**-0.5 if scale is None else float(scale)), S.astype(np.float64)


def delta_rule_np(q, k, v, beta, g=None, scale=None, initial_state=None):
    """The (gated) delta rule, token by token, in float64.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T;  o_t = scale * S_t^T q_t
    (current token included; g=None is DeltaNet). The transition matrix is formed explicitly,
    the most literal reading of the equation.

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; g: [B, T, H] or None; initial_state:
    [B, H, K, V] or None (zeros). Returns (o [B, T, H, V], final_state [B, H, K, V]), float64.
    """
    q, k, v, beta = (np.asarray(x, dtype=np.float64) for x in (q, k, v, beta))
    B, T, H, K = q.shape
    scale, S = _start(q, v, scale, initial_state)
    alpha = np.ones((B, T, H)) if g is None else np.exp(np.asarray(g, dtype=np.float64))

    o = np.zeros(v.shape)
    eye = np.eye(K)
    for t in range(T):
        for b in range(B):
            for h in range(H):
                kt, bt = k[b, t, h], beta[b, t, h]
                transition = alpha[b, t, h] * (eye - bt * np.outer(kt, kt))
                S[b, h] = transition @ S[b, h] + bt * np.outer(kt, v[b, t, h])
                o[b, t, h] = scale * (S[b, h].T @ q[b, t, h])
    return o, S


def generalized_delta_rule_np(q, k, v, g, a, b, scale=None, initial_state=None):
    """The RWKV-7 generalised delta rule, token by token, in float64.

    S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T;  o_t = scale * S_t^T q_t (current
    token included). The K x K transition matrix is formed explicitly, the most literal reading
    of the equation.

    q, k, g, a, b: [B, T, H, K] (g may be None: no decay); v: [B, T, H, V]; initial_state:
    [B, H, K, V] or None (zeros). Returns (o [B, T, H, V], final_state [B, H, K, V]), float64.
    """
    q, k, v, a, b = (np.asarray(x, dtype=np.float64) for x in (q, k, v, a, b))
    B, T, H, K = q.shape
    scale, S = _start(q, v, scale, initial_state)
    w = np.ones((B, T, H, K)) if g is None else np.exp(np.asarray(g, dtype=np.float64))

    o = np.zeros(v.shape)
    for t in range(T):
        for n in range(B):
            for h in range(H):
                transition = np.diag(w[n, t, h]) + np.outer(a[n, t, h], b[n, t, h])
                S[n, h] = transition @ S[n, h] + np.outer(k[n, t, h], v[n, t, h])
                o[n, t, h] = scale * (S[n, h].T @ q[n, t, h])
    return o, S


def rel_rms(x, ref) -> float:
    """Relative RMS error ||x - ref|| / ||ref||, computed in float64 (the tolerance metric for
    low-precision inputs)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


def linear_scan_np(a, b, h0):
    """h_t = a_t h_{t-1} + b_t (elementwise), token by token in float64 / complex128.

    a, b: [B, T, *S]; h0: [B, *S]. Returns (h [B, T, *S], final state [B, *S])."""
    h = np.array(h0)
    out = np.zeros_like(b)
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out, h


def selective_scan_np(x, dt, A, Bm, Cm, Dskip=None, initial_state=None):
    """h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] Bm_t[n] x_t[d];
    y_t[d] = sum_n Cm_t[n] h_t[d,n] + Dskip[d] x_t[d]. Plain loops in float64.

    x, dt: [B, T, D]; A: [D, N]; Bm, Cm: [B, T, N]; state [B, D, N]."""
    x, dt, A, Bm, Cm = (np.asarray(a, np.float64) for a in (x, dt, A, Bm, Cm))
    Bsz, T, Dn = x.shape
    Nn = A.shape[1]
    h = np.zeros((Bsz, Dn, Nn)) if initial_state is None else np.array(initial_state, np.float64)
    skip = np.zeros(Dn) if Dskip is None else np.asarray(Dskip, np.float64)
    y = np.zeros((Bsz, T, Dn))
    for t in range(T):
        for b in range(Bsz):
            for d in range(Dn):
                for n in range(Nn):
                    h[b, d, n] = (np.exp(dt[b, t, d] * A[d, n]) * h[b, d, n]
                                  + dt[b, t, d] * Bm[b, t, n] * x[b, t, d])
                y[b, t, d] = Cm[b, t] @ h[b, d] + skip[d] * x[b, t, d]
    return y, h


def ssd_np(x, dt, A, Bm, Cm, Dskip=None, initial_state=None):
    """S_t[h] = exp(dt_t[h] A[h]) S_{t-1}[h] + dt_t[h] outer(Bm_t, x_t[h]);
    y_t[h] = S_t[h]^T Cm_t + Dskip[h] x_t[h]. Plain loops in float64.

    x: [B, T, H, P]; dt: [B, T, H]; A: [H]; Bm, Cm: [B, T, N]; state [B, H, N, P]."""
    x, dt, A, Bm, Cm = (np.asarray(a, np.float64) for a in (x, dt, A, Bm, Cm))
    Bsz, T, Hn, Pn = x.shape
    S = (np.zeros((Bsz, Hn, Bm.shape[-1], Pn)) if initial_state is None
         else np.array(initial_state, np.float64))
    skip = np.zeros(Hn) if Dskip is None else np.asarray(Dskip, np.float64)
    y = np.zeros_like(x)
    for t in range(T):
        for b in range(Bsz):
            for h in range(Hn):
                S[b, h] = (np.exp(dt[b, t, h] * A[h]) * S[b, h]
                           + dt[b, t, h] * np.outer(Bm[b, t], x[b, t, h]))
                y[b, t, h] = S[b, h].T @ Cm[b, t] + skip[h] * x[b, t, h]
    return y, S


def discretize_np(Lambda, dt, method):
    """(Lambda_bar, gain) with B_bar = gain * B: ZOH or bilinear, from the textbook formulas."""
    if method == "zoh":
        Lambda_bar = np.exp(dt * Lambda)
        return Lambda_bar, (Lambda_bar - 1.0) / Lambda
    Lambda_bar = (1.0 + dt * Lambda / 2) / (1.0 - dt * Lambda / 2)
    return Lambda_bar, dt / (1.0 - dt * Lambda / 2)


def s4d_np(u, Lambda, B, C, log_dt, D, x0, method="zoh"):
    """Per channel h and mode n: x = Lbar x + Bbar u_t;  y_t = 2 Re(sum_n C x) + D u_t.

    u: [B, T, H]; Lambda, B, C: [H, N] complex; log_dt, D: [H]; x0: [B, H, N] complex or None."""
    u, log_dt, D = (np.asarray(a, np.float64) for a in (u, log_dt, D))
    Lambda_bar, gain = discretize_np(np.asarray(Lambda), np.exp(log_dt)[:, None], method)
    B_bar = gain * np.asarray(B)
    x = np.zeros((u.shape[0], *Lambda_bar.shape), np.complex128)
    if x0 is not None:
        x = np.array(x0, dtype=np.complex128)
    y = np.zeros(u.shape)
    for t in range(u.shape[1]):
        x = Lambda_bar * x + B_bar * u[:, t, :, None]
        y[:, t] = 2.0 * np.real(np.sum(np.asarray(C) * x, axis=-1)) + D * u[:, t]
    return y, x


def s5_np(u, Lambda, B, C, log_dt, D, x0, method="zoh", conj_sym=True):
    """Shared state: x = Lbar x + Bbar u_t (Bbar [P, H]);  y_t = 2 Re(C x) + D u_t (C [H, P]).

    u: [B, T, H]; Lambda, log_dt: [P]; D: [H]; x0: [B, P] complex or None."""
    u, log_dt, D = (np.asarray(a, np.float64) for a in (u, log_dt, D))
    Lambda_bar, gain = discretize_np(np.asarray(Lambda), np.exp(log_dt), method)
    B_bar = gain[:, None] * np.asarray(B)
    x = np.zeros((u.shape[0], Lambda_bar.shape[0]), np.complex128)
    if x0 is not None:
        x = np.array(x0, dtype=np.complex128)
    y = np.zeros(u.shape)
    for t in range(u.shape[1]):
        x = Lambda_bar * x + u[:, t] @ B_bar.T
        y[:, t] = (2.0 if conj_sym else 1.0) * np.real(x @ np.asarray(C).T) + D * u[:, t]
    return y, x


def softmax_attention_np(q, k, v, window=None, scale=None):
    """Causal (optionally sliding-window) softmax attention in float64, loop over t, b, h:
    o_t = sum_{s in W(t)} softmax_s(scale q_t . k_s) v_s, W(t) = {s <= t} or, with a window,
    {t - window < s <= t}."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    nb, nt, nh, nk = q.shape
    scale = nk**-0.5 if scale is None else float(scale)
    o = np.zeros(v.shape, dtype=np.float64)
    for t in range(nt):
        first = 0 if window is None else max(0, t - window + 1)  # t - window < s <= t
        for b in range(nb):
            for h in range(nh):
                logits = np.array([scale * (q[b, t, h] @ k[b, s, h]) for s in range(first, t + 1)])
                w = np.exp(logits - logits.max())
                w /= w.sum()
                o[b, t, h] = sum(w[i] * v[b, s, h] for i, s in enumerate(range(first, t + 1)))
    return o
