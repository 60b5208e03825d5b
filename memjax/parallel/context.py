"""Context (sequence) parallelism for the recurrent operators: linear attention, the (gated) delta
rule and Mamba-2 SSD, with the sequence axis T split over one mesh axis.

Every recurrence here is affine in its state: over a stretch of tokens (one device's shard),
``S_end = M S_start + E`` with ``M`` the shard's transition (a decay per key channel for linear
attention / SSD, a ``K x K`` matrix for the delta rule) and ``E`` the state the shard reaches from a
zero state; every output is affine in ``S_start`` as well. So each device

1. runs the shard's chunk form once, from a known start state, getting its outputs, ``E`` and
   ``M`` (and what it needs to correct its outputs afterwards);
2. all-gathers the small per-shard ``(M, E)`` pairs along the sequence axis (``n (K K + K V)``
   numbers per head for the delta rule, ``n (K + K V)`` for the others: the sequence itself is
   never gathered) and folds them, ``S_{i+1} = M_i S_i + E_i`` from the global ``initial_state``
   at shard 0, to get its own true start state ``S_i`` (a loop of ``n`` tiny steps, done
   redundantly by every device) and the final state of the whole sequence (the fold of all
   shards, replicated);
3. corrects its outputs with ``S_i`` (one ``[L, K] x [K, V]`` product per head, no second pass).

Per operator:

- ``context_parallel_linear_attention`` (g None, per head ``[B, T, H]`` or per key channel
  ``[B, T, H, K]``; ``normalize`` too): with ``b_t`` the cumulative log decay from the shard's
  start, ``o_t += scale * S_i^T (exp(b_t) ⊙ q_t)`` and ``S_end = exp(b_L) ⊙ S_i + E``. Cost: the
  single-device chunk form on the shard plus an ``O(L H K V)`` correction: no extra pass. With
  ``normalize`` the op runs on ``[v, 1]`` without normalizing, the correction applies to both, and
  the division happens last (exactly what the op does internally).
- ``context_parallel_ssd``: the same through SSD's mapping to linear attention (q = Cm, k = Bm,
  v = dt x, g = dt A, scale 1); the skip ``Dskip x`` needs no correction. The shard runs
  ``memjax.ops.ssd`` itself.
- ``context_parallel_delta_rule``: the transition ``M = A_L ... A_1``, ``A_t = exp(g_t) (I -
  beta_t k_t k_t^T)``, is a full ``K x K`` matrix, and the correction of token t needs the prefix
  product ``P_t = A_t ... A_1``: ``o_t = o_t^0 + scale * S_i^T P_t^T q_t``. One call of the op
  gives all of it: the recurrence acts on each value column independently, so running the shard
  on values ``[v | 0_K]`` (width ``V + K``) from the initial state ``[0 | I_K]`` makes the first
  ``V`` state columns the zero-start state ``E`` and the last ``K`` the transition ``M``
  (``S_t = P_t I``), and the last ``K`` output columns ``w_t = scale P_t^T q_t``, so that
  ``o_t = o_t^0 + S_i^T w_t`` exactly. Cost versus the single-device op on the same tokens:
  one chunk pass of value width ``V + K`` instead of ``V`` (the value-width part of the chunk
  form, U, the sequential ``V_new`` / state updates and the outputs, doubles at ``K = V``; the
  UT transform, ``K K^T`` and ``Q K^T`` do not), plus the ``O(L H K V)`` correction, the
  ``K x K`` transitions in the gather (``n H K (K + V)`` numbers per batch row) and an ``n``-step
  fold of ``K x K`` by ``K x V`` products: about 1.3x-2x the flops of one pass in total (the
  scheme with a second pass from the true state would be about 3x). The backward pass is autodiff
  of the same, so it scales alike. It pays when the sequence per device, T / n, is long enough
  that the sequential chunk loop (T / (n C) steps instead of T / C) and the activation memory
  (1/n of the sequence per device, times (V + K) / V on the value-width buffers) dominate, not
  for short sequences, where the gather and the doubled value width are pure overhead.

Numerics: exact in exact arithmetic. ``b_t`` is a cumulative sum over the whole shard (the ops
sum within a chunk), so ``exp(b_t)`` has a relative error of about ``|b_t| * 6e-8`` in float32;
every exponent is ``<= 0`` (nothing overflows for ``g <= 0``). The delta rule's ``M`` and ``w``
come out of the same chunk form as its outputs, so they carry its error.

Sharding: ``axis`` is the mesh axis that splits T (``T % mesh.shape[axis] == 0`` is required;
each shard's length need not be a multiple of ``chunk_size``, the ops pad). ``batch_axis`` and
``head_axis`` optionally name mesh axes that split B and H (B, resp. H, must then be divisible by
their size); every other mesh axis replicates. Outputs come back split over T along ``axis`` (and
over B / H on their axes); the final state is replicated over ``axis``. The functions use
``jax.shard_map`` (``check_vma=False``, see ``_run``): they work eagerly and under ``jax.jit``,
and are differentiable (autodiff of the shard's op, the all-gather and the fold: forward and
backward equal the single-device op's up to rounding). Meshes with ``Auto`` axes (e.g.
``jax.sharding.Mesh(devices, names)`` or ``jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)``)
take inputs in any layout (the jitted caller reshards them); with ``Explicit`` axes
(``jax.make_mesh``'s default in this JAX) the inputs are resharded to the expected layout with
``jax.sharding.reshard`` first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from memjax.ops import delta_rule, linear_attention, ssd
from memjax.ops._common import acc_dtype, check_chunk_size, default_scale
from memjax.ops.delta_rule import _validate as _validate_delta_rule
from memjax.ops.linear_attention import NORMALIZER_EPS
from memjax.ops.linear_attention import _validate as _validate_linear_attention
from memjax.ops.ssd import _validate as _validate_ssd

__all__ = [
    "context_parallel_delta_rule",
    "context_parallel_linear_attention",
    "context_parallel_ssd",
]


# ---------------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------------


def _num_shards(mesh, axis: str, T: int) -> int:
    """The size of ``axis``; T must be a multiple of it."""
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis (mesh axes: {tuple(mesh.shape)})")
    n = mesh.shape[axis]
    if T % n:
        raise ValueError(
            f"context parallelism needs the sequence length T = {T} to be divisible by the size "
            f"of mesh axis {axis!r} = {n}"
        )
    return n


def _check_axes(mesh, axis, batch_axis, head_axis):
    named = [a for a in (axis, batch_axis, head_axis) if a is not None]
    for a in named:
        if a not in mesh.shape:
            raise ValueError(f"{a!r} is not a mesh axis (mesh axes: {tuple(mesh.shape)})")
    if len(set(named)) != len(named):
        raise ValueError(f"axis, batch_axis and head_axis must differ, got {named}")


def _fold(transitions, ends, s0, axis: str, apply):
    """Start state of this device's shard and the final state of the whole sequence.

    ``transitions`` / ``ends``: this shard's ``(M, E)``; they are gathered along ``axis`` and
    folded, ``S_{j+1} = apply(M_j, S_j) + E_j`` from ``S_0 = s0``. Returns ``(S_i, S_n)``.
    """
    all_m = jax.lax.all_gather(transitions, axis)  # [n, ...]: small, no sequence axis
    all_e = jax.lax.all_gather(ends, axis)

    def step(s, me):
        m, e = me
        return apply(m, s) + e, s  # emit the start state of shard j

    final, starts = jax.lax.scan(step, s0, (all_m, all_e))
    return starts[jax.lax.axis_index(axis)], final


def _diag_apply(d, s):
    """``diag(d) s``: d ``[B, H, K]`` (or ``[B, H, 1]``), s ``[B, H, K, V]``."""
    return d[..., None] * s


def _matrix_apply(m, s):
    """``m s``: m ``[B, H, K, K]``, s ``[B, H, K, V]``."""
    return jnp.einsum("bhij,bhjv->bhiv", m, s)


def _run(fn, mesh, args: dict, specs: dict, out_specs):
    """shard_map of ``fn(**args)`` over ``mesh``; entries that are None are left out."""
    present = {name: x for name, x in args.items() if x is not None}
    in_specs = {name: specs[name] for name in present}
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        # Explicit axes: shard_map needs the inputs already laid out as in_specs says.
        present = {name: jax.sharding.reshard(x, NamedSharding(mesh, in_specs[name]))
                   for name, x in present.items()}
    # check_vma=False: the ops start their internal scans (and custom-VJP backward scans) from
    # carries that are not marked as varying over the manual axes, which the vma check rejects.
    # Without it, shard_map's transpose divides the cotangent of an output replicated over an
    # axis by the axis size and sums the cotangents of replicated inputs over it, which is right
    # here because every device computes the replicated final state identically (gradients are
    # tested against the single-device op).
    mapped = jax.shard_map(
        lambda a: fn(**a), mesh=mesh, in_specs=(in_specs,), out_specs=out_specs, check_vma=False
    )
    return mapped(present)


def _diagonal_correction(b, q, s_start, scale):
    """``scale * S^T (exp(b_t) ⊙ q_t)`` per token: b ``[B, L, H]`` or ``[B, L, H, K]`` (cumulative
    log decay from the shard start) or None, q ``[B, L, H, K]``, S ``[B, H, K, V]``."""
    if b is not None:
        q = q * (jnp.exp(b) if b.ndim == 4 else jnp.exp(b)[..., None])
    return scale * jnp.einsum("blhk,bhkv->blhv", q, s_start)


def _shard_decay(g, acc):
    """(b, d): the cumulative log decay from the shard start ``[B, L, H(, K)]`` (None for g None)
    and the shard's transition ``exp(b_L)`` as ``[B, H, K]`` or ``[B, H, 1]``."""
    if g is None:
        return None, None
    b = jnp.cumsum(g.astype(acc), axis=1)
    d = jnp.exp(b[:, -1])
    return b, (d if d.ndim == 3 else d[..., None])


