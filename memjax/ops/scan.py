"""First-order linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise), three forms.

This is the scan shared by the diagonal SSMs (S4D, S5) and the selective SSMs (Mamba): each of
them reduces its state update to an elementwise affine recurrence along time.

Layout is sequence-first: a, b ``[B, T, *S]`` (same shape, any trailing state shape S, real or
complex); the state is ``[B, *S]``. Arithmetic happens in ``promote_types(dtype(a, b, h0),
float32)``: float32 (complex64) for float32 / bfloat16 inputs, float64 (complex128) for float64
inputs under ``jax_enable_x64``. ``h`` and the final state are returned in that dtype.

Forms (``impl``):

- ``"reference"``: ``lax.scan`` over T, one token at a time; the source of truth.
- ``"associative"``: ``jax.lax.associative_scan`` over the affine monoid
  ``(a_i, b_i) * (a_j, b_j) = (a_j a_i, a_j b_i + b_j)`` (element i before element j). The
  initial state is folded into the first element, ``b_0 <- a_0 h_0 + b_0``, so ``h_t`` is the
  second component of the prefix product. O(T log T) work in O(log T) depth; keeps O(T) prefix
  intermediates alive for the backward pass.
- ``"chunk"``: the sequence is cut into blocks of ``chunk_size`` tokens; inside a block the
  associative scan runs in parallel, and a ``lax.scan`` over blocks carries the state. Parallel
  within a block, sequential across blocks, and the associative-scan intermediates only ever
  exist for one block at a time (bounded memory for long T).
- ``"auto"``: the reference form on CPU, the associative form elsewhere (``prefer_sequential``).

On CPU the token-by-token scan is the fastest form: each step touches only the ``[B, *S]`` state,
which stays in cache, while the parallel forms stream several passes over ``[B, T, *S]`` arrays.
Measured with ``scripts/bench.py`` (docs/results/bench_ssm_scans.json: float32, B=1, S=[256, 16],
one run on a 2-core CPU), time relative to the reference form, forward / forward+backward:
associative 3.3x / 1.4x at T=1024, 7.1x / 1.5x at T=4096, 4.7x / 3.5x at T=16384; chunk 2.4x /
2.3x, 2.8x / 2.1x, 4.0x / 2.6x. With a batch (B=16, T=256, S=[128, 16];
docs/results/bench_ssm_scans_batch16.json) the associative form ties forward+backward (1.02x)
and is 1.3x slower forward. No accelerator was available to measure the parallel forms where
they are meant to win.

Any T >= 0 is accepted. Gradients are JAX autodiff of each form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops.linear_attention import _check_chunk_size

__all__ = ["IMPLS", "linear_scan", "prefer_sequential"]

IMPLS = ("auto", "reference", "associative", "chunk")


def prefer_sequential() -> bool:
    """Whether ``"auto"`` picks the token-by-token scan for elementwise recurrences.

    True on CPU, where it was measured fastest (module docstring); elsewhere the parallel forms
    are the usual choice (unmeasured here).
    """
    return jax.default_backend() == "cpu"

DEFAULT_CHUNK_SIZE = 128


def _combine(left, right):
    """Compose two affine maps: apply ``left`` then ``right`` (associative)."""
    a_i, b_i = left
    a_j, b_j = right
    return a_j * a_i, a_j * b_i + b_j


def _validate(a, b, initial_state) -> None:
    if a.ndim < 2:
        raise ValueError(f"a must have rank >= 2 ([B, T, *S]), got shape {tuple(a.shape)}")
    if tuple(b.shape) != tuple(a.shape):
        raise ValueError(
            f"b must have the same shape as a ([B, T, *S] = {tuple(a.shape)}), got {tuple(b.shape)}"
        )
    if initial_state is not None:
        expected = (a.shape[0], *a.shape[2:])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"initial_state must have shape [B, *S] = {expected}, got "
                f"{tuple(initial_state.shape)}"
            )


def _reference_form(a, b, h0):
    def body(h, xs):
        a_t, b_t = xs
        h = a_t * h + b_t
        return h, h

    final, h = jax.lax.scan(body, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(h, 0, 1), final


def _associative_form(a, b, h0):
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = jax.lax.associative_scan(_combine, (a, b), axis=1)
    return h, h[:, -1]


def _chunk_form(a, b, h0, chunk_size: int):
    Bsz, T = a.shape[:2]
    S = a.shape[2:]
    c = min(chunk_size, T)
    n = -(-T // c)
    pad = n * c - T
    if pad:
        # Identity elements (a = 1, b = 0) leave the state unchanged; their outputs are dropped.
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, pad)
        a = jnp.pad(a, widths, constant_values=1)
        b = jnp.pad(b, widths)
    # [n, B, c, *S]: blocks become the scanned (leading) axis.
    a_blocks = jnp.moveaxis(a.reshape(Bsz, n, c, *S), 1, 0)
    b_blocks = jnp.moveaxis(b.reshape(Bsz, n, c, *S), 1, 0)

    def body(h, xs):
        h_blk, h_last = _associative_form(xs[0], xs[1], h)
        return h_last, h_blk

    final, h = jax.lax.scan(body, h0, (a_blocks, b_blocks))
    h = jnp.moveaxis(h, 0, 1).reshape(Bsz, n * c, *S)[:, :T]
    return h, final


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _linear_scan(a, b, h0, impl: str, chunk_size: int):
    if a.shape[1] == 0:
        return jnp.zeros(a.shape, a.dtype), h0
    if impl == "reference":
        return _reference_form(a, b, h0)
    if impl == "chunk":
        return _chunk_form(a, b, h0, chunk_size)
    return _associative_form(a, b, h0)


def linear_scan(a, b, *, initial_state=None, impl="auto", chunk_size=DEFAULT_CHUNK_SIZE):
    """h_t = a_t * h_{t-1} + b_t along axis 1 (elementwise).

    Args:
      a, b: ``[B, T, *S]``, same shape, real or complex.
      initial_state: ``[B, *S]`` (``h_{-1}``); None means zeros.
      impl: ``"reference"`` (``lax.scan`` over T), ``"associative"`` (``lax.associative_scan``
        over the affine monoid ``(a_i, b_i) * (a_j, b_j) = (a_j a_i, a_j b_i + b_j)``, the
        initial state folded into ``b_0``), ``"chunk"`` (associative scan inside blocks of
        ``chunk_size``, ``lax.scan`` carrying the state across blocks: bounded memory for long T),
        ``"auto"`` (reference on CPU, associative elsewhere).
      chunk_size: block length of the chunk form (ignored by the others).

    Returns:
      ``(h, final_state)``: h ``[B, T, *S]`` and final_state ``[B, *S]`` (``h_{T-1}``, or the
      initial state when T = 0), both in ``promote_types(input dtype, float32)``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    chunk_size = _check_chunk_size(chunk_size)
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    _validate(a, b, initial_state)
    present = [a, b] + ([] if initial_state is None else [jnp.asarray(initial_state)])
    acc = jnp.promote_types(jnp.result_type(*present), jnp.float32)
    if initial_state is None:
        h0 = jnp.zeros((a.shape[0], *a.shape[2:]), acc)
    else:
        h0 = jnp.asarray(initial_state).astype(acc)
    if impl == "auto":
        impl = "reference" if prefer_sequential() else "associative"
    return _linear_scan(a.astype(acc), b.astype(acc), h0, impl, chunk_size)
