"""Mamba-2's SSD (state-space duality) core as the linear-attention kernels of
``kernels/linear_attention.py``.

Per head h (one group: every head reads the same Bm and Cm)::

    S_t[h] = exp(dt_t[h] A[h]) S_{t-1}[h] + dt_t[h] Bm_t x_t[h]^T        # S [N, P]
    y_t[h] = S_t[h]^T Cm_t + Dskip[h] x_t[h]

is decayed linear attention with q = Cm and k = Bm (broadcast over the heads), v = dt x, a
per-head log decay g = dt A, scale 1 and initial state S_0, plus the skip term. Shapes: x
``[B, T, H, P]``, dt ``[B, T, H]`` (> 0), A ``[H]`` (<= 0), Bm, Cm ``[B, T, N]``, Dskip ``[H]`` or
None, initial_state ``[B, H, N, P]`` or None. Returns (y ``[B, T, H, P]`` in x's dtype, final state
``[B, H, N, P]`` float32).

Gradients w.r.t. x, dt, A, Bm, Cm, Dskip and the initial state are JAX autodiff through this
mapping, with the kernel's ``custom_vjp`` inside (the sums over heads of dq, dk for the shared
Cm, Bm are the broadcasts' transposes). The broadcast materialises Cm and Bm per head (H times
their memory); a kernel that indexed one shared block for every head would avoid that but would
need a reduction over heads in its backward pass. Tiling rules and errors are the linear-attention
kernels' (N plays K, P plays V).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

import kernels
from kernels import common
from kernels.linear_attention import linear_attention_gpu, linear_attention_tpu

__all__ = ["ssd_tpu", "ssd_gpu"]


def _ssd(linear_attention, x, dt, A, Bm, Cm, Dskip, initial_state, chunk_size, interpret):
    Bsz, T, H, _ = x.shape
    heads = (Bsz, T, H, Bm.shape[-1])
    acc = jnp.promote_types(x.dtype, jnp.float32)
    dt_ = dt.astype(acc)
    o, final = linear_attention(
        jnp.broadcast_to(Cm[:, :, None, :], heads),  # q
        jnp.broadcast_to(Bm[:, :, None, :], heads),  # k
        (dt_[..., None] * x.astype(acc)).astype(x.dtype),  # v
        dt_ * A.astype(acc),  # per-head log decay g <= 0
        scale=1.0, initial_state=initial_state, chunk_size=chunk_size, interpret=interpret,
    )  # fmt: skip
    y = o.astype(acc)
    if Dskip is not None:
        y = y + Dskip.astype(acc)[:, None] * x.astype(acc)
    return y.astype(x.dtype), final


def ssd_tpu(x, dt, A, Bm, Cm, Dskip=None, *, initial_state=None, chunk_size=64, interpret=False):
    """SSD through ``linear_attention_tpu`` (see the module docstring)."""
    return _ssd(linear_attention_tpu, x, dt, A, Bm, Cm, Dskip, initial_state, chunk_size,
                interpret)


def ssd_gpu(x, dt, A, Bm, Cm, Dskip=None, *, initial_state=None, chunk_size=64, interpret=False):
    """SSD through ``linear_attention_gpu`` (see the module docstring)."""
    return _ssd(linear_attention_gpu, x, dt, A, Bm, Cm, Dskip, initial_state, chunk_size,
                interpret)


kernels.register("ssd", platform="tpu")(functools.partial(ssd_tpu, interpret=False))
kernels.register("ssd", platform="gpu")(functools.partial(ssd_gpu, interpret=False))
kernels.register("ssd", platform="cpu")(
    functools.partial(ssd_tpu, interpret=common.interpret("cpu")))
