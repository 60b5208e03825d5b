"""Float64 NumPy oracles for every registered mixer's forward pass, from its Flax parameters.

Each `<kind>_np(p, x, **options)` takes the mixer's parameter tree `p` (the `params` collection
of `mixer.init`, converted with `to_np`) and an input `x [B, T, d_model]`, and returns the output
`[B, T, d_model]` in float64. They are written from the papers' recurrences, token by token, with
no JAX and nothing imported from memjax, so a wrong gate, a skipped normalisation or a missing
convolution in a layer shows up as a mismatch. Where a paper states the memory value-major
(`S [V, K]`, read as `S q`), the oracle keeps that layout while the layers use key-major
operators, so the two do not share a transposition mistake.

What the oracles take from the layers is only what the layers define and the papers leave open:
parameter names and the order of fused projections, the epsilons of the norms (Flax RMSNorm 1e-6,
L2 normalisation 1e-6 under the square root, the normaliser 1e-6 of Based, RWKV-7's GroupNorm
64e-5), the tanh form of Flax's GELU, and the `1 / sqrt(K)` read-out scale.
"""

import numpy as np
from scipy.linalg import expm
from scipy.special import erf

RMS_EPS = 1e-6
L2_EPS = 1e-6
BASED_EPS = 1e-6  # memjax.ops.linear_attention.NORMALIZER_EPS, added to scale * q . z
RWKV7_NORM_EPS = 64e-5


# ------------------------------------------------------------------------------------- helpers

def to_np(tree):
    """A parameter tree (nested dicts of arrays) as float64 NumPy arrays."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: to_np(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def dense(p, x):
    """Flax Dense: `x @ kernel (+ bias)`, kernel `[in, out]`."""
    return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def silu(z):
    return z * sigmoid(z)


def softplus(z):
    return np.logaddexp(0.0, z)


def gelu_tanh(z):
    """Flax's default GELU (the tanh approximation)."""
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


def rms_norm(x, scale):
    """`x / sqrt(mean(x^2) + eps) * scale` over the last axis."""
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + RMS_EPS) * scale


def l2_unit(x):
    return x / np.sqrt(np.sum(x**2, axis=-1, keepdims=True) + L2_EPS)


def causal_conv(p, x):
    """Depthwise causal convolution `y_t = b + sum_i w_i x_{t-i}` (taps `weight [W, C]`)."""
    y = np.broadcast_to(p["bias"], x.shape).copy()
    for t in range(x.shape[1]):
        for i in range(min(t + 1, p["weight"].shape[0])):
            y[:, t] += p["weight"][i] * x[:, t - i]
    return y


