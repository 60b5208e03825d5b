"""Mamba-2 (Dao & Gu 2024): the SSD block, with polarized heads and mimetic init."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers.conv import ShortConv
from memjax.layers.heads import merge_heads, split_heads
from memjax.layers.initializers import dt_bias_init
from memjax.layers.mamba import MIMETIC_A_SCALE, check_initialization, tie_columns
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops import ssd, ssd_step


def _without_head_1(x, axis: int = 2):
    """Drop head 1 (the polarized a_t = 0 head) from the heads axis of x."""
    return jnp.delete(x, 1, axis=axis)


@MIXERS.register("mamba2")
class Mamba2(nn.Module):
    """The Mamba-2 block: ``[B, T, d_model]`` in and out.

    With ``E = expand * d_model`` inner channels in ``H = E / head_dim`` heads of width P and N =
    ``state_dim`` (one group: all heads share B and C)::

        z, xBC, dt_raw = split(W_in x)               # [B, T, E], [B, T, E + 2N], [B, T, H]
        x, Bm, Cm = split(silu(causal depthwise conv(xBC)))   # ShortConv, kernel conv_size
        dt     = softplus(dt_raw + b_dt)             # [B, T, H]
        y      = ssd(x, dt, A, Bm, Cm, Dskip)        # A = -exp(A_log), [H]: a scalar per head
        out    = W_out RMSNorm(y * silu(z))          # gated RMSNorm over the E channels

    Default init: ``-A`` uniform in [1, 16], ``Dskip = 1``, ``b_dt`` such that ``softplus(b_dt)``
    is log-uniform in ``[dt_min, dt_max] = [1e-3, 1e-1]``, ``W_in`` uniform in ``+-fan_in^-0.5``
    (``initializers.ssm_input``, as mamba_ssm keeps it), ``W_out`` the reference output init.

    ``polarized`` (Wang et al. 2025): head 0 has a fixed transition ``a_t = 1`` (A = 0: it never
    forgets) and head 1 has ``a_t = 0`` (it holds only the current token's ``dt Bm x^T``). Neither
    is a parameter; A_log covers heads 2..H-1, so H >= 3 is required. Head 1 needs no recurrence:
    its output ``(Cm_t . Bm_t) dt_t x_t + D x_t`` is computed directly and the cached SSD state
    holds the other H - 1 heads.

    ``initialization="mimetic"`` (Trockman et al. 2024; not called ``init``, which would shadow
    ``nn.Module.init``): start close to linear attention. Our choices: (1) decays near 1: ``-A``
    is the default draw times ``MIMETIC_A_SCALE = 0.01`` (in [0.01, 0.16]), default dt range, so
    ``exp(dt A) >= 0.984`` when dt <= 0.1; (2) ``W_C = W_B`` at init, both in the input
    projection and in the convolution taps of the B and C channels, so ``Cm_t = Bm_t`` exactly at
    init and ``Cm_t . Bm_s`` is a PSD score like ``q . k`` with tied maps. Only initial values.

    Decoding cache: ``{"conv": [B, conv_size - 1, E + 2N], "ssm": [B, H', N, P]}`` with
    ``H' = H`` (``H - 1`` when polarized). ``impl`` and ``chunk_size`` go to ``ssd``.
    """

    own_short_conv = True  # the block adds no short convolution in front (not a field)

    d_model: int
    expand: int = 2
    head_dim: int = 16
    state_dim: int = 16
    conv_size: int = 4
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    polarized: bool = False
    initialization: str = "default"
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        self._check_options()
        E, N, H = self._inner(), self.state_dim, self._heads()
        mimetic = self.initialization == "mimetic"
        in_init = initializers.ssm_input()
        if mimetic:
            in_init = tie_columns(in_init, slice(2 * E, 2 * E + N), slice(2 * E + N, 2 * E + 2 * N))
        proj = nn.Dense(2 * E + 2 * N + H, use_bias=False, kernel_init=in_init, name="in_proj")(x)
        z, xbc, dt_raw = proj[..., :E], proj[..., E : 2 * E + 2 * N], proj[..., 2 * E + 2 * N :]

        conv_cls = ShortConv
        if mimetic and self.is_initializing():
            conv_cls = nn.map_variables(ShortConv, "params", trans_out_fn=self._tie_conv_taps,
                                        init=True, mutable=True)
        conv = conv_cls(self.conv_size, name="conv")
        new_cache = {}
        if cache is None:
            xbc = conv(xbc)
        else:
            xbc, new_cache["conv"] = conv(xbc, cache["conv"])
        xbc = nn.silu(xbc)
        xs = split_heads(xbc[..., :E], H)  # [B, T, H, P]
        Bm = xbc[..., E : E + N].astype(jnp.float32)
        Cm = xbc[..., E + N :].astype(jnp.float32)

        dt_bias = self.param("dt_bias", dt_bias_init(self.dt_min, self.dt_max), (H,))
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + dt_bias)
        A = self._A()
        Dskip = self.param("D", nn.initializers.ones, (H,))
        if self.is_mutable_collection("intermediates"):  # only when asked: skip the exp otherwise
            self._sow_decay(dt, A)

        if self.polarized:
            scan_x, scan_dt, scan_D = _without_head_1(xs), _without_head_1(dt), _without_head_1(Dskip, 0)
        else:
            scan_x, scan_dt, scan_D = xs, dt, Dskip
        state = None if cache is None else cache["ssm"]
        if state is not None and x.shape[1] == 1:
            y, state = ssd_step(scan_x[:, 0], scan_dt[:, 0], A, Bm[:, 0], Cm[:, 0], state, scan_D)
            y = y[:, None]
        else:
            y, state = ssd(scan_x, scan_dt, A, Bm, Cm, scan_D, initial_state=state, impl=self.impl,
                           chunk_size=self.chunk_size)
        if self.polarized:  # head 1, a_t = 0: S_t = dt_t Bm_t x_t^T, read by Cm_t
            x1 = xs[:, :, 1]
            score = jnp.sum(Cm * Bm, axis=-1, keepdims=True) * dt[..., 1:2]
            y1 = (score * x1 + Dskip[1] * x1).astype(y.dtype)
            y = jnp.concatenate([y[:, :, :1], y1[:, :, None], y[:, :, 1:]], axis=2)
        self.sow("intermediates", "ssm_io", {"x": xs, "dt": dt, "Bm": Bm, "Cm": Cm, "y": y})
        y = merge_heads(y)
        y = nn.RMSNorm(name="norm")(y * nn.silu(z))
        out = initializers.dense_out(self.d_model, name="out_proj")(y)
        if cache is None:
            return out
        return out, new_cache | {"ssm": state}

    def _tie_conv_taps(self, variables):
        """Mimetic init: the conv taps of the C channels start equal to those of the B channels."""
        E, N = self._inner(), self.state_dim
        params = dict(variables.get("params", {}))
        if "weight" in params:
            w = params["weight"]
            params["weight"] = w.at[:, E + N :].set(w[:, E : E + N])
        return {**variables, "params": params}

    def _A(self):
        """The A passed to SSD, ``[H']``: -exp(A_log), with a fixed 0 for head 0 if polarized."""
        H = self._heads()
        learned = H - 2 if self.polarized else H
        scale = MIMETIC_A_SCALE if self.initialization == "mimetic" else 1.0

        def a_log_init(key, shape, dtype=jnp.float32):
            return jnp.log(scale * jax.random.uniform(key, shape, dtype, 1.0, 16.0))

        A = -jnp.exp(self.param("A_log", a_log_init, (learned,)))
        if self.polarized:
            A = jnp.concatenate([jnp.zeros((1,), A.dtype), A])  # head 0: a_t = exp(0) = 1
        return A

    def _sow_decay(self, dt, A):
        """Record the effective transition a_t ``[B, T, H]`` (what the layer computes with)."""
        if self.polarized:
            decay = jnp.exp(_without_head_1(dt) * A)
            zero = jnp.zeros((*decay.shape[:-1], 1), decay.dtype)
            decay = jnp.concatenate([decay[..., :1], zero, decay[..., 1:]], axis=-1)
        else:
            decay = jnp.exp(dt * A)
        self.sow("intermediates", "decay", decay)

    def _check_options(self) -> None:
        check_initialization(self.initialization)
        if self._inner() % self.head_dim:
            raise ValueError(
                f"expand * d_model = {self._inner()} is not divisible by head_dim {self.head_dim}"
            )
        if self.polarized and self._heads() < 3:
            raise ValueError(
                f"polarized Mamba-2 needs at least 3 heads (heads 0 and 1 are fixed), got "
                f"{self._heads()} (expand * d_model / head_dim)"
            )

    def _inner(self) -> int:
        return self.expand * self.d_model

    def _heads(self) -> int:
        return self._inner() // self.head_dim

    def _scan_heads(self) -> int:
        return self._heads() - 1 if self.polarized else self._heads()

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        conv = ShortConv(self.conv_size, parent=None)
        ssm = (batch_size, self._scan_heads(), self.state_dim, self.head_dim)
        return {"conv": conv.init_cache(batch_size, self._inner() + 2 * self.state_dim),
                "ssm": jnp.zeros(ssm, jnp.float32)}
