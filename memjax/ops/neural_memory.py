"""Test-time memory (Titans' neural long-term memory, ATLAS's Omega rule and Muon, Miras).

The recurrent state is the weights ``W`` of a small network ``M_W`` (``memory_nets``), trained
token by token on an associative loss. One head, tokens counted from the stream's start across
calls, ``b = spec.memory_chunk``, ``c = spec.window``, ``Wbar_t`` = the weights at the start of
token t's mini-batch (tokens ``b floor(t/b) ...``)::

    G_t = sum_{i=t-c+1..t} gamma_i grad_W loss(M_W(k_i), v_i) at W = Wbar_t   # Omega rule
    gd:   S_t = eta_t S_{t-1} + theta_t G_t;   W_t = (1 - alpha_t) W_{t-1} - S_t    (Titans)
    muon: S_t = eta_t S_{t-1} + G_t;           W_t = (1 - alpha_t) W_{t-1} - theta_t NS(S_t)
    o_t = M_{W_t}(q_t)  (retrieve="after")   or   M_{W_{t-1}}(q_t)  (retrieve="before")

(muon is ATLAS's order: the learning rate after the orthogonalisation.)

``S`` is the momentum ("surprise"; Titans' S with the opposite sign), ``theta_t >= 0`` the inner
learning rate, ``eta_t in [0, 1]`` the momentum decay (0 when ``spec.momentum`` is False),
``alpha_t in [0, 1]`` the forgetting gate, ``gamma_i >= 0`` the Omega window's gates (default 1).
With a linear memory, the l2 loss, no momentum, no decay and b = c = 1 this is the delta rule
with ``beta = 2 theta``.

Layout: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; theta (``lr``), alpha (``decay``), eta
(``momentum``), gamma ``[B, T, H]``; memory weights per head (``init_memory_params``: leaves
``[H, out, in]``, the learned initial weights); the state is a ``MemoryState`` whose weight
leaves are ``[B, H, out, in]``. Arithmetic in ``promote_types(input dtype, float32)``.

Forms (``impl``):

- ``"reference"``: token-by-token ``lax.scan`` (weights, momentum and base point per token,
  gradients by ``jax.grad``); the source of truth.
- ``"chunk"``: one step per mini-batch. Each token's gradient is a set of outer products
  ``delta a^T`` at the mini-batch's base point (``memory_nets.gradient_factors``); the momentum
  and decay recurrences inside a mini-batch are ``[b, b]`` transfer matrices. With ``gd`` the
  reads need no per-token weights: for every weight product of the memory's forward pass,
  ``W_t x_t = P_t W_0 x_t - s_t S_0 x_t - sum_j C[t, j] (a_j . x_t) delta_j`` (the TTT dual
  form, extended to momentum and the Omega window). ``muon`` orthogonalises each token's
  momentum: ``NS(S_t) = F_t S_t`` with ``F_t`` an ``[m, m]`` polynomial of the Gram matrix
  ``S_t S_t^T`` (m the smaller side), and that Gram matrix, the reads and the end state are
  sums of products of ``S_0``, the ``delta`` and the ``a`` (``_MuonFrame``), so no ``[b, out,
  in]`` tensor is formed either. Each step is rematerialised: the backward pass keeps one
  state per mini-batch.

A call may start anywhere in a mini-batch or Omega window: the state carries the base point,
the weights and momentum after the last token, the phase (tokens seen mod b) and the last c - 1
(k, v, gamma); the chunk form aligns the call's tokens to the mini-batch grid by padding with
tokens that change nothing, so split-and-resume and prefill-then-decode are exact.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from memjax.ops import dispatch
from memjax.ops._common import acc_dtype, check_qkv, check_shape
from memjax.ops.memory_nets import (MemorySpec, apply, forward, gradient_factors,
                                    init_memory_params, newton_schulz, newton_schulz_factor,
                                    token_loss, weight_shapes)

__all__ = ["MemorySpec", "MemoryState", "init_memory_params", "initial_memory_state",
           "neural_memory", "neural_memory_step"]


class MemoryState(NamedTuple):
    """A test-time memory's recurrent state (weight leaves ``[B, H, out, in]``)."""

    base: dict  # the weights at the start of the current mini-batch (gradients are taken here)
    weights: dict  # W after the last token
    momentum: dict  # S after the last token
    phase: jax.Array  # int32 []: tokens seen mod memory_chunk
    tail_k: jax.Array  # [B, c - 1, H, K]: the last c - 1 keys (the Omega window's history)
    tail_v: jax.Array  # [B, c - 1, H, V]
    tail_gamma: jax.Array  # [B, c - 1, H]


