"""S4D: one diagonal complex SSM per channel (Gu et al., 2022), applied by FFT convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memjax.hippo import nplr
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops import s4d, s4d_step

INITS = ("legs", "lin")


def check_even_state_dim(name: str, n: int) -> int:
    """The modes come in conjugate pairs, so a real state size must be even (n/2 complex modes)."""
    if n < 2 or n % 2:
        raise ValueError(f"{name} must be an even int >= 2 (n/2 conjugate-pair modes), got {n}")
    return n // 2


def legs_eigen(n: int):
    """Eigen-decomposition of HiPPO-LegS's normal part: ``(w [n], V [n, n])``.

    From ``memjax.hippo.nplr("legs", n)``: ``-A + P P^T = V diag(w) V^*`` with V unitary and
    ``Re w = -1/2`` (the state-matrix sign, stable). Sorted by decreasing imaginary part, so the
    first n/2 entries are one member of every conjugate pair (n even: the normal part is
    ``-1/2 I`` plus a real skew-symmetric matrix with no zero eigenvalue).
    """
    w, _, _, V = nplr("legs", n)
    w, V = np.asarray(w), np.asarray(V)
    if np.any(w.real >= 0):
        raise ValueError(f"HiPPO-LegS eigenvalues must have Re < 0, got max Re {w.real.max()}")
    order = np.argsort(-w.imag, kind="stable")
    return w[order], V[:, order]


def s4d_lin_eigenvalues(modes: int) -> np.ndarray:
    """S4D-Lin: ``Lambda_n = -1/2 + i pi n``, n = 0..modes-1."""
    return -0.5 + 1j * np.pi * np.arange(modes)


def initial_eigenvalues(init: str, modes: int) -> np.ndarray:
    """``modes`` complex eigenvalues (Re < 0) for the named initialisation."""
    if init == "lin":
        return s4d_lin_eigenvalues(modes)
    if init == "legs":
        return legs_eigen(2 * modes)[0][:modes]
    raise ValueError(f"unknown init {init!r}; known: {INITS}")


def eigenvalue_params(module: nn.Module, eigenvalues: np.ndarray, shape: tuple):
    """Parameters ``log_neg_re`` and ``im`` of ``shape`` (eigenvalues broadcast), and Lambda.

    ``Re Lambda = -exp(log_neg_re)`` stays negative whatever training does (stable modes).
    """
    eig = np.broadcast_to(eigenvalues, shape)
    log_neg_re = module.param("log_neg_re", lambda _: jnp.asarray(np.log(-eig.real), jnp.float32))
    im = module.param("im", lambda _: jnp.asarray(eig.imag, jnp.float32))
    return jax.lax.complex(-jnp.exp(log_neg_re), im)


def complex_param(module: nn.Module, name: str, init, shape: tuple):
    """A complex parameter stored as a float32 array ``shape + (2,)`` (real, imaginary), so
    optimizers and checkpoints see reals only."""
    pair = module.param(name, init, (*shape, 2))
    return jax.lax.complex(pair[..., 0], pair[..., 1])


def log_dt_init(shape: tuple, dt_min: float = 1e-3, dt_max: float = 1e-1):
    """``log dt`` uniform in ``[log dt_min, log dt_max]``."""
    def init(key):
        return jax.random.uniform(key, shape, jnp.float32, np.log(dt_min), np.log(dt_max))
    return init


def gelu_glu_output(y, d_model: int):
    """S4's output stage: GELU, then a linear map to 2 d_model and a GLU, ``a * sigmoid(b)``."""
    y = nn.gelu(y)
    a, b = jnp.split(initializers.dense_out(2 * d_model, name="out", bias=True)(y), 2, axis=-1)
    return a * jax.nn.sigmoid(b)


@MIXERS.register("s4d")
class S4D(nn.Module):
    """S4D: each of the ``H = d_model`` channels is a SISO diagonal SSM with ``state_dim / 2``
    complex modes (conjugate symmetry: real state size ``state_dim``),

        x_t = Lambda_bar x_{t-1} + B_bar u_t,   y_t = 2 Re(C x_t) + D u_t,

    discretised by ``discretization`` (ZOH default) with a per-channel step ``dt``; then GELU and
    a GLU output linear. ``lambda_init="legs"``: Lambda is the diagonal of HiPPO-LegS's normal part
    (``memjax.hippo.nplr``; S4D-LegS); ``"lin"``: S4D-Lin, ``Lambda_n = -1/2 + i pi n``.
    ``log dt`` uniform in ``[log 1e-3, log 1e-1]``, B = 1, C complex normal (unit variance), D = 1.
    ``impl``: ``"auto"`` (FFT convolution, the fastest form for training batches; see
    ``memjax.ops.diagonal_ssm``), ``"conv"``, ``"scan"`` or ``"reference"``.
    ``[B, T, d_model]`` in and out; decoding cache ``{"state": [B, H, state_dim / 2] complex64}``.
    """

    d_model: int
    state_dim: int = 64
    lambda_init: str = "legs"
    discretization: str = "zoh"
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        modes = check_even_state_dim("state_dim", self.state_dim)
        H = self.d_model
        Lambda = eigenvalue_params(self, initial_eigenvalues(self.lambda_init, modes), (H, modes))
        B = complex_param(self, "B", lambda _, s: jnp.ones(s, jnp.float32).at[..., 1].set(0.0),
                          (H, modes))
        C = complex_param(self, "C", nn.initializers.normal(0.5**0.5), (H, modes))
        log_dt = self.param("log_dt", log_dt_init((H,)))
        D = self.param("D", nn.initializers.ones, (H,))
        u = x.astype(jnp.float32)
        state = None if cache is None else cache["state"]
        if state is not None and x.shape[1] == 1:
            y, state = s4d_step(u[:, 0], state, Lambda, B, C, log_dt, D,
                                discretization=self.discretization)
            y = y[:, None]
        else:
            y, state = s4d(u, Lambda, B, C, log_dt, D, initial_state=state,
                           discretization=self.discretization, impl=self.impl)
        y = gelu_glu_output(y, self.d_model).astype(x.dtype)
        return y if cache is None else (y, {"state": state.astype(jnp.complex64)})

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        modes = check_even_state_dim("state_dim", self.state_dim)
        return {"state": jnp.zeros((batch_size, self.d_model, modes), jnp.complex64)}