# ---------------------------------------------------------------------------------------------
# Linear attention
# ---------------------------------------------------------------------------------------------


def context_parallel_linear_attention(
    q, k, v, g=None, *, mesh, axis, batch_axis=None, head_axis=None, scale=None,
    initial_state=None, normalize=False, chunk_size=64, impl="auto",
):  # fmt: skip
    """``memjax.ops.linear_attention`` with T split over the mesh axis ``axis``.

    Same arguments and returns as the op (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g None,
    ``[B, T, H]`` or ``[B, T, H, K]``, initial_state ``[B, H, K, V]`` (``V + 1`` with
    ``normalize``)), plus ``mesh``, ``axis`` (splits T; ``T`` must be divisible by its size) and
    the optional ``batch_axis`` / ``head_axis`` (split B / H). Returns ``(o, final_state)``: o
    split over T along ``axis``, final_state (float32, float64 for float64 inputs) replicated
    over ``axis``. Scheme and cost: see the module docstring (the shard's chunk form plus an
    ``O(L H K V)`` correction; nothing but ``n (K + K V)`` numbers per head is gathered).
    """
    chunk_size = check_chunk_size(chunk_size)
    normalize = bool(normalize)
    _validate_linear_attention(q, k, v, g, initial_state, normalize, step=False)
    _check_axes(mesh, axis, batch_axis, head_axis)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = default_scale(scale, K)
    if T == 0:
        return linear_attention(q, k, v, g, scale=scale, initial_state=initial_state,
                                normalize=normalize, impl=impl, chunk_size=chunk_size)
    _num_shards(mesh, axis, T)
    acc = acc_dtype(q, k, v, g)
    width = V + int(normalize)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, K, width), acc)

    def shard(q, k, v, initial_state, g=None):
        # Values in the accumulation dtype (an exact cast): the shard's outputs then come back
        # unrounded, and are rounded to v's dtype once, after the correction.
        v_ = v.astype(acc)
        if normalize:
            v_ = jnp.concatenate([v_, jnp.ones((*v_.shape[:-1], 1), acc)], axis=-1)
        o, end = linear_attention(q, k, v_, g, scale=scale, impl=impl, chunk_size=chunk_size)
        b, d = _shard_decay(g, acc)
        if d is None:  # no decay: the transition is the identity
            d = jnp.ones((*end.shape[:2], 1), acc)
        s_start, final = _fold(d, end, initial_state.astype(acc), axis, _diag_apply)
        o = o + _diagonal_correction(b, q.astype(acc), s_start, scale)
        if normalize:
            o = o[..., :-1] / (o[..., -1:] + NORMALIZER_EPS)
        return o.astype(v.dtype), final

    seq = P(batch_axis, axis, head_axis, None)
    specs = {"q": seq, "k": seq, "v": seq, "initial_state": P(batch_axis, head_axis, None, None),
             "g": seq if g is not None and g.ndim == 4 else P(batch_axis, axis, head_axis)}
    out_specs = (seq, P(batch_axis, head_axis, None, None))
    args = {"q": q, "k": k, "v": v, "initial_state": initial_state, "g": g}
    return _run(shard, mesh, args, specs, out_specs)