def initial_memory_state(params: dict, batch_size: int, spec: MemorySpec, K: int, V: int,
                         dtype=jnp.float32) -> MemoryState:
    """The state before the first token: base = weights = ``params`` (``[H, out, in]`` leaves,
    broadcast over the batch), zero momentum, phase 0, an empty (zero-gate) Omega window."""
    spec.check_dims(K, V)
    shapes = weight_shapes(spec, K, V)
    H = _check_params(params, shapes)
    weights = {n: jnp.broadcast_to(w.astype(dtype), (batch_size, *w.shape)) for n, w in
               params.items()}
    c = spec.window
    return MemoryState(base=weights, weights=weights,
                       momentum={n: jnp.zeros_like(w) for n, w in weights.items()},
                       phase=jnp.zeros((), jnp.int32),
                       tail_k=jnp.zeros((batch_size, c - 1, H, K), dtype),
                       tail_v=jnp.zeros((batch_size, c - 1, H, V), dtype),
                       tail_gamma=jnp.zeros((batch_size, c - 1, H), dtype))


def _check_params(params, shapes) -> int:
    if not isinstance(params, dict) or set(params) != set(shapes):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"memory params must be a dict with leaves {sorted(shapes)}, got {got}")
    H = next(iter(params.values())).shape[0]
    for name, (out, inp) in shapes.items():
        check_shape(f"params[{name!r}]", params[name], (H, out, inp), "[H, out, in]")
    return H


def _check_state(state: MemoryState, spec: MemorySpec, B: int, H: int, K: int, V: int) -> None:
    if not isinstance(state, MemoryState):
        raise ValueError(f"state must be a MemoryState, got {type(state).__name__}")
    shapes = weight_shapes(spec, K, V)
    for field in ("base", "weights", "momentum"):
        tree = getattr(state, field)
        if not isinstance(tree, dict) or set(tree) != set(shapes):
            raise ValueError(f"state.{field} must have leaves {sorted(shapes)} for this spec")
        for name, (out, inp) in shapes.items():
            check_shape(f"state.{field}[{name!r}]", tree[name], (B, H, out, inp),
                        "[B, H, out, in]")
    c = spec.window
    check_shape("state.phase", state.phase, (), "[] (int32)")
    check_shape("state.tail_k", state.tail_k, (B, c - 1, H, K), "[B, window - 1, H, K]")
    check_shape("state.tail_v", state.tail_v, (B, c - 1, H, V), "[B, window - 1, H, V]")
    check_shape("state.tail_gamma", state.tail_gamma, (B, c - 1, H), "[B, window - 1, H]")


def _validate(q, k, v, lr, decay, momentum, gamma, spec, *, step: bool):
    if not isinstance(spec, MemorySpec):
        raise ValueError(f"spec must be a MemorySpec, got {type(spec).__name__}")
    check_qkv(q, k, v, step=step)
    lead, what = q.shape[:-1], ("[B, H]" if step else "[B, T, H]")
    for name, x in (("lr", lr), ("decay", decay), ("momentum", momentum), ("gamma", gamma)):
        check_shape(name, x, lead, what)
    if spec.momentum and momentum is None:
        raise ValueError("spec.momentum is True: pass momentum (eta, the momentum decay) "
                         f"{what}, or use MemorySpec(momentum=False)")
    if not spec.momentum and momentum is not None:
        raise ValueError("spec.momentum is False but a momentum input was given")
    spec.check_dims(q.shape[-1], v.shape[-1])


