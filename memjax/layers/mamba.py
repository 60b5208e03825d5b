"""Mamba (Gu & Dao 2023): the selective-SSM block, with polarized channels and mimetic init."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers.conv import ShortConv
from memjax.layers.initializers import dt_bias_init
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops import selective_scan, selective_scan_step

INITIALIZATIONS = ("default", "mimetic")
# Mimetic init multiplies the default decay rates -A by this (A_log shifted by log 0.01), so that
# with dt <= 0.1 every per-token decay exp(dt A) starts above exp(-0.1 * 0.16) ~ 0.984 (N = 16).
MIMETIC_A_SCALE = 1e-2


def check_initialization(value: str) -> None:
    if value not in INITIALIZATIONS:
        raise ValueError(f"initialization must be one of {INITIALIZATIONS}, got {value!r}")


def tie_columns(base_init, source: slice, target: slice):
    """A kernel initializer: ``base_init``, then the ``target`` columns set equal to ``source``.

    Mimetic init uses it to start with W_C = W_B, so that ``C_t . B_s = u_t^T W^T W u_s`` is a
    positive semi-definite "attention" score, as ``q . k`` with W_Q = W_K.
    """

    def init(key, shape, dtype=jnp.float32):
        w = base_init(key, shape, dtype)
        return w.at[..., target].set(w[..., source])

    return init


def polarize(items, zero_index: int = 1):
    """Drop position ``zero_index`` (the polarized a_t = 0 channel) from the last axis."""
    return jnp.concatenate([items[..., :zero_index], items[..., zero_index + 1 :]], axis=-1)


@MIXERS.register("mamba")
class Mamba(nn.Module):
    """The Mamba block: ``[B, T, d_model]`` in and out.

    With ``E = expand * d_model`` inner channels and N = ``state_dim`` states per channel::

        u, z   = split(W_in x)                      # [B, T, E] each
        u      = silu(causal depthwise conv(u))     # ShortConv, kernel conv_size
        dt_low, Bm, Cm = split(W_x u)               # [B, T, R], [B, T, N], [B, T, N]
        dt     = softplus(W_dt dt_low + b_dt)       # [B, T, E], R = ceil(d_model / 16)
        y      = selective_scan(u, dt, A, Bm, Cm, Dskip)    # A = -exp(A_log), [E, N]
        out    = W_out (y * silu(z))

    Default init: ``A[d, n] = -(n + 1)`` (S4D-real), ``Dskip = 1``, ``b_dt`` such that
    ``softplus(b_dt)`` is log-uniform in ``[dt_min, dt_max] = [1e-3, 1e-1]``, ``W_dt`` uniform in
    ``+-R^-0.5``, ``W_in`` and ``W_x`` uniform in ``+-fan_in^-0.5`` (``initializers.ssm_input``:
    PyTorch's Linear default, kept by mamba_ssm), ``W_out`` the reference output init.

    ``polarized`` (Wang et al. 2025, recency and over-smoothing): for every channel d, state
    index 0 has a fixed transition ``a_t = 1`` (log decay 0: it never forgets) and index 1 has
    ``a_t = 0`` (it holds only the current token). Neither is a parameter; A_log covers indices
    2..N-1. Index 0 goes through the scan with ``A = 0`` exactly; index 1 needs no recurrence
    (its state is ``dt_t Bm_t[1] u_t``), so its output ``Cm_t[1] Bm_t[1] dt_t u_t`` is added
    directly and the cached scan state holds the other N - 1 indices. (Passing ``A = -inf``
    through the scan would also give ``a_t = 0`` but NaN gradients w.r.t. dt.)

    ``initialization="mimetic"`` (Trockman et al. 2024; the option is not called ``init``, which
    would shadow ``nn.Module.init``): the layer starts close to linear attention. Our choices:
    (1) decays near 1: ``-A`` is the default S4D-real init times ``MIMETIC_A_SCALE = 0.01`` (so
    ``-A[d, n] = 0.01 (n + 1)``), with the default dt range, giving ``exp(dt A) >= 0.984`` for
    N = 16 when dt <= 0.1; (2) ``W_C = W_B`` at init (the C columns of ``W_x`` copy its B
    columns), so ``Cm_t . Bm_s`` is a PSD score like ``q . k`` with tied query/key maps. Both
    are only initial values; everything stays trainable.

    Decoding cache: ``{"conv": [B, conv_size - 1, E], "ssm": [B, E, N']}`` with ``N' = N``
    (``N - 1`` when polarized). ``impl`` and ``chunk_size`` go to ``selective_scan``.
    """

    own_short_conv = True  # the block adds no short convolution in front (not a field)

    d_model: int
    expand: int = 2
    state_dim: int = 16
    conv_size: int = 4
    dt_rank: int = 0  # 0: ceil(d_model / 16)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    polarized: bool = False
    initialization: str = "default"
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        self._check_options()
        E, N, R = self._inner(), self.state_dim, self._dt_rank()
        in_proj = nn.Dense(2 * E, use_bias=False, kernel_init=initializers.ssm_input(), name="in_proj")
        u, z = jnp.split(in_proj(x), 2, axis=-1)
        conv = ShortConv(self.conv_size, name="conv")
        new_cache = {}
        if cache is None:
            u = conv(u)
        else:
            u, new_cache["conv"] = conv(u, cache["conv"])
        u = nn.silu(u)

        x_init = initializers.ssm_input()
        if self.initialization == "mimetic":
            x_init = tie_columns(x_init, slice(R, R + N), slice(R + N, R + 2 * N))
        proj = nn.Dense(R + 2 * N, use_bias=False, kernel_init=x_init, name="x_proj")(u)
        dt_low, Bm, Cm = (proj[..., :R], proj[..., R : R + N], proj[..., R + N :])
        dt = nn.Dense(E, kernel_init=initializers.symmetric_uniform(R**-0.5),
                      bias_init=dt_bias_init(self.dt_min, self.dt_max), name="dt_proj")(dt_low)
        dt = jax.nn.softplus(dt.astype(jnp.float32))
        Bm, Cm = Bm.astype(jnp.float32), Cm.astype(jnp.float32)
        A = self._A()
        Dskip = self.param("D", nn.initializers.ones, (E,))

        scan_B, scan_C = (polarize(Bm), polarize(Cm)) if self.polarized else (Bm, Cm)
        if self.is_mutable_collection("intermediates"):  # only when asked: [B, T, E, N] is big
            self._sow_decay(dt, A)
        state = None if cache is None else cache["ssm"]
        if state is not None and x.shape[1] == 1:
            y, state = selective_scan_step(u[:, 0], dt[:, 0], A, scan_B[:, 0], scan_C[:, 0], state,
                                           Dskip)
            y = y[:, None]
        else:
            y, state = selective_scan(u, dt, A, scan_B, scan_C, Dskip, initial_state=state,
                                      impl=self.impl, chunk_size=self.chunk_size)
        if self.polarized:  # the a_t = 0 index: its state is dt_t Bm_t[1] u_t, read by Cm_t[1]
            y = y + (Cm[..., 1:2] * Bm[..., 1:2] * dt * u).astype(y.dtype)
        self.sow("intermediates", "ssm_io", {"u": u, "dt": dt, "Bm": Bm, "Cm": Cm, "y": y})
        out = initializers.dense_out(self.d_model, name="out_proj")(y * nn.silu(z))
        if cache is None:
            return out
        return out, new_cache | {"ssm": state}

    def _A(self):
        """The A passed to the scan, ``[E, N']``: -exp(A_log), with a fixed 0 column if polarized."""
        E, N = self._inner(), self.state_dim
        learned = N - 2 if self.polarized else N
        scale = MIMETIC_A_SCALE if self.initialization == "mimetic" else 1.0
        first = 3 if self.polarized else 1  # S4D-real rates (n + 1) of the learned indices

        def a_log_init(key, shape, dtype=jnp.float32):
            del key
            rates = scale * jnp.arange(first, first + shape[1], dtype=dtype)
            return jnp.log(jnp.broadcast_to(rates, shape))

        A = -jnp.exp(self.param("A_log", a_log_init, (E, learned)))
        if self.polarized:
            A = jnp.concatenate([jnp.zeros((E, 1), A.dtype), A], axis=-1)  # a_t = exp(0) = 1
        return A

    def _sow_decay(self, dt, A):
        """Record the effective transition a_t ``[B, T, E, N]`` (what the layer computes with)."""
        decay = jnp.exp(dt[..., None] * A)
        if self.polarized:
            zero = jnp.zeros((*decay.shape[:-1], 1), decay.dtype)
            decay = jnp.concatenate([decay[..., :1], zero, decay[..., 1:]], axis=-1)
        self.sow("intermediates", "decay", decay)

    def _check_options(self) -> None:
        check_initialization(self.initialization)
        if self.polarized and self.state_dim < 3:
            raise ValueError(
                f"polarized Mamba needs state_dim >= 3 (indices 0 and 1 are fixed), got {self.state_dim}"
            )

    def _inner(self) -> int:
        return self.expand * self.d_model

    def _dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    def _scan_states(self) -> int:
        return self.state_dim - 1 if self.polarized else self.state_dim

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        E = self._inner()
        conv = ShortConv(self.conv_size, parent=None)
        return {"conv": conv.init_cache(batch_size, E),
                "ssm": jnp.zeros((batch_size, E, self._scan_states()), jnp.float32)}
