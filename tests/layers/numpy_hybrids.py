"""Float64 NumPy oracles of the memory hybrids (exact local attention beside a compressive
recurrent memory): Infini-attention and the artificial hippocampus network (AHN).

Same contract as numpy_mixers.py: `<kind>_np(p, x, **options)` from the layer's Flax parameters
`p` (as float64 NumPy) and `x [B, T, d_model]`, written token by token from the papers'
equations, with no JAX and nothing imported from memjax. Taken from the layers: parameter names,
the per-head `[q | k | v]` order of the fused projection, the epsilons (normaliser 1e-6, RMSNorm
1e-6, L2 1e-6 under the square root) and the `1 / sqrt(d)` read-out scale of the delta rule.
"""

import numpy as np
from numpy_mixers import (attention_np, causal_conv, dense, fused_qkv, heads, l2_unit, rms_norm,
                          sigmoid, silu, softplus)

INFINI_EPS = 1e-6  # added to sigma(q) . z


def elu_plus_one(z):
    return np.where(z > 0, z + 1.0, np.exp(np.minimum(z, 0.0)))


def infini_attention_np(p, x, *, num_heads, segment, delta):
    """Infini-attention (Munkhdalai et al. 2024), per segment s of `segment` tokens, per head:

    `A_dot_t`: causal softmax attention of token t over its own segment (scale d^-1/2);
    `A_mem_t = sigma(q_t) M_{s-1} / (sigma(q_t) . z_{s-1} + eps)`, sigma = ELU + 1, M `[key,
    value]` as in the paper; after the segment `M_s = M_{s-1} + sigma(K)^T V` (linear) or
    `+ sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1} + eps))` (delta), `z_s = z_{s-1} +
    sum sigma(K)`; `A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot`, merged heads, `W_out`.
    """
    q, k, v = fused_qkv(p["qkv"], x, num_heads)
    B, T, H, w = q.shape
    gate = sigmoid(p["beta"])[None, :, None]  # [1, H, 1]
    M = np.zeros((B, H, w, w))  # [key, value]
    z = np.zeros((B, H, w))
    A = np.zeros_like(q)
    for start in range(0, T, segment):
        end = min(start + segment, T)
        for t in range(start, end):
            logits = np.einsum("bhw,bshw->bhs", q[:, t], k[:, start : t + 1]) / np.sqrt(w)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            a_dot = np.einsum("bhs,bshw->bhw", weights, v[:, start : t + 1])
            sq = elu_plus_one(q[:, t])
            a_mem = (np.einsum("bhk,bhkv->bhv", sq, M)
                     / (np.einsum("bhk,bhk->bh", sq, z)[..., None] + INFINI_EPS))
            A[:, t] = gate * a_mem + (1.0 - gate) * a_dot
        M_before, z_before = M.copy(), z.copy()
        for t in range(start, end):
            sk = elu_plus_one(k[:, t])
            value = v[:, t]
            if delta:
                value = value - (np.einsum("bhk,bhkv->bhv", sk, M_before)
                                 / (np.einsum("bhk,bhk->bh", sk, z_before)[..., None] + INFINI_EPS))
            M = M + np.einsum("bhk,bhv->bhkv", sk, value)
            z = z + sk
    return dense(p["out"], A.reshape(B, T, -1))


def fading_memory_np(p, x, *, num_heads, window, memory):
    """The memory branch of hippocampus (and B'MOJO) and the surprise of each token as it leaves
    the window (B'MOJO's selection signal):
    `(W_out(RMSNorm(o) * silu(W_g x)) [B, T, d], e [B, T])`, e NaN for tokens that never leave.

    Per token t, with the memory value-major (`S [V, K]`, read as `S q`): token s = t - window
    (if window > 0 and s >= 0) leaves the window: `e_s = mean_h ||v_s - alpha_s S k_s||^2` (the
    prediction of the state before it, decayed by its own gate), then
    `S <- alpha_s S (I - beta_s k_s k_s^T) + beta_s v_s k_s^T`; `o_t = S q_t / sqrt(d)`.
    q, k, v = silu(conv(W x)) per head, q and k unit; `beta = sigmoid(W_b x + b)`; gated:
    `alpha = exp(-exp(A_log) softplus(W_a x + dt_bias))`, else 1.
    """
    assert memory in ("gated_deltanet", "deltanet"), memory
    B, T, d = x.shape
    q, k, v = (heads(silu(causal_conv(p[f"conv_{n}"], dense(p[n], x))), num_heads) for n in "qkv")
    q, k = l2_unit(q), l2_unit(k)
    beta = sigmoid(dense(p["beta"], x))  # [B, T, H]
    if memory == "gated_deltanet":
        alpha = np.exp(-np.exp(p["A_log"]) * softplus(dense(p["a"], x) + p["dt_bias"]))
    else:
        alpha = np.ones_like(beta)
    w = d // num_heads
    S = np.zeros((B, num_heads, w, w))  # [value, key]
    surprise = np.full((B, T), np.nan)
    o = np.zeros_like(v)
    eye = np.eye(w)
    for t in range(T):
        s = t - window
        if window and s >= 0:
            prediction = alpha[:, s, :, None] * np.einsum("bhvk,bhk->bhv", S, k[:, s])
            surprise[:, s] = np.mean(np.sum((v[:, s] - prediction) ** 2, axis=-1), axis=-1)
            ks, bs = k[:, s], beta[:, s, :, None, None]
            transition = eye - bs * np.einsum("bhi,bhj->bhij", ks, ks)
            S = (alpha[:, s, :, None, None] * (S @ transition)
                 + bs * np.einsum("bhv,bhk->bhvk", v[:, s], ks))
        o[:, t] = np.einsum("bhvk,bhk->bhv", S, q[:, t]) / np.sqrt(w)
    o = rms_norm(o, p["head_norm"]["scale"]).reshape(B, T, d) * silu(dense(p["gate"], x))
    return dense(p["out"], o), surprise


def hippocampus_np(p, x, *, num_heads, window, memory):
    """AHN: sliding-window attention over the last `window` tokens plus the (Gated) DeltaNet
    memory of the tokens that left it (`fading_memory_np`): `y = attention + W_out(RMSNorm(o) *
    silu(W_g x))`. window = 0: full attention and an empty memory."""
    y = attention_np(p["attention"], x, num_heads=num_heads, window=window)
    return y + fading_memory_np(p, x, num_heads=num_heads, window=window, memory=memory)[0]


ORACLES = {"infini_attention": infini_attention_np, "hippocampus": hippocampus_np}