def heads(x, n):
    """`[B, T, n * w] -> [B, T, n, w]`."""
    return x.reshape(*x.shape[:-1], n, x.shape[-1] // n)


def fused_qkv(p, x, num_heads):
    """q, k, v `[B, T, H, w]` from one Dense whose output is `[q_h | k_h | v_h]` per head."""
    B, T, d = x.shape
    qkv = dense(p, x).reshape(B, T, num_heads, 3, d // num_heads)
    return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]


# ------------------------------------------------------------------------------ softmax attention

def attention_np(p, x, *, num_heads, window):
    """Causal multi-head softmax attention (Vaswani et al.), `window > 0`: the last W tokens.

    `o_t = sum_{s in [t - W + 1, t]} softmax_s(q_t . k_s / sqrt(w)) v_s`, then `W_out`. With
    persistent tokens (`p["persistent"]`, Titans' persistent memory) their keys and values, from
    the same projection, join every query's softmax whatever the window.
    """
    q, k, v = fused_qkv(p["qkv"], x, num_heads)
    B, T, _, w = q.shape
    if "persistent" in p:
        tokens = np.broadcast_to(p["persistent"], (B,) + p["persistent"].shape)
        _, k_p, v_p = fused_qkv(p["qkv"], tokens, num_heads)
    else:
        k_p, v_p = k[:, :0], v[:, :0]
    o = np.zeros_like(q)
    for t in range(T):
        start = max(0, t - window + 1) if window else 0
        keys = np.concatenate([k_p, k[:, start : t + 1]], axis=1)
        values = np.concatenate([v_p, v[:, start : t + 1]], axis=1)
        logits = np.einsum("bhw,bshw->bhs", q[:, t], keys) / np.sqrt(w)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        o[:, t] = np.einsum("bhs,bshw->bhw", weights, values)
    return dense(p["out"], o.reshape(B, T, -1))


# -------------------------------------------------------------------------- linear-attention family

def linear_attention_np(p, x, *, num_heads):
    """Katharopoulos et al. without a feature map: `S_t = S_{t-1} + v_t k_t^T` (value-major),
    `o_t = S_t q_t / sqrt(w)`, per-head RMSNorm, `W_out`."""
    q, k, v = fused_qkv(p["qkv"], x, num_heads)
    B, T, H, w = q.shape
    S = np.zeros((B, H, w, w))  # [value, key]
    o = np.zeros_like(v)
    for t in range(T):
        S = S + np.einsum("bhv,bhk->bhvk", v[:, t], k[:, t])
        o[:, t] = np.einsum("bhvk,bhk->bhv", S, q[:, t]) / np.sqrt(w)
    o = rms_norm(o, p["head_norm"]["scale"])
    return dense(p["out"], o.reshape(B, T, -1))


def based_np(p, x, *, num_heads, feature_dim, window, window_heads):
    """Based (Arora et al. 2024) as the attention it approximates, with no feature map at all:

    `o_t = sum_{s<=t} kappa(q_t, k_s) v_s / sum_{s<=t} kappa(q_t, k_s)`,
    `kappa(q, k) = 1 + s + s^2 / 2`, `s = q . k / sqrt(feature_dim)` (exp's Taylor expansion),
    then `W_out`; plus softmax attention over the last `window` tokens when `window > 0`. The
    layer's normaliser epsilon enters as `1e-6 sqrt(F)`, F the Taylor feature count.
    """
    B, T, _ = x.shape
    q = heads(dense(p["q"], x), num_heads)
    k = heads(dense(p["k"], x), num_heads)
    v = heads(dense(p["v"], x), num_heads)
    features = 1 + feature_dim + feature_dim * (feature_dim + 1) // 2
    o = np.zeros_like(v)
    for t in range(T):
        s = np.einsum("bhf,bshf->bhs", q[:, t], k[:, : t + 1]) / np.sqrt(feature_dim)
        kernel = 1.0 + s + s**2 / 2.0
        num = np.einsum("bhs,bshv->bhv", kernel, v[:, : t + 1])
        o[:, t] = num / (kernel.sum(-1)[..., None] + BASED_EPS * np.sqrt(features))
    y = dense(p["out"], o.reshape(B, T, -1))
    if window:
        y = y + attention_np(p["window"], x, num_heads=window_heads, window=window)
    return y


def base_conv_np(p, x, *, expand, conv_size):
    """BaseConv (Arora et al. 2024): `y = W_out(conv(W_u x) * (W_g x))`, with `conv` the causal
    depthwise convolution `c_t = b + sum_{i<conv_size} w_i u_{t-i}` over `expand * d` channels."""
    width = expand * x.shape[-1]
    u, g = dense(p["u"], x), dense(p["g"], x)
    assert u.shape[-1] == g.shape[-1] == width and p["conv"]["weight"].shape[0] == conv_size
    return dense(p["out"], causal_conv(p["conv"], u) * g)


def deltanet_np(p, x, *, num_heads, gated, allow_neg_eigval, head_size):
    """DeltaNet (Yang et al. 2024) / Gated DeltaNet (Yang et al. 2025), value-major as in the papers:

    q, k, v = silu(conv(W x)); q, k unit L2 norm per head; `beta = sigmoid(W_b x + b)` (x2 with
    negative eigenvalues); gated: `alpha = exp(-exp(A_log) softplus(W_a x + dt_bias))`.
    `S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T`, `o_t = S_t q_t / sqrt(w)`;
    per-head RMSNorm, times `silu(W_g x)` if gated, then `W_out`. Heads of width `head_size`
    (0: d / num_heads).
    """
    B, T, _ = x.shape
    w = head_size or x.shape[-1] // num_heads
    q, k, v = (heads(silu(causal_conv(p[f"conv_{n}"], dense(p[n], x))), num_heads) for n in "qkv")
    q, k = l2_unit(q), l2_unit(k)
    beta = sigmoid(dense(p["beta"], x)) * (2.0 if allow_neg_eigval else 1.0)  # [B, T, H]
    if gated:
        alpha = np.exp(-np.exp(p["A_log"]) * softplus(dense(p["a"], x) + p["dt_bias"]))
    else:
        alpha = np.ones_like(beta)
    S = np.zeros((B, num_heads, w, w))  # [value, key]
    o = np.zeros_like(v)
    eye = np.eye(w)
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = eye - bt * np.einsum("bhi,bhj->bhij", kt, kt)
        S = alpha[:, t, :, None, None] * (S @ transition) + bt * np.einsum("bhv,bhk->bhvk", v[:, t], kt)
        o[:, t] = np.einsum("bhvk,bhk->bhv", S, q[:, t]) / np.sqrt(w)
    o = rms_norm(o, p["head_norm"]["scale"]).reshape(B, T, num_heads * w)
    if gated:
        o = o * silu(dense(p["gate"], x))
    return dense(p["out"], o)


def gla_np(p, x, *, num_heads, expand_k, gate_normalizer, output_gate=True):
    """GLA (Yang et al. 2023): `S_t = diag(alpha_t) S_{t-1} + k_t^T v_t` (key-major, as in the
    paper), `o_t = q_t S_t / sqrt(K)`, `alpha_t = sigmoid(W_up W_down x_t + b)^(1 / normaliser)`;
    per-head RMSNorm times `silu(W_r x)` (when `output_gate`), then `W_out`."""
    B, T, d = x.shape
    key_width = int(expand_k * d / num_heads)
    q, k = (heads(dense(p[n], x), num_heads) for n in "qk")
    v = heads(dense(p["v"], x), num_heads)
    alpha = heads(sigmoid(dense(p["gate_up"], dense(p["gate_down"], x))) ** (1.0 / gate_normalizer),
                  num_heads)
    S = np.zeros((B, num_heads, key_width, d // num_heads))
    o = np.zeros_like(v)
    for t in range(T):
        S = alpha[:, t, :, :, None] * S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S) / np.sqrt(key_width)
    o = rms_norm(o, p["head_norm"]["scale"]).reshape(B, T, d)
    if output_gate:
        o = o * silu(dense(p["out_gate"], x))
    return dense(p["out"], o)


def retnet_np(p, x, *, num_heads, output_gate):
    """Retention (Sun et al. 2023) without xPos: `S_t = gamma_h S_{t-1} + k_t^T v_t`,
    `gamma_h = 1 - 2^(-5 - h)`, `o_t = q_t S_t / sqrt(w)`; per-head RMSNorm, times `silu(W_g x)`
    (when `output_gate`), then `W_out`."""
    B, T, d = x.shape
    q, k, v = (heads(dense(p[n], x), num_heads) for n in "qkv")
    w = d // num_heads
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(num_heads))
    S = np.zeros((B, num_heads, w, w))
    o = np.zeros_like(v)
    for t in range(T):
        S = gamma[:, None, None] * S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S) / np.sqrt(w)
    o = rms_norm(o, p["head_norm"]["scale"]).reshape(B, T, d)
    if output_gate:
        o = o * silu(dense(p["gate"], x))
    return dense(p["out"], o)