def _per_token_inputs(lr, decay, momentum, gamma, acc):
    """(theta, alpha, eta, gamma) in ``acc``; eta = 0 without momentum, gamma = 1 by default."""
    eta = jnp.zeros_like(lr) if momentum is None else momentum
    gamma = jnp.ones_like(lr) if gamma is None else gamma
    return tuple(x.astype(acc) for x in (lr, decay, eta, gamma))


# ---------------------------------------------------------------------------------------------
# One token (the reference form's body and the decoding step), one batch item and head
# ---------------------------------------------------------------------------------------------


def _update(spec: MemorySpec, W, S, G, theta, alpha, eta):
    """One token's momentum and weight update from its window gradient G (module docstring)."""
    tree = jax.tree_util.tree_map
    if spec.optimizer == "gd":
        S = tree(lambda s, g: eta * s + theta * g, S, G)
        return tree(lambda w, s: (1 - alpha) * w - s, W, S), S
    S = tree(lambda s, g: eta * s + g, S, G)
    return tree(lambda w, s: (1 - alpha) * w - theta * newton_schulz(s, spec.ns_steps), W, S), S


def _token_step(spec: MemorySpec, carry, token):
    """carry ``(base, W, S, phase, tail_k [c-1, K], tail_v, tail_gamma)``; token ``(q, k, v,
    theta, alpha, eta, gamma)`` for one head. Returns ``(carry, o [V])``."""
    base, W, S, phase, tail_k, tail_v, tail_g = carry
    q, k, v, theta, alpha, eta, gamma = token
    window_k = jnp.concatenate([tail_k, k[None]])
    window_v = jnp.concatenate([tail_v, v[None]])
    window_g = jnp.concatenate([tail_g, gamma[None]])
    grads = jax.vmap(jax.grad(functools.partial(token_loss, spec)), (None, 0, 0))(
        base, window_k, window_v)
    G = jax.tree_util.tree_map(lambda g: jnp.tensordot(window_g, g, 1), grads)
    W_new, S = _update(spec, W, S, G, theta, alpha, eta)
    o = apply(spec, W_new if spec.retrieve == "after" else W, q)
    phase = phase + 1
    boundary = phase == spec.memory_chunk
    base = jax.tree_util.tree_map(lambda nb, ob: jnp.where(boundary, nb, ob), W_new, base)
    carry = (base, W_new, S, jnp.where(boundary, 0, phase),
             window_k[1:], window_v[1:], window_g[1:])
    return carry, o


def neural_memory_step(q, k, v, lr, decay, momentum, gamma, state: MemoryState, *,
                       spec: MemorySpec):
    """Advance the memory by one token (decoding with a cached state).

    Args: q, k ``[B, H, K]``; v ``[B, H, V]``; lr (theta), decay (alpha), momentum (eta, None
    when ``spec.momentum`` is False), gamma (None: 1) ``[B, H]``; the state after the previous
    token. Returns ``(o [B, H, V] in v's dtype, new state)``.
    """
    _validate(q, k, v, lr, decay, momentum, gamma, spec, step=True)
    B, H, K = q.shape
    _check_state(state, spec, B, H, K, v.shape[-1])
    acc = acc_dtype(q, k, v, lr, decay, momentum, gamma)
    return _step_jit(q, k, v, *_per_token_inputs(lr, decay, momentum, gamma, acc), state,
                     spec, acc, v.dtype)


