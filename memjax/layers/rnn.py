"""LSTM and GRU baseline mixers (Flax's cells, scanned over time)."""

import flax.linen as nn
import jax.numpy as jnp

from memjax.layers import initializers
from memjax.layers.registry import MIXERS


def _check_input(name: str, x, d_model: int) -> None:
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{name} expects x [B, T, {d_model}], got shape {x.shape}")


def _scan(cell_cls, hidden: int, carry, x):
    """``lax.scan`` of a Flax cell over axis 1 of ``x [B, T, D]``: ``(final carry, h [B, T, hidden])``."""
    scan = nn.scan(cell_cls, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1)
    return scan(hidden, name="cell")(carry, x)


@MIXERS.register("lstm")
class LSTM(nn.Module):
    """LSTM mixer: ``nn.OptimizedLSTMCell`` (``hidden`` units) over the sequence, then ``W_o h_t``.

    ``[B, T, d_model]`` in and out; computes in float32. Cache = the cell's carry,
    ``{"c": [B, hidden], "h": [B, hidden]}``.
    """

    d_model: int
    hidden: int = 64

    @nn.compact
    def __call__(self, x, cache=None):
        _check_input("lstm", x, self.d_model)
        state = self.init_cache(x.shape[0], x.shape[1]) if cache is None else cache
        (c, h), hs = _scan(nn.OptimizedLSTMCell, self.hidden, (state["c"], state["h"]),
                           x.astype(jnp.float32))
        y = initializers.dense_out(self.d_model, name="out", bias=True)(hs).astype(x.dtype)
        return y if cache is None else (y, {"c": c, "h": h})

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        zeros = jnp.zeros((batch_size, self.hidden), jnp.float32)
        return {"c": zeros, "h": zeros}


@MIXERS.register("gru")
class GRU(nn.Module):
    """GRU mixer: ``nn.GRUCell`` (``hidden`` units) over the sequence, then ``W_o h_t``.

    ``[B, T, d_model]`` in and out; computes in float32. Cache = the cell's carry ``{"h": [B, hidden]}``.
    """

    d_model: int
    hidden: int = 64

    @nn.compact
    def __call__(self, x, cache=None):
        _check_input("gru", x, self.d_model)
        state = self.init_cache(x.shape[0], x.shape[1]) if cache is None else cache
        h, hs = _scan(nn.GRUCell, self.hidden, state["h"], x.astype(jnp.float32))
        y = initializers.dense_out(self.d_model, name="out", bias=True)(hs).astype(x.dtype)
        return y if cache is None else (y, {"h": h})

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        return {"h": jnp.zeros((batch_size, self.hidden), jnp.float32)}