def rwkv7_np(p, x, *, num_heads):
    """RWKV-7 time mixing (Peng et al. 2025), in the paper's value-major form `S [V, K]`:

    token shift `x_c = x + (x_{t-1} - x) mu_c` for c in (r, w, k, v, a, g);
    `w = exp(-e^-1/2 sigmoid(w0 + W2 tanh(W1 x_w)))`, `a = sigmoid(a0 + W2 W1 x_a)` (in-context
    learning rate), `kappa = unit(k * k_k)` per head, `k~ = k * (1 + (a - 1) k_a)`;
    `S_t = S_{t-1} (diag(w_t) - kappa_t^T (a_t * kappa_t)) + v_t^T k~_t`, `o_t = S_t r_t`;
    per-token, per-head GroupNorm of o plus the bonus `(r . (rho * k~)) v`, times
    `W2 sigmoid(W1 x_g)`, then `W_out`.
    """
    B, T, d = x.shape
    H, w_ = num_heads, d // num_heads
    prev = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    mu = p["token_shift"]
    x_r, x_w, x_k, x_v, x_a, x_g = (x + (prev - x) * mu[i] for i in range(6))

    def lora(name, z, act):
        return dense(p[name]["up"], act(dense(p[name]["down"], z)))

    r = heads(dense(p["r"], x_r), H)
    k = dense(p["k"], x_k)
    v = heads(dense(p["v"], x_v), H)
    decay = heads(np.exp(-np.exp(-0.5) * sigmoid(p["w0"] + lora("w_lora", x_w, np.tanh))), H)
    lr = sigmoid(p["a0"] + lora("a_lora", x_a, lambda z: z))
    kappa = l2_unit(heads(k * p["k_k"], H))
    k_tilde = heads(k * (1.0 + (lr - 1.0) * p["k_a"]), H)
    lr = heads(lr, H)
    S = np.zeros((B, H, w_, w_))  # [value, key]
    o = np.zeros_like(v)
    for t in range(T):
        kap = kappa[:, t]
        transition = (np.einsum("bhi,ij->bhij", decay[:, t], np.eye(w_))
                      - np.einsum("bhi,bhj->bhij", kap, lr[:, t] * kap))
        S = S @ transition + np.einsum("bhv,bhk->bhvk", v[:, t], k_tilde[:, t])
        o[:, t] = np.einsum("bhvk,bhk->bhv", S, r[:, t])
    mean = o.mean(-1, keepdims=True)
    var = ((o - mean) ** 2).mean(-1, keepdims=True)
    o = ((o - mean) / np.sqrt(var + RWKV7_NORM_EPS)).reshape(B, T, d)
    o = o * p["head_norm"]["scale"] + p["head_norm"]["bias"]
    bonus = np.sum(r * k_tilde * p["r_k"], axis=-1, keepdims=True) * v
    gate = lora("g_lora", x_g, sigmoid)
    return dense(p["out"], (o + bonus.reshape(B, T, d)) * gate)


# ------------------------------------------------------------------------------- selective SSMs

def mamba_np(p, x, *, state_dim, polarized):
    """Mamba (Gu & Dao 2023): `u, z = W_in x`; `u = silu(conv(u))`; `[dt_low, B, C] = W_x u`;
    `dt = softplus(W_dt dt_low + b)`; per channel e and state n,
    `h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t`, `y_t = C_t . h_t + D u_t`, `A = -exp(A_log)`;
    `out = W_out (y * silu(z))`. Polarized (Wang et al. 2025): state 0 never decays (A = 0),
    state 1 keeps only the current token (A = -inf), A_log covers the rest."""
    E = p["D"].shape[0]
    u, z = np.split(dense(p["in_proj"], x), 2, axis=-1)
    u = silu(causal_conv(p["conv"], u))
    proj = dense(p["x_proj"], u)
    rank = proj.shape[-1] - 2 * state_dim
    dt = softplus(dense(p["dt_proj"], proj[..., :rank]))
    Bm, Cm = proj[..., rank : rank + state_dim], proj[..., rank + state_dim :]
    A = -np.exp(p["A_log"])
    if polarized:
        A = np.concatenate([np.zeros((E, 1)), np.full((E, 1), -np.inf), A], axis=-1)
    h = np.zeros((x.shape[0], E, state_dim))
    y = np.zeros_like(u)
    for t in range(x.shape[1]):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * Bm[:, t, None]
        y[:, t] = np.einsum("ben,bn->be", h, Cm[:, t]) + p["D"] * u[:, t]
    return dense(p["out_proj"], y * silu(z))