@functools.partial(jax.jit, static_argnums=(8, 9, 10))
def _step_jit(q, k, v, theta, alpha, eta, gamma, state, spec, acc, out_dtype):
    carry = jax.tree_util.tree_map(lambda x: x.astype(acc) if x.dtype != jnp.int32 else x,
                                   tuple(state))  # (base, weights, momentum, phase, tails)

    def head(carry, token):
        carry, o = _token_step(spec, carry, token)
        return carry[:3] + carry[4:], o  # the phase is shared: advanced once, below

    # Batch first everywhere; then heads on axis 0 of weights and tokens, 1 of the tails.
    per_head = jax.vmap(head, in_axes=((0, 0, 0, None, 1, 1, 1), 0),
                        out_axes=((0, 0, 0, 1, 1, 1), 0))
    per_batch = jax.vmap(per_head, in_axes=((0, 0, 0, None, 0, 0, 0), 0))
    token = tuple(x.astype(acc) for x in (q, k, v, theta, alpha, eta, gamma))
    (base, W, S, tk, tv, tg), o = per_batch(carry, token)
    phase = state.phase + 1
    boundary = phase == spec.memory_chunk
    return o.astype(out_dtype), MemoryState(base, W, S, jnp.where(boundary, 0, phase), tk, tv, tg)


# ---------------------------------------------------------------------------------------------
# Sequence forms, one batch item and head (vmapped by neural_memory)
# ---------------------------------------------------------------------------------------------


def _reference_single(spec, carry, tokens):
    """Token-by-token scan. carry as ``_token_step``; tokens ``[T, ...]`` each."""
    body = jax.checkpoint(functools.partial(_token_step, spec), prevent_cse=False)
    carry, o = jax.lax.scan(body, carry, tokens)
    return carry[:3] + carry[4:], o


def _transfer(x):
    """``D[t, i] = prod_{j=i+1..t} x_j`` for ``i <= t`` (else 0) and ``P[t] = prod_{j<=t} x_j``,
    for x ``[b]``: the coefficients of ``y_t = x_t y_{t-1} + u_t`` over a mini-batch, by
    cumulative products (no division, so zeros in x are exact)."""
    b = x.shape[0]
    t, i = jnp.arange(b)[:, None], jnp.arange(b)[None, :]
    D = jnp.cumprod(jnp.where(t > i, x[:, None], 1), axis=0)
    return jnp.where(t >= i, D, 0), jnp.cumprod(x)


def _band(gamma_window, b: int, c: int):
    """``[b, b + c - 1]``: row t holds the gates of token t's Omega window (window slots t ..
    t + c - 1, the token itself last), zero elsewhere."""
    t, j = jnp.arange(b)[:, None], jnp.arange(b + c - 1)[None, :]
    return jnp.where((j >= t) & (j <= t + c - 1), gamma_window[None, :], 0)


def _shift_rows(x, first):
    """Rows ``t -> t - 1`` with ``first`` as row 0 (the coefficients of W_{t-1})."""
    return jnp.concatenate([first[None], x[:-1]])


