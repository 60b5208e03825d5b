"""S5: one MIMO diagonal complex SSM shared by all channels (Smith et al., 2023), by parallel scan."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memjax.layers.registry import MIXERS
from memjax.layers.s4d import (
    check_even_state_dim,
    complex_param,
    eigenvalue_params,
    gelu_glu_output,
    legs_eigen,
    log_dt_init,
)
from memjax.ops import s5, s5_step


def s5_modes(state_dim: int, conj_sym: bool) -> int:
    """Complex modes kept: state_dim / 2 with conjugate symmetry (one per pair), else state_dim."""
    half = check_even_state_dim("state_dim", state_dim)
    return half if conj_sym else state_dim


def projected_init(proj, fan_in: int, shape: tuple, on_right: bool):
    """Initializer of a complex ``[..., 2]`` parameter: a real lecun-normal matrix in HiPPO's
    basis, projected onto the eigenbasis (``V^-1 B`` for B, ``C V`` for C)."""
    def init(key, pair_shape):
        del pair_shape
        real = jax.random.normal(key, shape, jnp.float32) * fan_in**-0.5
        p = jnp.asarray(proj, jnp.complex64)
        out = real @ p if on_right else p @ real
        return jnp.stack([out.real, out.imag], axis=-1)
    return init


@MIXERS.register("s5")
class S5(nn.Module):
    """S5: a single state of ``state_dim`` (P) complex-diagonal modes shared by the ``H =
    d_model`` channels,

        x_t = Lambda_bar x_{t-1} + B_bar u_t  (B [P, H]),   y_t = 2 Re(C x_t) + D u_t  (C [H, P]),

    ZOH discretisation (``discretization``) with one learned step per mode, evaluated by
    ``memjax.ops.s5`` (``impl="auto"``: the associative scan); then GELU and a GLU output linear. HiPPO-N initialisation:
    Lambda and V are the eigenvalues and eigenvectors of HiPPO-LegS's normal part
    (``memjax.hippo.nplr("legs", P)``); B and C are drawn real (lecun normal) in HiPPO's basis
    and projected, ``B~ = V^-1 B``, ``C~ = C V``. ``conj_sym=True`` keeps one mode of each
    conjugate pair (P/2 modes, output ``2 Re(C~ x)``); False keeps all P (output ``Re(C~ x)``).
    ``log dt`` uniform in ``[log 1e-3, log 1e-1]`` per mode; D standard normal.
    ``[B, T, d_model]`` in and out; decoding cache ``{"state": [B, modes] complex64}``.
    """

    d_model: int
    state_dim: int = 64
    conj_sym: bool = True
    discretization: str = "zoh"
    impl: str = "auto"
    chunk_size: int = 128

    @nn.compact
    def __call__(self, x, cache=None):
        H, P = self.d_model, self.state_dim
        modes = s5_modes(P, self.conj_sym)
        w, V = legs_eigen(P)
        V_inv = np.linalg.inv(V)
        Lambda = eigenvalue_params(self, w[:modes], (modes,))
        B = complex_param(self, "B", projected_init(V_inv[:modes], H, (P, H), False), (modes, H))
        C = complex_param(self, "C", projected_init(V[:, :modes], P, (H, P), True), (H, modes))
        log_dt = self.param("log_dt", log_dt_init((modes,)))
        D = self.param("D", nn.initializers.normal(1.0), (H,))
        u = x.astype(jnp.float32)
        kwargs = dict(discretization=self.discretization, conj_sym=self.conj_sym)
        state = None if cache is None else cache["state"]
        if state is not None and x.shape[1] == 1:
            y, state = s5_step(u[:, 0], state, Lambda, B, C, log_dt, D, **kwargs)
            y = y[:, None]
        else:
            y, state = s5(u, Lambda, B, C, log_dt, D, initial_state=state, impl=self.impl,
                          chunk_size=self.chunk_size, **kwargs)
        y = gelu_glu_output(y, self.d_model).astype(x.dtype)
        return y if cache is None else (y, {"state": state.astype(jnp.complex64)})

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        modes = s5_modes(self.state_dim, self.conj_sym)
        return {"state": jnp.zeros((batch_size, modes), jnp.complex64)}