def mamba2_np(p, x, *, head_dim, state_dim, polarized):
    """Mamba-2 (Dao & Gu 2024), one group: `[z, xBC, dt_raw] = W_in x`;
    `[x, B, C] = silu(conv(xBC))`; `dt = softplus(dt_raw + dt_bias)`; per head h,
    `S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t x_t^T` (`[N, P]`), `y_t = S_t^T C_t + D_h x_t`;
    `out = W_out RMSNorm(y * silu(z))`. Polarized: head 0 A = 0, head 1 A = -inf."""
    B, T, _ = x.shape
    H = p["D"].shape[0]
    E, N = H * head_dim, state_dim
    proj = dense(p["in_proj"], x)
    z, xbc, dt_raw = proj[..., :E], proj[..., E : 2 * E + 2 * N], proj[..., 2 * E + 2 * N :]
    xbc = silu(causal_conv(p["conv"], xbc))
    xs, Bm, Cm = heads(xbc[..., :E], H), xbc[..., E : E + N], xbc[..., E + N :]
    dt = softplus(dt_raw + p["dt_bias"])
    A = -np.exp(p["A_log"])
    if polarized:
        A = np.concatenate([[0.0, -np.inf], A])
    S = np.zeros((B, H, N, head_dim))
    y = np.zeros_like(xs)
    for t in range(T):
        S = (np.exp(dt[:, t] * A)[..., None, None] * S
             + dt[:, t, :, None, None] * np.einsum("bn,bhp->bhnp", Bm[:, t], xs[:, t]))
        y[:, t] = np.einsum("bhnp,bn->bhp", S, Cm[:, t]) + p["D"][:, None] * xs[:, t]
    y = rms_norm(y.reshape(B, T, E) * silu(z), p["norm"]["scale"])
    return dense(p["out_proj"], y)


# --------------------------------------------------------------------------- diagonal LTI SSMs

def complex_pair(a):
    return a[..., 0] + 1j * a[..., 1]


def discretize(lam, dt, method):
    """`(Lambda_bar, B_bar / B)` of `x' = Lambda x + B u` over a step dt (ZOH or bilinear)."""
    if method == "zoh":
        lam_bar = np.exp(dt * lam)
        return lam_bar, (lam_bar - 1.0) / lam
    half = dt * lam / 2.0
    return (1.0 + half) / (1.0 - half), dt / (1.0 - half)


def glu_output(p, y):
    """S4's output stage: `a * sigmoid(b)` with `[a, b] = W gelu(y) + bias`."""
    a, b = np.split(dense(p["out"], gelu_tanh(y)), 2, axis=-1)
    return a * sigmoid(b)


def s4d_np(p, x, *, discretization):
    """S4D (Gu et al. 2022): per channel h and mode n, `x_t = Lbar x_{t-1} + Bbar u_t`,
    `y_t = 2 Re(sum_n C x_t) + D u_t` (modes stand for conjugate pairs), then the GLU output."""
    lam = -np.exp(p["log_neg_re"]) + 1j * p["im"]  # [H, M]
    lam_bar, b_gain = discretize(lam, np.exp(p["log_dt"])[:, None], discretization)
    b_bar, C = b_gain * complex_pair(p["B"]), complex_pair(p["C"])
    state = np.zeros((x.shape[0], *lam.shape), complex)
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        state = lam_bar * state + b_bar * x[:, t, :, None]
        y[:, t] = 2.0 * np.sum(C * state, axis=-1).real + p["D"] * x[:, t]
    return glu_output(p, y)


def s5_np(p, x, *, conj_sym, discretization):
    """S5 (Smith et al. 2023): one state of P complex modes shared by all channels,
    `x_t = Lbar x_{t-1} + Bbar u_t` (`B [P, H]`), `y_t = Re(C x_t) + D u_t` (twice the real part
    with conjugate symmetry), then the GLU output."""
    lam = -np.exp(p["log_neg_re"]) + 1j * p["im"]  # [P]
    lam_bar, b_gain = discretize(lam, np.exp(p["log_dt"]), discretization)
    b_bar, C = b_gain[:, None] * complex_pair(p["B"]), complex_pair(p["C"])
    state = np.zeros((x.shape[0], lam.shape[0]), complex)
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        state = lam_bar * state + x[:, t] @ b_bar.T
        y[:, t] = (2.0 if conj_sym else 1.0) * (state @ C.T).real + p["D"] * x[:, t]
    return glu_output(p, y)


# ------------------------------------------------------------------- nonlinear RNNs and HiPPO-RNN

