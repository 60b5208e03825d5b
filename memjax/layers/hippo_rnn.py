"""HiPPO-RNN (Gu et al. 2020, section 4): a GRU whose memory is the online HiPPO projection of a
learned scalar feature of its hidden state."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax import hippo
from memjax.layers import initializers
from memjax.layers.registry import MIXERS


def check_memory_options(measure: str, method: str, legs_step: str, theta: float) -> None:
    """Clear errors for bad options (also reached from the layer at trace time)."""
    if measure not in hippo.MEASURES:
        raise ValueError(f"unknown HiPPO measure {measure!r}; known measures: {', '.join(hippo.MEASURES)}")
    if method not in hippo.DISCRETIZATIONS:
        raise ValueError(f"unknown discretization {method!r}; known: {', '.join(hippo.DISCRETIZATIONS)}")
    if legs_step not in hippo.LEGS_STEPS:
        raise ValueError(f"unknown LegS step {legs_step!r}; known: {', '.join(hippo.LEGS_STEPS)}")
    if not theta > 0:
        raise ValueError(f"theta (window length in tokens) must be > 0, got {theta!r}")


def memory_update(c, f, position, *, measure: str = "legs", method: str = "bilinear",
                  legs_step: str = "log", theta: float = 64.0):
    """One HiPPO memory step: ``c_t = Ad_t c_{t-1} + Bd_t f_t``, per memory channel.

    c: ``[B, M, N]`` coefficients (M memory channels of order N); f: ``[B, M]`` the memory input;
    position: int scalar, the 0-based absolute position of this token (LegS's sample index k).
    legs: ``(Ad_t, Bd_t) = memjax.hippo.legs_step_matrices(position, N, method, legs_step)``,
    formed here from A and B with one triangular solve (A is lower triangular) for the implicit
    methods and a matrix exponential for zoh. Translated measures (legt, lmu, lagt, fout): the
    constant ``discretize(-A, B, 1, method)`` of the measure with a window of ``theta`` tokens.
    Computes in c's dtype; returns the new c ``[B, M, N]``.
    """
    check_memory_options(measure, method, legs_step, theta)
    n, dtype = c.shape[-1], c.dtype
    fb = f[..., None].astype(dtype)
    if measure != "legs":
        A, B = hippo.transition(measure, n, theta)
        Ad, Bd = hippo.discretize(-A, B, 1.0, method)
        return c @ jnp.asarray(Ad.T, dtype) + fb * jnp.asarray(Bd, dtype)

    A_np, B_np = hippo.transition("legs", n)
    A, B, eye = jnp.asarray(A_np, dtype), jnp.asarray(B_np, dtype), jnp.eye(n, dtype=dtype)
    k = jnp.asarray(position).astype(dtype)
    # The step length in the frozen-1/t ("paper") or log-time ("log") form; k = 0 is finite in
    # the first and handled exactly below in the second (max keeps the unused branch finite).
    h = 1.0 / (k + 1.0) if legs_step == "paper" else jnp.log1p(1.0 / jnp.maximum(k, 1.0))
    if method == "forward_euler":
        new = c - h * (c @ A.T) + h * fb * B
    elif method in ("backward_euler", "bilinear"):
        half = 1.0 if method == "backward_euler" else 0.5
        rhs = c + h * fb * B if method == "backward_euler" else c - (h / 2) * (c @ A.T) + h * fb * B
        lhs = eye + (half * h) * A
        flat = rhs.reshape(-1, n).T  # [N, B * M]
        new = jax.scipy.linalg.solve_triangular(lhs, flat, lower=True).T.reshape(c.shape)
    else:  # zoh: Ad = exp(-h A), Bd = (h A)^-1 (I - Ad) h B = (I - Ad) e_0, as A e_0 = B
        Ad = jax.scipy.linalg.expm(-h * A)
        new = c @ Ad.T + fb * (eye[0] - Ad[:, 0])
    if legs_step == "log":
        new = jnp.where(jnp.asarray(position) == 0, fb * eye[0], new)
    return new


class _HiPPOCell(nn.Module):
    """One token: ``h_t = GRU(h_{t-1}, [x_t, c_{t-1}])``, ``f_t = W_f h_t``, ``c_t = memory_update``."""

    hidden: int
    memory_options: dict

    @nn.compact
    def __call__(self, carry, x_t):
        h, c, position = carry
        inputs = jnp.concatenate([x_t, c.reshape(c.shape[0], -1)], axis=-1)
        h, _ = nn.GRUCell(self.hidden, name="gru")(h, inputs)
        f = nn.Dense(c.shape[1], use_bias=False, name="memory_in")(h)
        c = memory_update(c, f, position, **self.memory_options)
        return (h, c, position + 1), jnp.concatenate([h, c.reshape(c.shape[0], -1)], axis=-1)


@MIXERS.register("hippo_rnn")
class HiPPORNN(nn.Module):
    """HiPPO-RNN mixer: a GRU with a HiPPO memory, ``[B, T, d_model]`` in and out.

    Per token t (absolute position p):
        h_t = GRU(h_{t-1}, [x_t, c_{t-1}])         (flax GRUCell, ``hidden`` units)
        f_t = W_f h_t                              (``memory_channels`` scalars)
        c_t = Ad_p c_{t-1} + Bd_p f_t               (per channel, ``order`` coefficients; memory_update)
        y_t = W_o [h_t, c_t]
    LegS (default) is timescale-free: its step depends on p, so the cache carries the position.
    ``measure`` may also be a translated one (legt, lmu, lagt, fout) with a window of ``theta``
    tokens. A nonlinear RNN has no parallel form: one ``lax.scan`` (``nn.scan``) over T; a decoding
    step is the same scan with T = 1. Computes in float32. Cache ``{"h": [B, hidden],
    "c": [B, memory_channels, order], "position": int32 []}``.
    """

    d_model: int
    hidden: int = 64
    order: int = 32
    memory_channels: int = 1
    measure: str = "legs"
    theta: float = 64.0
    method: str = "bilinear"
    legs_step: str = "log"

    def _memory_options(self) -> dict:
        check_memory_options(self.measure, self.method, self.legs_step, self.theta)
        return dict(measure=self.measure, method=self.method, legs_step=self.legs_step,
                    theta=float(self.theta))

    @nn.compact
    def __call__(self, x, cache=None):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"hippo_rnn expects x [B, T, {self.d_model}], got shape {x.shape}")
        options = self._memory_options()
        state = self.init_cache(x.shape[0], x.shape[1]) if cache is None else cache
        carry = (state["h"], state["c"], state["position"])
        scan = nn.scan(_HiPPOCell, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=1, out_axes=1)
        carry, features = scan(self.hidden, options, name="cell")(carry, x.astype(jnp.float32))
        y = initializers.dense_out(self.d_model, name="out", bias=True)(features).astype(x.dtype)
        if cache is None:
            return y
        return y, {"h": carry[0], "c": carry[1], "position": carry[2]}

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        return {"h": jnp.zeros((batch_size, self.hidden), jnp.float32),
                "c": jnp.zeros((batch_size, self.memory_channels, self.order), jnp.float32),
                "position": jnp.zeros((), jnp.int32)}
