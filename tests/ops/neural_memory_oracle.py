"""An independent float64 oracle for memjax.ops.neural_memory (test-time memories), written from
the equations, with no code shared with memjax.

One batch item and head (tokens counted from the start of the stream; b = memory_chunk, c =
window; Wbar_t = the weights at the start of token t's mini-batch floor(t / b)):

    G_t = sum_{i = max(0, t-c+1) .. t} gamma_i * grad_W loss_i(Wbar_t)
    gd:   S_t = eta_t S_{t-1} + lr_t G_t;   W_t = (1 - decay_t) W_{t-1} - S_t
    muon: S_t = eta_t S_{t-1} + G_t;        W_t = (1 - decay_t) W_{t-1} - lr_t NS_k(S_t)
    no momentum: eta = 0;  S_0 = 0;  W_0 = params
    o_t = M_{W_t}(q_t) (retrieve "after") or M_{W_{t-1}}(q_t) (retrieve "before")

The memory M_W(x), x [K] (weights [out, in] per leaf):
    linear:    W x                                                  {"w": [V, K]}
    mlp:       h = x; h = act(w_l h) for l < L-1; out = w_{L-1} h (+ x if residual)
               {"w0": [hid, K], "w1": [hid, hid], ..., "w{L-1}": [V, hid]}, hid = expansion*K
    gated_mlp: out = down (act(gate x) * (up x)) (+ x if residual)
               {"gate": [hid, K], "up": [hid, K], "down": [V, hid]}
    act: exact (erf) GELU or SiLU x * sigmoid(x).

The per-token loss of the prediction p = M_W(k_i) with target v_i, r = p - v_i, summed over the V
outputs (reduction "mean" divides by V):
    l2: sum r^2;   dot: -sum p v;   huber: sum h(r), h(r) = r^2/2 if |r| <= delta else
    delta (|r| - delta/2);   lp: sum |r|^p.

NS_k(X), X [m, n]: work on X^T when m > n; X <- X / (||X||_F + 1e-7); k times: A = X X^T,
X <- a X + (b A + c A A) X with (a, b, c) = (3.4445, -4.7750, 2.0315); transpose back.

The loops over batch, head and token are plain Python; the weight updates, the Newton-Schulz
iteration and the outputs (apply_np, with scipy's erf) are NumPy float64. The per-token gradient
grad_W loss_i is jax.grad of this file's own loss (float64, jitted once per network and loss),
and ``linear_l2_gradient`` is the hand-derived 2 (W k - v) k^T for the linear memory with the l2
loss to check it against.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax.scipy.special import erf

NS_ABC = (3.4445, -4.7750, 2.0315)


# ---------------------------------------------------------------------------------------------
# The memory network and the loss (jnp, so that jax.grad can differentiate them)
# ---------------------------------------------------------------------------------------------


def activation(name, x):
    """Exact GELU 0.5 x (1 + erf(x / sqrt 2)), or SiLU x / (1 + exp(-x))."""
    if name == "gelu":
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if name == "silu":
        return x / (1.0 + jnp.exp(-x))
    raise ValueError(f"unknown activation {name!r}")


def memory_apply(spec, W, x):
    """M_W(x) for one head: W a dict of [out, in] matrices, x [K]; returns [V]."""
    if spec.architecture == "linear":
        return W["w"] @ x
    if spec.architecture == "gated_mlp":
        out = W["down"] @ (activation(spec.activation, W["gate"] @ x) * (W["up"] @ x))
    else:
        h = x
        for l in range(spec.depth - 1):
            h = activation(spec.activation, W[f"w{l}"] @ h)
        out = W[f"w{spec.depth - 1}"] @ h
    return out + x if spec.residual else out


def token_loss(spec, p, v):
    """The inner loss of prediction p [V] against target v [V]."""
    r = p - v
    if spec.loss == "l2":
        per = r * r
    elif spec.loss == "dot":
        per = -p * v
    elif spec.loss == "huber":
        d = spec.huber_delta
        a = jnp.abs(r)
        per = jnp.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d))
    elif spec.loss == "lp":
        per = jnp.abs(r) ** spec.lp
    else:
        raise ValueError(f"unknown loss {spec.loss!r}")
    total = jnp.sum(per)
    return total / p.shape[-1] if spec.reduction == "mean" else total


def _spec_key(spec):
    return (spec.architecture, spec.depth, spec.activation, spec.residual, spec.loss,
            spec.reduction, float(spec.huber_delta), float(spec.lp))


class _Net:
    """The fields of a spec that define the network and the loss (a hashable stand-in)."""

    def __init__(self, key):
        (self.architecture, self.depth, self.activation, self.residual, self.loss,
         self.reduction, self.huber_delta, self.lp) = key


_GRADS: dict = {}


def loss_gradient_fn(spec):
    """(W dict, k [K], v [V]) -> grad_W loss(M_W(k), v) as a dict of float64 NumPy arrays."""
    key = _spec_key(spec)
    if key not in _GRADS:
        net = _Net(key)
        grad = jax.jit(jax.grad(lambda W, k, v: token_loss(net, memory_apply(net, W, k), v)))

        def fn(W, k, v):
            with jax.enable_x64(True):
                g = grad({n: jnp.asarray(w, jnp.float64) for n, w in W.items()},
                         jnp.asarray(k, jnp.float64), jnp.asarray(v, jnp.float64))
                return {n: np.asarray(x, np.float64) for n, x in g.items()}

        _GRADS[key] = fn
    return _GRADS[key]


def linear_l2_gradient(W, k, v):
    """Hand-derived gradient of sum (W k - v)^2 w.r.t. W [V, K]: 2 (W k - v) k^T."""
    return 2.0 * np.outer(W @ k - v, k)


def _activation_np(name, x):
    if name == "gelu":
        return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))
    return x / (1.0 + np.exp(-x))


def apply_np(spec, W, x):
    """M_W(x) in float64 NumPy (the oracle's outputs; the same network as memory_apply)."""
    W = {n: np.asarray(w, np.float64) for n, w in W.items()}
    x = np.asarray(x, np.float64)
    if spec.architecture == "linear":
        return W["w"] @ x
    if spec.architecture == "gated_mlp":
        out = W["down"] @ (_activation_np(spec.activation, W["gate"] @ x) * (W["up"] @ x))
    else:
        h = x
        for l in range(spec.depth - 1):
            h = _activation_np(spec.activation, W[f"w{l}"] @ h)
        out = W[f"w{spec.depth - 1}"] @ h
    return out + x if spec.residual else out


# ---------------------------------------------------------------------------------------------
# Newton-Schulz
# ---------------------------------------------------------------------------------------------


def newton_schulz_oracle(X, steps=5, eps=1e-7):
    """NS_k(X) for one matrix X [m, n], float64 NumPy (see the module docstring)."""
    X = np.array(X, dtype=np.float64)
    assert X.ndim == 2
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (np.sqrt(np.sum(X * X)) + eps)
    a, b, c = NS_ABC
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if tall else X


# ---------------------------------------------------------------------------------------------
# The recurrence
# ---------------------------------------------------------------------------------------------


def neural_memory_oracle(q, k, v, lr, decay, momentum, gamma, params, spec):
    """Run the memory over a fresh stream, token by token, in float64.

    q, k [B, T, H, K]; v [B, T, H, V]; lr, decay, momentum (None: eta = 0; ignored when
    spec.momentum is False), gamma (None: ones) [B, T, H]; params: dict of [H, out, in] leaves.

    Returns (o [B, T, H, V], base, weights, momentum): the last three dicts of [B, H, out, in]
    leaves after the last token. ``base`` is the base point of the mini-batch the *next* token
    would belong to: W_T when T is a multiple of memory_chunk (a new mini-batch starts), else the
    weights at the start of the current (unfinished) mini-batch.
    """
    f = lambda x: None if x is None else np.asarray(x, dtype=np.float64)  # noqa: E731
    q, k, v, lr, decay, momentum, gamma = map(f, (q, k, v, lr, decay, momentum, gamma))
    params = {n: np.asarray(w, dtype=np.float64) for n, w in params.items()}
    B, T, H, _ = q.shape
    V = v.shape[-1]
    if gamma is None:
        gamma = np.ones((B, T, H))
    eta = momentum if (spec.momentum and momentum is not None) else np.zeros((B, T, H))
    b_size, c = spec.memory_chunk, spec.window
    grad = loss_gradient_fn(spec)
    names = list(params)

    o = np.zeros((B, T, H, V))
    out = {"base": {}, "weights": {}, "momentum": {}}
    for name in out:
        out[name] = {n: np.zeros((B, H, *params[n].shape[1:])) for n in names}

    for bi in range(B):
        for h in range(H):
            W = {n: params[n][h].copy() for n in names}
            S = {n: np.zeros_like(W[n]) for n in names}
            base = W
            cache = {}  # token index -> grad of its loss at the current base
            for t in range(T):
                if t % b_size == 0:
                    base = {n: W[n].copy() for n in names}
                    cache = {}
                G = {n: np.zeros_like(W[n]) for n in names}
                for i in range(max(0, t - c + 1), t + 1):
                    if i not in cache:
                        cache[i] = grad(base, k[bi, i, h], v[bi, i, h])
                    for n in names:
                        G[n] += gamma[bi, i, h] * cache[i][n]
                W_prev = W
                e, a, th = eta[bi, t, h], decay[bi, t, h], lr[bi, t, h]
                if spec.optimizer == "gd":
                    S = {n: e * S[n] + th * G[n] for n in names}
                    W = {n: (1.0 - a) * W[n] - S[n] for n in names}
                elif spec.optimizer == "muon":
                    S = {n: e * S[n] + G[n] for n in names}
                    W = {n: (1.0 - a) * W[n] - th * newton_schulz_oracle(S[n], spec.ns_steps)
                         for n in names}
                else:
                    raise ValueError(f"unknown optimizer {spec.optimizer!r}")
                read = W if spec.retrieve == "after" else W_prev
                o[bi, t, h] = apply_np(spec, read, q[bi, t, h])
            if T % b_size == 0:
                base = W
            for n in names:
                out["base"][n][bi, h] = base[n]
                out["weights"][n][bi, h] = W[n]
                out["momentum"][n][bi, h] = S[n]
    return o, out["base"], out["weights"], out["momentum"]


def linear_l2_decay_np(q, k, v, lr, decay, W0):
    """The linear memory, l2 loss, plain online GD (memory_chunk 1, window 1, no momentum),
    written out: W_t = (1 - a_t) W_{t-1} - 2 lr_t (W_{t-1} k_t - v_t) k_t^T, o_t = W_t q_t.

    W0 [H, V, K]. Returns (o [B, T, H, V], W_T [B, H, V, K]).
    """
    q, k, v, lr, decay, W0 = (np.asarray(x, np.float64) for x in (q, k, v, lr, decay, W0))
    B, T, H, _ = q.shape
    o = np.zeros(v.shape)
    W = np.broadcast_to(W0, (B, *W0.shape)).copy()
    for t in range(T):
        for bi in range(B):
            for h in range(H):
                w = W[bi, h]
                W[bi, h] = ((1.0 - decay[bi, t, h]) * w
                            - 2.0 * lr[bi, t, h] * np.outer(w @ k[bi, t, h] - v[bi, t, h],
                                                            k[bi, t, h]))
                o[bi, t, h] = W[bi, h] @ q[bi, t, h]
    return o, W