def gru_cell_np(p, h, x):
    """Flax GRUCell: r, z = sigmoid(W_i x + b + W_h h); n = tanh(W_in x + b + r (W_hn h + b_hn))."""
    r = sigmoid(dense(p["ir"], x) + dense(p["hr"], h))
    z = sigmoid(dense(p["iz"], x) + dense(p["hz"], h))
    n = np.tanh(dense(p["in"], x) + r * dense(p["hn"], h))
    return (1 - z) * n + z * h


def lstm_cell_np(p, c, h, x):
    """Flax OptimizedLSTMCell: gates W_i x + W_h h + b; c' = f c + i g; h' = o tanh(c')."""
    gate = {g: dense(p["i" + g], x) + dense(p["h" + g], h) for g in "ifgo"}
    c = sigmoid(gate["f"]) * c + sigmoid(gate["i"]) * np.tanh(gate["g"])
    return c, sigmoid(gate["o"]) * np.tanh(c)


def gru_np(p, x, *, hidden):
    """`h_t = GRU(h_{t-1}, x_t)`, `y_t = W_o h_t + b`."""
    h, ys = np.zeros((x.shape[0], hidden)), []
    for t in range(x.shape[1]):
        h = gru_cell_np(p["cell"], h, x[:, t])
        ys.append(dense(p["out"], h))
    return np.stack(ys, axis=1)


def lstm_np(p, x, *, hidden):
    """`(c_t, h_t) = LSTM(c_{t-1}, h_{t-1}, x_t)`, `y_t = W_o h_t + b`."""
    c = h = np.zeros((x.shape[0], hidden))
    ys = []
    for t in range(x.shape[1]):
        c, h = lstm_cell_np(p["cell"], c, h, x[:, t])
        ys.append(dense(p["out"], h))
    return np.stack(ys, axis=1)


def legs_np(n):
    """HiPPO-LegS `(A, B)` of `c' = -A c + B f` (Gu et al. 2020): A lower triangular."""
    q = np.sqrt(2 * np.arange(n) + 1.0)
    return np.tril(np.outer(q, q), -1) + np.diag(np.arange(n) + 1.0), q


def legt_np(n, theta):
    """HiPPO-LegT `(A, B)` for a window of theta."""
    q = np.sqrt(2 * np.arange(n) + 1.0)
    i, j = np.indices((n, n))
    return np.outer(q, q) * np.where(j <= i, 1.0, (-1.0) ** (i - j)) / theta, q / theta


def step_np(A, B, h, method):
    """(Ad, Bd) for dc/dtau = -A c + B f over a step h, f held constant."""
    eye = np.eye(len(B))
    if method == "forward_euler":
        return eye - h * A, h * B
    if method == "backward_euler":
        inv = np.linalg.inv(eye + h * A)
        return inv, inv @ (h * B)
    if method == "bilinear":
        inv = np.linalg.inv(eye + h / 2 * A)
        return inv @ (eye - h / 2 * A), inv @ (h * B)
    E = expm(-h * A)
    return E, np.linalg.solve(A, (eye - E) @ B)


def memory_np(c, f, k, n, measure, method, legs_step, theta):
    """One HiPPO memory step at position k: c [B, M, N], f [B, M] -> new c."""
    if measure == "legt":
        Ad, Bd = step_np(*legt_np(n, theta), 1.0, method)
    elif legs_step == "log" and k == 0:
        Ad, Bd = np.zeros((n, n)), np.eye(n)[0]  # the history is the one sample: c = e_0 f
    else:
        h = 1 / (k + 1) if legs_step == "paper" else np.log(1 + 1 / k)
        Ad, Bd = step_np(*legs_np(n), h, method)
    return c @ Ad.T + f[..., None] * Bd


def hippo_rnn_np(params, x, *, hidden, order, memory_channels, measure="legs", method="bilinear",
                 legs_step="log", theta=64.0):
    """HiPPO-RNN (Gu et al. 2020, section 4): `h_t = GRU(h_{t-1}, [x_t, c_{t-1}])`,
    `f_t = W_f h_t`, `c_t = Ad_t c_{t-1} + Bd_t f_t`, `y_t = W_o [h_t, c_t] + b`."""
    B, T, _ = x.shape
    h, c, ys = np.zeros((B, hidden)), np.zeros((B, memory_channels, order)), []
    cell = params["cell"]
    for t in range(T):
        h = gru_cell_np(cell["gru"], h, np.concatenate([x[:, t], c.reshape(B, -1)], axis=-1))
        f = dense(cell["memory_in"], h)
        c = memory_np(c, f, t, order, measure, method, legs_step, theta)
        ys.append(dense(params["out"], np.concatenate([h, c.reshape(B, -1)], axis=-1)))
    return np.stack(ys, axis=1)


# ------------------------------------------------------------------------- test-time memory

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz (Jordan et al. 2024)


def gelu_erf(z):
    return 0.5 * z * (1.0 + erf(z / np.sqrt(2.0)))