# ---------------------------------------------------------------------------------------------
# SSD
# ---------------------------------------------------------------------------------------------


def context_parallel_ssd(
    x, dt, A, Bm, Cm, Dskip=None, *, mesh, axis, batch_axis=None, head_axis=None,
    initial_state=None, chunk_size=64, impl="auto",
):  # fmt: skip
    """``memjax.ops.ssd`` with T split over the mesh axis ``axis``.

    Same arguments and returns as the op (x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]``,
    Bm, Cm ``[B, T, N]``, Dskip ``[H]`` or None, initial_state ``[B, H, N, P]``), plus ``mesh``,
    ``axis``, ``batch_axis``, ``head_axis`` as in ``context_parallel_linear_attention``. Bm and Cm
    are shared by the heads, so they are split over B and T only. Returns ``(y, final_state)``:
    y split over T along ``axis``, final_state replicated over ``axis``. Cost: the shard's op
    plus ``y_t += exp(b_t) S_i^T Cm_t`` (``b_t`` the cumulative ``dt A`` from the shard start).
    """
    chunk_size = check_chunk_size(chunk_size)
    _validate_ssd(x, dt, A, Bm, Cm, Dskip, initial_state, step=False)
    _check_axes(mesh, axis, batch_axis, head_axis)
    Bsz, T, H, Pd = x.shape
    N = Bm.shape[-1]
    if T == 0:
        return ssd(x, dt, A, Bm, Cm, Dskip, initial_state=initial_state, impl=impl,
                   chunk_size=chunk_size)
    _num_shards(mesh, axis, T)
    acc = acc_dtype(x, dt, A, Bm, Cm, Dskip)
    if initial_state is None:
        initial_state = jnp.zeros((Bsz, H, N, Pd), acc)

    def shard(x, dt, A, Bm, Cm, initial_state, Dskip=None):
        # x in the accumulation dtype (exact cast), so y is rounded once, after the correction.
        y, end = ssd(x.astype(acc), dt, A, Bm, Cm, Dskip, impl=impl, chunk_size=chunk_size)
        b = jnp.cumsum(dt.astype(acc) * A.astype(acc), axis=1)  # [B, L, H]
        d = jnp.exp(b[:, -1])[..., None]  # [B, H, 1]
        s_start, final = _fold(d, end, initial_state.astype(acc), axis, _diag_apply)
        q = jnp.broadcast_to(Cm.astype(acc)[:, :, None, :], (*b.shape, N))
        y = y + _diagonal_correction(b, q, s_start, 1.0)
        return y.astype(x.dtype), final

    seq4 = P(batch_axis, axis, head_axis, None)
    specs = {"x": seq4, "dt": P(batch_axis, axis, head_axis), "A": P(head_axis),
             "Bm": P(batch_axis, axis, None), "Cm": P(batch_axis, axis, None),
             "initial_state": P(batch_axis, head_axis, None, None), "Dskip": P(head_axis)}
    out_specs = (seq4, P(batch_axis, head_axis, None, None))
    args = {"x": x, "dt": dt, "A": A, "Bm": Bm, "Cm": Cm, "initial_state": initial_state,
            "Dskip": Dskip}
    return _run(shard, mesh, args, specs, out_specs)


