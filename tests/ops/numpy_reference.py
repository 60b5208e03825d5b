"""Independent float64 NumPy references for the memory operators, written from the equations.

These are the test oracles: plain loops over time, no JAX, no chunking, no shared code with
memjax. Inputs are converted to float64 first (so low-precision inputs are compared after their
own rounding, which isolates the operator's error from the input quantization).
"""

import numpy as np


def linear_attention_np(q, k, v, g=None, scale=None, initial_state=None):
    """Decayed linear attention, token by token, in float64.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale * S_t^T q_t  (current token included).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] or None; initial_state: [B, H, K, V] or
    None (zeros). Returns (o [B, T, H, V], final_state [B, H, K, V]), both float64.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    if initial_state is None:
        S = np.zeros((B, H, K, V))
    else:
        S = np.array(initial_state, dtype=np.float64)
    gamma = np.ones((B, T, H)) if g is None else np.exp(np.asarray(g, dtype=np.float64))

    o = np.zeros((B, T, H, V))
    for t in range(T):
        for b in range(B):
            for h in range(H):
                S[b, h] = gamma[b, t, h] * S[b, h] + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = scale * (S[b, h].T @ q[b, t, h])
    return o, S
