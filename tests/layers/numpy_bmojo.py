"""Float64 NumPy oracle of B'MOJO (Zancato et al. 2024): sliding-window attention, a fading
(Gated) DeltaNet memory of the tokens that left the window, and eidetic tokens.

Same contract as numpy_mixers.py: `bmojo_np(p, x, **options)` from the layer's Flax parameters
`p` (as float64 NumPy) and `x [B, T, d_model]`, token by token, no JAX and nothing imported from
memjax. Taken from the layer: parameter names (hippocampus's, attention under `attention`), the
per-head `[q | k | v]` order of the fused projection, the epsilons, the `1 / sqrt(d)` scales,
and the two choices the paper leaves open: the surprise is measured against the state the delta
update corrects (the previous state decayed by the token's own gate) and ties in surprise go to
the more recent token.
"""

import numpy as np
from numpy_mixers import (causal_conv, dense, fused_qkv, heads, l2_unit, rms_norm, sigmoid, silu,
                          softplus)


def fading_memory_np(p, x, *, num_heads, window, memory):
    """The memory branch (hippocampus's) and the surprise of each token as it leaves the window:
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


def eidetic_sets(surprise, window, eidetic):
    """`sets[b][t]`: the eidetic tokens of query t, in position order: the `eidetic` tokens
    j <= t - window with the largest surprise, ties to the larger j (none when window = 0)."""
    B, T = surprise.shape
    ranked = lambda b, t: sorted(range(t - window + 1) if window else (),  # noqa: E731
                                 key=lambda j: (surprise[b, j], j), reverse=True)
    return [[sorted(ranked(b, t)[:eidetic]) for t in range(T)] for b in range(B)]


def bmojo_np(p, x, *, num_heads, window, eidetic, memory):
    """B'MOJO: `y = W_o attention + memory branch` (`fading_memory_np`), where query t attends
    in one softmax to the window tokens (t - window, t] (all tokens when window = 0) and to its
    eidetic set (`eidetic_sets`), with the fused q/k/v projection of `attention`."""
    memory_branch, surprise = fading_memory_np(p, x, num_heads=num_heads, window=window,
                                               memory=memory)
    sets = eidetic_sets(surprise, window, eidetic)
    B, T, d = x.shape
    qa, ka, va = fused_qkv(p["attention"]["qkv"], x, num_heads)
    w = d // num_heads
    attended = np.zeros_like(qa)
    for b in range(B):
        for t in range(T):
            first = max(0, t - window + 1) if window else 0
            chosen = sets[b][t] + list(range(first, t + 1))
            logits = np.einsum("hw,shw->hs", qa[b, t], ka[b, chosen]) / np.sqrt(w)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            attended[b, t] = np.einsum("hs,shw->hw", weights, va[b, chosen])
    return dense(p["attention"]["out"], attended.reshape(B, T, d)) + memory_branch


ORACLES = {"bmojo": bmojo_np}