# ---------------------------------------------------------------------------------------------
# Delta rule
# ---------------------------------------------------------------------------------------------


def context_parallel_delta_rule(
    q, k, v, beta, g=None, *, mesh, axis, batch_axis=None, head_axis=None, scale=None,
    initial_state=None, chunk_size=64, impl="auto",
):  # fmt: skip
    """``memjax.ops.delta_rule`` with T split over the mesh axis ``axis``.

    Same arguments and returns as the op (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta and g
    ``[B, T, H]``, initial_state ``[B, H, K, V]``), plus ``mesh``, ``axis``, ``batch_axis``,
    ``head_axis`` as in ``context_parallel_linear_attention``. Returns ``(o, final_state)``: o
    split over T along ``axis``, final_state replicated over ``axis``.

    Scheme (module docstring): one call of the op per shard on values ``[v | 0_K]`` from the
    state ``[0 | I_K]`` yields the zero-start outputs and end state, the shard's ``K x K``
    transition and ``w_t = scale P_t^T q_t``; after the gather and fold of the ``(M, E)`` pairs,
    ``o_t += S_i^T w_t``. Cost: a chunk pass of value width ``V + K`` (about 1.3x-2x the flops of
    one pass at ``K = V``), no second pass; the gathered data is ``n H K (K + V)`` numbers per
    batch row.
    """
    chunk_size = check_chunk_size(chunk_size)
    _validate_delta_rule(q, k, v, beta, g, initial_state, step=False)
    _check_axes(mesh, axis, batch_axis, head_axis)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = default_scale(scale, K)
    if T == 0:
        return delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state, impl=impl,
                          chunk_size=chunk_size)
    _num_shards(mesh, axis, T)
    acc = acc_dtype(q, k, v, beta, g)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, K, V), acc)

    def shard(q, k, v, beta, initial_state, g=None):
        b, h = q.shape[0], q.shape[2]
        v_aug = jnp.concatenate([v.astype(acc), jnp.zeros((*v.shape[:-1], K), acc)], axis=-1)
        eye = jnp.broadcast_to(jnp.eye(K, dtype=acc), (b, h, K, K))
        s_aug = jnp.concatenate([jnp.zeros((b, h, K, V), acc), eye], axis=-1)
        o_aug, end_aug = delta_rule(q, k, v_aug, beta, g, scale=scale, initial_state=s_aug,
                                    impl=impl, chunk_size=chunk_size)
        o, w = o_aug[..., :V], o_aug[..., V:]  # zero-start outputs; w_t = scale P_t^T q_t
        end, m = end_aug[..., :V], end_aug[..., V:]  # zero-start end state; transition M
        s_start, final = _fold(m, end, initial_state.astype(acc), axis, _matrix_apply)
        o = o + jnp.einsum("blhk,bhkv->blhv", w, s_start)
        return o.astype(v.dtype), final

    seq4 = P(batch_axis, axis, head_axis, None)
    seq3 = P(batch_axis, axis, head_axis)
    specs = {"q": seq4, "k": seq4, "v": seq4, "beta": seq3, "g": seq3,
             "initial_state": P(batch_axis, head_axis, None, None)}
    out_specs = (seq4, P(batch_axis, head_axis, None, None))
    args = {"q": q, "k": k, "v": v, "beta": beta, "initial_state": initial_state, "g": g}
    return _run(shard, mesh, args, specs, out_specs)
