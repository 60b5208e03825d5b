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
from numpy_hybrids import fading_memory_np
from numpy_mixers import dense, fused_qkv


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
