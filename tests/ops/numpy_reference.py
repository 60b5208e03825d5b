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
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    if initial_state is None:
        S = np.zeros((B, H, K, V))
    else:
        S = np.array(initial_state, dtype=np.float64)
    alpha = np.ones((B, T, H)) if g is None else np.exp(np.asarray(g, dtype=np.float64))

    o = np.zeros((B, T, H, V))
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
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    if initial_state is None:
        S = np.zeros((B, H, K, V))
    else:
        S = np.array(initial_state, dtype=np.float64)
    w = np.ones((B, T, H, K)) if g is None else np.exp(np.asarray(g, dtype=np.float64))

    o = np.zeros((B, T, H, V))
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