class _MuonFrame(NamedTuple):
    """One weight leaf's per-token Muon updates ``NS(S_s)`` in a mini-batch, never formed.

    The momentum of token s is ``S_s = Pm_s S0 + sum_j CS[s, j] delta_j a_j^T`` (``[out,
    in]``). Held in its wide orientation (``S0 [m, n]``, ``m <= n``: transposed with ``left =
    a``, ``right = delta`` when out > in), so that ``S_s = Pm_s S0 + sum_j CS[s, j] left_j
    right_j^T`` and ``NS(S_s) = F_s S_s`` with ``F_s [m, m]`` from the Gram matrix ``S_s
    S_s^T``, which needs only ``S0 S0^T``, ``S0 right^T`` and ``right right^T``. Per token this
    costs ``O(m^2 J + m^3)`` instead of the ``O(m n J)`` of forming ``S_s`` and the ``O(m^2 n)``
    of orthogonalising it, and the backward pass stores no ``[b, out, in]`` tensor.
    """

    S0: jax.Array     # [m, n]
    left: jax.Array   # [J, m]
    right: jax.Array  # [J, n]
    CS: jax.Array     # [b, J]
    Pm: jax.Array     # [b]
    F: jax.Array      # [b, m, m]
    tall: bool

    @classmethod
    def build(cls, S0, delta, a, CS, Pm, ns_steps: int):
        tall = S0.shape[0] > S0.shape[1]
        S0, left, right = (S0.T, a, delta) if tall else (S0, delta, a)
        E = CS[:, None, :] * left.T[None]  # [b, m, J]: S_s - Pm_s S0 = E_s right
        cross = Pm[:, None, None] * jnp.einsum("mj,snj->smn", S0 @ right.T, E)
        gram = (jnp.square(Pm)[:, None, None] * (S0 @ S0.T) + cross + jnp.swapaxes(cross, 1, 2)
                + jnp.einsum("smj,jk,snk->smn", E, right @ right.T, E))
        return cls(S0, left, right, CS, Pm, newton_schulz_factor(gram, ns_steps), tall)

    def _momentum_times(self, x):
        """``S_s x_t`` for every (s, t): x ``[t, n]`` -> ``[s, t, m]``."""
        return (self.Pm[:, None, None] * (x @ self.S0.T)[None]
                + jnp.einsum("sj,tj,jm->stm", self.CS, x @ self.right.T, self.left))

    def _momentum_transposed_times(self, y):
        """``S_s^T y[s, t]`` for every (s, t): y ``[s, t, m]`` -> ``[s, t, n]``."""
        return (self.Pm[:, None, None] * (y @ self.S0)
                + jnp.einsum("sj,stj,jn->stn", self.CS, y @ self.left.T, self.right))

    def read(self, coef, x):
        """``sum_s coef[t, s] NS(S_s) x_t`` for x ``[b, in]`` (rows t) -> ``[b, out]``."""
        if self.tall:  # NS(S_s) x = S_s^T F_s^T x in the wide frame
            z = self._momentum_transposed_times(jnp.einsum("skm,tk->stm", self.F, x))
        else:  # NS(S_s) x = F_s S_s x
            z = jnp.einsum("smk,stk->stm", self.F, self._momentum_times(x))
        return jnp.einsum("ts,sto->to", coef, z)

    def weighted_sum(self, c):
        """``sum_s c_s NS(S_s)`` ``[out, in]`` for c ``[b]``."""
        total = (jnp.einsum("s,smk->mk", c * self.Pm, self.F) @ self.S0
                 + jnp.einsum("s,sj,smk,jk->jm", c, self.CS, self.F, self.left).T @ self.right)
        return total.T if self.tall else total


