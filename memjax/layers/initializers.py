"""Parameter initialisers shared by several mixers."""

import math

import jax
import jax.numpy as jnp


def dt_bias_init(dt_min: float, dt_max: float):
    """Bias whose softplus is a time step log-uniform in [dt_min, dt_max] (Mamba's dt init).

    Inverse softplus: ``b = dt + log(-expm1(-dt))``, so ``softplus(b) = dt``. dt is floored at
    1e-4 as in Mamba, which only matters for dt_min below that.
    """

    def init(key, shape, dtype=jnp.float32):
        log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
        return dt + jnp.log(-jnp.expm1(-dt))

    return init