def gelu_erf_slope(z):
    return 0.5 * (1.0 + erf(z / np.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)


def memory_mlp_grads(Ws, k, v):
    """The residual MLP memory `M(x) = W_L gelu(... gelu(W_1 x)) + x` (one matrix: `W k`; no
    residual when k and v differ in size) on one token: the gradient of `||M(k) - v||^2` for
    each matrix, by hand."""
    hs, zs = [k], []
    for W in Ws[:-1]:
        zs.append(W @ hs[-1])
        hs.append(gelu_erf(zs[-1]))
    out = Ws[-1] @ hs[-1] + (k if len(Ws) > 1 and k.shape == v.shape else 0.0)
    upstream = 2.0 * (out - v)
    grads = [None] * len(Ws)
    for l in range(len(Ws) - 1, -1, -1):
        grads[l] = np.outer(upstream, hs[l])
        if l:
            upstream = (Ws[l].T @ upstream) * gelu_erf_slope(zs[l - 1])
    return grads


def memory_read(Ws, x):
    h = x
    for W in Ws[:-1]:
        h = gelu_erf(W @ h)
    out = Ws[-1] @ h
    return out + (x if len(Ws) > 1 and x.shape == out.shape else 0.0)


def newton_schulz_np(X, steps=5):
    a, b, c = NS_COEFFS
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / (np.sqrt(np.sum(X * X)) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def polynomial_features_np(x, raw):
    """ATLAS's `phi(x) = [sqrt(c_0), sqrt(c_1) x, sqrt(c_2) vec(x x^T), ...]`, c = softplus(raw)."""
    c = softplus(raw)
    blocks, power = [np.sqrt(c[0]) * np.ones(x.shape[:-1] + (1,))], np.ones(x.shape[:-1] + (1,))
    for i in range(1, len(c)):
        power = (power[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)
        blocks.append(np.sqrt(c[i]) * power)
    return np.concatenate(blocks, axis=-1)


class MemoryNp:
    """One head's test-time memory, token by token: matrices `W_l` (linear: one; mlp: `depth`
    with exact-erf GELU between and a residual) trained on `||M(k) - v||^2` (summed), each
    gradient at the weights from the start of its `chunk`-token mini-batch (counted from the
    stream's start), over the Omega window of the last `window` tokens:
    gd `S = eta S + theta G, W = (1 - alpha) W - S`; muon `S = eta S + G,
    W = (1 - alpha) W - theta NS5(S)`; `store_and_read` returns `M(q_t)` after (or before) the
    token's store."""

    def __init__(self, weights, *, chunk, window, optimizer, retrieve):
        self.W = [w.copy() for w in weights]
        self.S = [np.zeros_like(w) for w in weights]
        self.base, self.history, self.t = None, [], 0
        self.chunk, self.window, self.optimizer, self.retrieve = chunk, window, optimizer, retrieve

    def read(self, q):
        return memory_read(self.W, q)

    def store_and_read(self, k, v, q, lr, keep, mom):
        if self.t % self.chunk == 0:
            self.base = [w.copy() for w in self.W]
        self.history = (self.history + [(k, v)])[-self.window:]
        G = [np.zeros_like(w) for w in self.W]
        for ki, vi in self.history:
            G = [g + gi for g, gi in zip(G, memory_mlp_grads(self.base, ki, vi))]
        before = [w.copy() for w in self.W]
        if self.optimizer == "gd":
            self.S = [mom * s + lr * g for s, g in zip(self.S, G)]
            self.W = [keep * w - s for w, s in zip(self.W, self.S)]
        else:
            self.S = [mom * s + g for s, g in zip(self.S, G)]
            self.W = [keep * w - lr * newton_schulz_np(s) for w, s in zip(self.W, self.S)]
        self.t += 1
        return memory_read(self.W if self.retrieve == "after" else before, q)


def memory_heads_np(p, num_heads, B, architecture, depth, **options):
    """`memories[b][h]`: one `MemoryNp` per batch row and head from `p["memory"]`."""
    names = ["w"] if architecture == "linear" else [f"w{l}" for l in range(depth)]
    return [[MemoryNp([p["memory"][n][h] for n in names], **options) for h in range(num_heads)]
            for _ in range(B)]


def memory_gates_np(p, y, max_lr, momentum):
    """`(theta, keep = 1 - alpha, eta)` `[B, T, H]` from `sigmoid(W y + b)`."""
    gate = {n: sigmoid(dense(p[n], y) + p[f"{n}_bias"]) for n in ("lr", "decay", "momentum")
            if n in p}
    eta = gate["momentum"] if momentum else np.zeros_like(gate["lr"])
    return max_lr * gate["lr"], 1.0 - gate["decay"], eta


def lmm_np(p, x, *, num_heads, architecture, depth, memory_chunk, omega_window, optimizer,
           momentum, retrieve, max_lr, feature_map):
    """Titans LMM (Behrouz et al. 2025): q, k, v = silu(conv(W x)), q and k unit L2 norm per
    head; `theta / max_lr, alpha, eta = sigmoid(W x + b)`; per head a `MemoryNp` stores every
    (k, v) and reads q. Then per-head RMSNorm, times `silu(W_g x)`, and `W_out`. Only the l2
    loss. `feature_map="polynomial"`: the memory sees ATLAS's features of the unit q and k."""
    B, T, d = x.shape
    q, k, v = (heads(silu(causal_conv(p[f"conv_{n}"], dense(p[n], x))), num_heads) for n in "qkv")
    q, k = l2_unit(q), l2_unit(k)
    if feature_map == "polynomial":
        q, k = (polynomial_features_np(a, p["feature_coeffs"]) for a in (q, k))
    lr, keep, eta = memory_gates_np(p, x, max_lr, momentum)
    memories = memory_heads_np(p, num_heads, B, architecture, depth, chunk=memory_chunk,
                               window=omega_window, optimizer=optimizer, retrieve=retrieve)
    o = np.zeros_like(v)
    for b in range(B):
        for h in range(num_heads):
            for t in range(T):
                o[b, t, h] = memories[b][h].store_and_read(k[b, t, h], v[b, t, h], q[b, t, h],
                                                           lr[b, t, h], keep[b, t, h],
                                                           eta[b, t, h])
    o = rms_norm(o, p["head_norm"]["scale"]).reshape(B, T, d)
    return dense(p["out"], o * silu(dense(p["gate"], x)))


def titans_mag_np(p, x, *, num_heads, architecture, depth, memory_chunk, omega_window, optimizer,
                  momentum, retrieve, max_lr, feature_map, window, attn_heads):
    """Titans MAG: `W_o (RMSNorm(SWA with persistent tokens (x)) * sigmoid(RMSNorm(LMM(x))))`."""
    y = attention_np(p["attention"], x, num_heads=attn_heads, window=window)
    m = lmm_np(p["memory"], x, num_heads=num_heads, architecture=architecture, depth=depth,
               memory_chunk=memory_chunk, omega_window=omega_window, optimizer=optimizer,
               momentum=momentum, retrieve=retrieve, max_lr=max_lr, feature_map=feature_map)
    gated = (rms_norm(y, p["attention_norm"]["scale"])
             * sigmoid(rms_norm(m, p["memory_norm"]["scale"])))
    return dense(p["out"], gated)


def titans_mac_np(p, x, *, num_heads, architecture, depth, memory_chunk, omega_window, optimizer,
                  momentum, retrieve, max_lr, segment, attn_heads, persistent_tokens):
    """Titans MAC (Behrouz et al. 2025, section 4.1), per segment S of `segment` tokens, in the
    paper's order: retrieve `h = M_{t-1}(q)` with `q = l2norm(silu(conv(W_r x)))` from the memory
    before the segment; attend causally over `[P || h || S]` (P always visible; `h_j`, `S_j`
    from position j); store the attention output y into the memory (q, k, v =
    silu(W y), q and k unit; gates from y), reading each token after its store; output
    `W_o (RMSNorm(y) * sigmoid(RMSNorm(read)))`."""
    B, T, d = x.shape
    ps = p["segment"]
    queries = l2_unit(heads(silu(causal_conv(p["conv_q"], dense(p["retrieve"], x))),
                            num_heads))
    memories = memory_heads_np(p, num_heads, B, architecture, depth, chunk=memory_chunk,
                               window=omega_window, optimizer=optimizer, retrieve=retrieve)
    if persistent_tokens:
        tokens = np.broadcast_to(ps["persistent"], (B,) + ps["persistent"].shape)
        _, k_p, v_p = fused_qkv(ps["qkv"], tokens, attn_heads)
    out = []
    for start in range(0, T, segment):
        xs, qs = x[:, start:start + segment], queries[:, start:start + segment]
        L = xs.shape[1]
        h = np.stack([np.stack([[memories[b][hd].read(qs[b, i, hd]) for hd in range(num_heads)]
                                for i in range(L)]) for b in range(B)]).reshape(B, L, d)
        q, k_s, v_s = fused_qkv(ps["qkv"], xs, attn_heads)
        _, k_h, v_h = fused_qkv(ps["qkv"], h, attn_heads)
        attended = np.zeros_like(q)
        for i in range(L):
            keys = [k_h[:, :i + 1], k_s[:, :i + 1]]
            values = [v_h[:, :i + 1], v_s[:, :i + 1]]
            if persistent_tokens:
                keys, values = [k_p] + keys, [v_p] + values
            keys, values = np.concatenate(keys, axis=1), np.concatenate(values, axis=1)
            logits = np.einsum("bhw,bshw->bhs", q[:, i], keys) / np.sqrt(q.shape[-1])
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            attended[:, i] = np.einsum("bhs,bshw->bhw", weights / weights.sum(-1, keepdims=True),
                                       values)
        y = dense(ps["attention_out"], attended.reshape(B, L, d))
        sq, sk, sv = (heads(silu(dense(ps[f"store_{n}"], y)), num_heads) for n in "qkv")
        sq, sk = l2_unit(sq), l2_unit(sk)
        lr, keep, eta = memory_gates_np(ps, y, max_lr, momentum)
        read = np.zeros_like(sv)
        for b in range(B):
            for hd in range(num_heads):
                for i in range(L):
                    read[b, i, hd] = memories[b][hd].store_and_read(
                        sk[b, i, hd], sv[b, i, hd], sq[b, i, hd], lr[b, i, hd], keep[b, i, hd],
                        eta[b, i, hd])
        read = rms_norm(read, ps["memory_norm"]["scale"]).reshape(B, L, d)
        gated = rms_norm(y, ps["attention_norm"]["scale"]) * sigmoid(read)
        out.append(dense(ps["out"], gated))
    return np.concatenate(out, axis=1)


# ------------------------------------------------------------------------ mixture of memories

def mom_routes_np(logits, top_k, capacity, renormalize=True):
    """Per token: the top-k softmax weights `[B, T, M]` (0 elsewhere; `renormalize`: rescaled to
    sum to 1), with memory m
    of the token at position t dropped once it has accepted `capacity * top_k * (t + 1) / M` of
    the earlier tokens (capacity > 0). Returns `(weights, selected, accepted)`."""
    B, T, M = logits.shape
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    selected = np.zeros((B, T, M), bool)
    weights = np.zeros((B, T, M))
    for b in range(B):
        for t in range(T):
            top = np.argsort(-probs[b, t], kind="stable")[:top_k]
            selected[b, t, top] = True
            weights[b, t, top] = probs[b, t, top]
            if renormalize:
                weights[b, t, top] /= probs[b, t, top].sum()
    accepted = selected.copy()
    if capacity > 0:
        for b in range(B):
            counts = np.zeros(M)
            for t in range(T):
                for m in range(M):
                    accepted[b, t, m] = selected[b, t, m] and counts[m] < capacity * top_k * (t + 1) / M
                    counts[m] += accepted[b, t, m]
    return np.where(accepted, weights, 0.0), selected, accepted


def mom_np(p, x, *, num_heads, num_memories, top_k, renormalize, shared_memory, capacity,
           memory):
    """Mixture of memories (Du et al. 2025), value-major, one memory at a time: route each token
    to its top-k memories (weights renormalised to sum to 1, or the probabilities themselves);
    memory m (own k, v, beta, decay projections; the shared query) updates only on its accepted
    tokens, `S = alpha S (I - beta k k^T) + beta v k^T` (gated_deltanet;
    alpha = 1 for deltanet), `S = S + v k^T` (linear_attention) or `S = S diag(alpha) + v k^T`
    (gla); `o_t = sum_m w_tm S_m q_t / sqrt(w)` plus the shared memory's read (every token);
    head RMSNorm, times `silu(W_g x)`, then `W_out`."""
    B, T, d = x.shape
    H, w = num_heads, d // num_heads
    slots = num_memories + int(shared_memory)
    weights, _, accepted = mom_routes_np(x @ p["router"]["kernel"], top_k, capacity, renormalize)
    weights = np.concatenate([weights, np.ones((B, T, slots - num_memories))], axis=-1)
    writes = np.concatenate([accepted, np.ones((B, T, slots - num_memories), bool)], axis=-1)
    q = l2_unit(heads(silu(causal_conv(p["conv_q"], dense(p["q"], x))), H))
    k_all, v_all = (silu(causal_conv(p[f"conv_{n}"], dense(p[n], x))) for n in "kv")
    if memory in ("gated_deltanet", "deltanet"):
        beta_all = sigmoid(dense(p["beta"], x))
    if memory == "gated_deltanet":
        pre = dense(p["a"], x).reshape(B, T, slots, H)
        alpha_all = np.exp(-np.exp(p["A_log"]) * softplus(pre + p["dt_bias"]))
    if memory == "gla":
        alpha_all = sigmoid(dense(p["gate_up"], dense(p["gate_down"], x))) ** (1.0 / 16.0)
    o = np.zeros((B, T, H, w))
    for m in range(slots):
        k = l2_unit(heads(k_all[..., m * d:(m + 1) * d], H))
        v = heads(v_all[..., m * d:(m + 1) * d], H)
        S = np.zeros((B, H, w, w))  # [value, key]
        for t in range(T):
            for b in range(B):
                if not writes[b, t, m]:
                    continue  # not routed here: the state does not move
                kt, vt = k[b, t], v[b, t]
                if memory in ("gated_deltanet", "deltanet"):
                    bt = beta_all[b, t, m * H:(m + 1) * H, None, None]
                    at = alpha_all[b, t, m, :, None, None] if memory == "gated_deltanet" else 1.0
                    S[b] = at * (S[b] @ (np.eye(w) - bt * np.einsum("hi,hj->hij", kt, kt))) \
                        + bt * np.einsum("hv,hk->hvk", vt, kt)
                elif memory == "gla":
                    at = heads(alpha_all[b, t, m * d:(m + 1) * d], H)
                    S[b] = S[b] * at[:, None, :] + np.einsum("hv,hk->hvk", vt, kt)
                else:
                    S[b] = S[b] + np.einsum("hv,hk->hvk", vt, kt)
                o[b, t] += weights[b, t, m] * np.einsum("hvk,hk->hv", S[b], q[b, t]) / np.sqrt(w)
    o = rms_norm(o, p["head_norm"]["scale"]).reshape(B, T, d)
    return dense(p["out"], o * silu(dense(p["gate"], x)))


ORACLES = {
    "attention": attention_np, "linear_attention": linear_attention_np, "based": based_np,
    "base_conv": base_conv_np,
    "deltanet": deltanet_np, "gated_deltanet": deltanet_np, "gla": gla_np, "retnet": retnet_np,
    "rwkv7": rwkv7_np, "mamba": mamba_np, "mamba2": mamba2_np, "s4d": s4d_np, "s5": s5_np,
    "hippo_rnn": hippo_rnn_np, "lstm": lstm_np, "gru": gru_np, "lmm": lmm_np,
    "titans_mag": titans_mag_np, "titans_mac": titans_mac_np, "mom": mom_np,
}