def _mini_batch(spec: MemorySpec, carry, chunk):
    """One mini-batch of b tokens, every gradient at its base point (module docstring).

    carry ``(base, W0, S0, base_last)`` (``base_last``: the base point of the last mini-batch
    holding a real token, for a call that ends inside one); chunk ``(q [b, K], theta, alpha,
    eta, real [b], window k [J, K], window v [J, V], window gamma [J])`` with ``J = b + c - 1``.
    Padding tokens (``real = 0``) leave the state unchanged.
    """
    base, W0, S0, base_last = carry
    q, theta, alpha, eta, real, wk, wv, wg = chunk
    b, c = spec.memory_chunk, spec.window
    delta, a = jax.vmap(gradient_factors, (None, None, 0, 0))(spec, base, wk, wv)
    delta, a = checkpoint_name((delta, a), "memory_gradient_factors")
    is_real = real > 0
    Dm, Pm = _transfer(jnp.where(is_real, eta, 1))  # momentum: S_t = eta_t S_{t-1} + ...
    Dw, Pw = _transfer(jnp.where(is_real, 1 - alpha, 1))  # weights: W_t = (1-alpha_t) W_{t-1} ...
    gd = spec.optimizer == "gd"
    # S_s = Pm_s S0 + sum_j CS[s, j] delta_j a_j^T, the window gradients folded in by the band.
    CS = (Dm * (real * theta if gd else real)[None, :]) @ _band(wg, b, c)
    before = spec.retrieve == "before"

    def outer_sum(coef, name):  # sum_j coef[..., j] delta_j a_j^T -> [..., out, in]
        return jnp.einsum("...j,jo,ji->...oi", coef, delta[name], a[name])

    if gd:  # W_t = Pw_t W0 - s_t S0 - sum_j CW[t, j] delta_j a_j^T, read in dual form
        DwOut = Dw * real[None, :]
        s, CW = DwOut @ Pm, DwOut @ CS
        P_read, s_read, C_read = ((_shift_rows(Pw, jnp.ones((), Pw.dtype)),
                                   _shift_rows(s, jnp.zeros((), s.dtype)),
                                   _shift_rows(CW, jnp.zeros_like(CW[0]))) if before
                                  else (Pw, s, CW))

        def matvec(name, x):  # x [b, in]: row t times the weights read at token t
            return (P_read[:, None] * (x @ W0[name].T) - s_read[:, None] * (x @ S0[name].T)
                    - (C_read * (x @ a[name].T)) @ delta[name])

        o = forward(spec, matvec, q)
        W_end = {n: Pw[-1] * W0[n] - s[-1] * S0[n] - outer_sum(CW[-1], n) for n in W0}
    else:  # muon: W_t = Pw_t W0 - sum_s DwLr[t, s] NS(S_s), NS(S_s) through [m, m] Gram factors
        DwLr = Dw * (real * theta)[None, :]
        frames = {n: _MuonFrame.build(S0[n], delta[n], a[n], CS, Pm, spec.ns_steps) for n in S0}
        P_read, C_read = ((_shift_rows(Pw, jnp.ones((), Pw.dtype)),
                           _shift_rows(DwLr, jnp.zeros_like(DwLr[0]))) if before else (Pw, DwLr))

        def matvec(name, x):  # x [b, in]: row t times the weights read at token t
            return P_read[:, None] * (x @ W0[name].T) - frames[name].read(C_read, x)

        o = forward(spec, matvec, q)
        W_end = {n: Pw[-1] * W0[n] - frames[n].weighted_sum(DwLr[-1]) for n in W0}
    S_end = {n: Pm[-1] * S0[n] + outer_sum(CS[-1], n) for n in S0}
    base_last = jax.tree_util.tree_map(lambda new, old: jnp.where(jnp.any(is_real), new, old),
                                       base, base_last)
    return (W_end, W_end, S_end, base_last), o


def _chunk_single(spec, aligned, carry, tokens):
    """The chunk form over one call: align to the mini-batch grid, scan over mini-batches.

    ``aligned``: the phase is known to be 0 (a fresh state), so no leading padding is needed.
    """
    base, W, S, phase, tail_k, tail_v, tail_g = carry
    q, k, v, theta, alpha, eta, gamma = tokens
    T, b, c = q.shape[0], spec.memory_chunk, spec.window
    lead = 0 if aligned else b  # room for up to b - 1 padding tokens before the first real one
    n = -(-(T + (0 if aligned else b - 1)) // b)  # mini-batches the aligned stream spans
    start = lead - (0 if aligned else phase)

    def align(x, history=None):  # real token r lands at row phase + r (+ c - 1 with history)
        parts = [jnp.zeros((lead, *x.shape[1:]), x.dtype)]
        parts += [] if history is None else [history]
        parts += [x, jnp.zeros((n * b - T, *x.shape[1:]), x.dtype)]
        size = n * b + (0 if history is None else c - 1)
        return jax.lax.dynamic_slice_in_dim(jnp.concatenate(parts), start, size)

    per_token = [align(x).reshape(n, b, *x.shape[1:])
                 for x in (q, theta, alpha, eta, jnp.ones_like(theta))]
    windows = jnp.arange(n)[:, None] * b + jnp.arange(b + c - 1)[None, :]
    stream = [align(x, h) for x, h in ((k, tail_k), (v, tail_v), (gamma, tail_g))]
    per_window = [x[windows] for x in stream]
    # Rematerialised, except the per-token gradient factors ([J, out] and [J, in] per leaf,
    # small beside the [out, in] state): the backward pass does not redo the gradient pass.
    body = jax.checkpoint(functools.partial(_mini_batch, spec), prevent_cse=False,
                          policy=jax.checkpoint_policies.save_only_these_names(
                              "memory_gradient_factors"))
    (W_end, _, S_end, base_last), o = jax.lax.scan(
        body, (base, W, S, base), (*per_token, *per_window))
    offset = 0 if aligned else phase
    o = jax.lax.dynamic_slice_in_dim(o.reshape(n * b, -1), offset, T)
    at_boundary = (offset + T) % b == 0
    base = jax.tree_util.tree_map(lambda w, bl: jnp.where(at_boundary, w, bl), W_end, base_last)
    tails = [jax.lax.dynamic_slice_in_dim(x, offset + T, c - 1) for x in stream]
    return (base, W_end, S_end, *tails), o


@functools.partial(jax.jit, static_argnums=(7, 8, 9, 10, 11))
def _sequence_jit(q, k, v, theta, alpha, eta, gamma, spec, form, aligned, acc, out_dtype,
                  state):
    carry = jax.tree_util.tree_map(lambda x: x.astype(acc) if x.dtype != jnp.int32 else x,
                                   tuple(state))  # (base, weights, momentum, phase, tails)
    if form == "reference":
        fn = functools.partial(_reference_single, spec)
    else:
        fn = functools.partial(_chunk_single, spec, aligned)
    # Batch first everywhere; then heads on axis 0 of weights, axis 1 of [T or c-1, H, ...].
    per_head = jax.vmap(fn, in_axes=((0, 0, 0, None, 1, 1, 1), 1),
                        out_axes=((0, 0, 0, 1, 1, 1), 1))
    per_batch = jax.vmap(per_head, in_axes=((0, 0, 0, None, 0, 0, 0), 0))
    tokens = tuple(x.astype(acc) for x in (q, k, v, theta, alpha, eta, gamma))
    (base, W, S, tk, tv, tg), o = per_batch(carry, tokens)
    phase = (state.phase + q.shape[1]) % spec.memory_chunk
    return o.astype(out_dtype), MemoryState(base, W, S, phase.astype(jnp.int32), tk, tv, tg)


def neural_memory(q, k, v, lr, decay, momentum=None, gamma=None, *, spec: MemorySpec,
                  params: dict | None = None, initial_state: MemoryState | None = None,
                  impl: str = "auto"):
    """Run a test-time memory over a sequence: store every (k, v), read every q.

    Args:
      q, k: ``[B, T, H, K]`` queries and keys (already normalised / featurised by the layer).
      v: ``[B, T, H, V]`` values.
      lr: theta ``[B, T, H]``, the inner learning rate (>= 0).
      decay: alpha ``[B, T, H]``, the forgetting gate in [0, 1].
      momentum: eta ``[B, T, H]`` in [0, 1]; required iff ``spec.momentum``.
      gamma: ``[B, T, H]`` Omega-window gates (None: 1).
      spec: the memory (``MemorySpec``).
      params: initial memory weights (``init_memory_params``; leaves ``[H, out, in]``) for a
        fresh stream; or
      initial_state: the ``MemoryState`` a previous call returned (exactly one of the two).
      impl: ``"auto"``, ``"reference"``, ``"chunk"`` or ``"pallas"`` (module docstring).

    Returns:
      ``(o, state)``: o ``[B, T, H, V]`` in v's dtype; the state after the last token.
    """
    _validate(q, k, v, lr, decay, momentum, gamma, spec, step=False)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if (params is None) == (initial_state is None):
        raise ValueError("pass exactly one of params (a fresh stream) and initial_state")
    acc = acc_dtype(q, k, v, lr, decay, momentum, gamma)
    if initial_state is None:
        initial_state = initial_memory_state(params, B, spec, K, V, acc)
    _check_state(initial_state, spec, B, H, K, V)
    form = dispatch.resolve("neural_memory", impl)
    if form == "pallas":
        return dispatch.kernel("neural_memory")(q, k, v, lr, decay, momentum, gamma, spec=spec,
                                                initial_state=initial_state)
    if T == 0:
        return jnp.zeros((B, 0, H, V), v.dtype), initial_state
    return _sequence_jit(q, k, v, *_per_token_inputs(lr, decay, momentum, gamma, acc), spec,
                         form, params is not None, acc, v.dtype, initial_state)
