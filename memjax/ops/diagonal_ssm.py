"""Linear time-invariant diagonal state-space models: the S4D and S5 cores.

Continuous system per mode n (complex, ``Re Lambda_n < 0``): ``x'(t) = Lambda_n x(t) + B_n u(t)``,
discretised with step ``dt = exp(log_dt)``:

- ZOH:      ``Lambda_bar = exp(dt Lambda)``, ``B_bar = (Lambda_bar - 1) / Lambda * B``.
- bilinear: ``Lambda_bar = (1 + dt Lambda / 2) / (1 - dt Lambda / 2)``,
            ``B_bar = dt / (1 - dt Lambda / 2) * B``.

Then ``x_t = Lambda_bar x_{t-1} + B_bar u_t`` and the output reads the real part: the modes stand
for conjugate pairs (conjugate symmetry), so ``y_t = 2 Re(C x_t) + D u_t`` is real.

**S4D** (SISO, one independent SSM per channel): u ``[B, T, H]``; Lambda, B, C ``[H, N]``
complex (N complex modes per channel, i.e. a real state size of 2N); log_dt ``[H]``; D ``[H]``;
the state is ``[B, H, N]`` complex. Forms (``impl``):

- ``"conv"``: the kernel ``K_l = 2 Re(sum_n C_n B_bar_n Lambda_bar_n^l)``, l < T (a Vandermonde
  product), applied as a causal convolution by FFT (zero-padded to 2T). An initial state adds
  the free response ``2 Re(sum_n C_n Lambda_bar_n^(l+1) x0_n)``; the final state is the closed
  form ``x_T = sum_l Lambda_bar^(T-1-l) B_bar u_l + Lambda_bar^T x0`` (one more Vandermonde
  contraction), so split-and-resume works without running the recurrence.
- ``"scan"``: the recurrence by ``linear_scan(impl="scan")`` (an associative scan).
- ``"reference"``: token by token with ``lax.scan``; the source of truth.
- ``"pallas"``: a registered kernel; ``"auto"``: ``memjax.ops.dispatch.AUTO`` (conv: at training
  batch sizes the kernel, built once for the whole batch, beats the recurrence, whose cost grows
  with B; only one long sequence favours the recurrence; docs/results/op_dispatch.md).

**S5** (MIMO, one shared state of P complex modes): u ``[B, T, H]``; Lambda ``[P]``; B ``[P, H]``;
C ``[H, P]``; log_dt ``[P]`` (one step per mode); D ``[H]``; the state is ``[B, P]`` complex.
``x_t = Lambda_bar x_{t-1} + B_bar u_t`` and ``y_t = 2 Re(C x_t) + D u_t`` (``conj_sym=False``:
``Re(C x_t) + D u_t``). Forms: ``"scan"`` (``linear_scan``'s associative scan), ``"chunk"``
(``linear_scan`` blocked by ``chunk_size``), ``"reference"`` (``lax.scan``), ``"pallas"``,
``"auto"`` (``memjax.ops.dispatch.AUTO``: scan, measured in docs/results/op_dispatch.md).

Arithmetic is in ``promote_types(inputs, complex64)``: complex64 / float32 for float32 or
bfloat16 inputs, complex128 / float64 when everything is float64 under ``jax_enable_x64``. y has
u's dtype; the state is returned in the complex accumulation dtype (T = 0: the initial state).
Gradients are JAX autodiff.
Each family has a one-token ``*_step`` for decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops import dispatch
from memjax.ops._common import acc_dtype, check_chunk_size, check_shape, empty_sequence
from memjax.ops.scan import linear_scan

__all__ = ["discretize", "s4d", "s4d_step", "s5", "s5_step"]

DISCRETIZATIONS = ("zoh", "bilinear")


# ---------------------------------------------------------------------------------------------
# Discretisation, dtypes, validation
# ---------------------------------------------------------------------------------------------


def discretize(Lambda, dt, method: str = "zoh"):
    """``(Lambda_bar, gain, log_Lambda_bar)`` with ``B_bar = gain * B`` (gain broadcast over B).

    Lambda complex and dt positive real, broadcast together elementwise. ``log_Lambda_bar`` is a
    logarithm of ``Lambda_bar`` (``dt Lambda`` for ZOH), used for powers ``Lambda_bar^l =
    exp(l log_Lambda_bar)``.
    """
    _check_discretization(method)
    z = dt * Lambda
    if method == "zoh":
        Lambda_bar = jnp.exp(z)
        # expm1 keeps (exp(z) - 1) accurate for small |dt Lambda|.
        return Lambda_bar, jnp.expm1(z) / Lambda, z
    denom = 1.0 - z / 2
    Lambda_bar = (1.0 + z / 2) / denom
    return Lambda_bar, dt / denom, jnp.log(Lambda_bar)


def _dtypes(*arrays):
    """(complex accumulation dtype, its real counterpart) of the given arrays."""
    cdt = acc_dtype(*arrays, least=jnp.complex64)
    return cdt, jnp.finfo(cdt).dtype


def _check_discretization(method):
    if method not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {method!r}")


def _validate_s4d_params(Lambda, B, C, log_dt, D):
    if Lambda.ndim != 2:
        raise ValueError(f"Lambda must have rank 2 [H, N], got shape {tuple(Lambda.shape)}")
    H, N = Lambda.shape
    check_shape("B", B, (H, N), "[H, N] (as Lambda)")
    check_shape("C", C, (H, N), "[H, N] (as Lambda)")
    check_shape("log_dt", log_dt, (H,), "[H]")
    if D is not None:
        check_shape("D", D, (H,), "[H]")
    return H, N


def _validate_s5_params(Lambda, B, C, log_dt, D):
    if Lambda.ndim != 1:
        raise ValueError(f"Lambda must have rank 1 [P], got shape {tuple(Lambda.shape)}")
    P = Lambda.shape[0]
    if B.ndim != 2 or B.shape[0] != P:
        raise ValueError(f"B must have shape [P, H] with P = {P}, got {tuple(B.shape)}")
    H = B.shape[1]
    check_shape("C", C, (H, P), "[H, P]")
    check_shape("log_dt", log_dt, (P,), "[P]")
    if D is not None:
        check_shape("D", D, (H,), "[H]")
    return P, H


def _validate_u(u, H):
    if u.ndim != 3:
        raise ValueError(f"u must have rank 3 [B, T, H], got shape {tuple(u.shape)}")
    if u.shape[2] != H:
        raise ValueError(f"u must have shape [B, T, H] with H = {H} (from the parameters), got "
                         f"{tuple(u.shape)}")


def _skip(D, u):
    return 0.0 if D is None else D * u


# ---------------------------------------------------------------------------------------------
# S4D: one SISO SSM per channel
# ---------------------------------------------------------------------------------------------


def _s4d_discrete(Lambda, B, log_dt, method):
    Lambda_bar, gain, log_Lambda_bar = discretize(Lambda, jnp.exp(log_dt)[:, None], method)
    return Lambda_bar, gain * B, log_Lambda_bar


def _s4d_cast(u, Lambda, B, C, log_dt, D, state):
    cdt, rdt = _dtypes(u, Lambda, B, C, log_dt, D, state)
    cast = lambda x, dt: None if x is None else x.astype(dt)
    return (cast(u, rdt), cast(Lambda, cdt), cast(B, cdt), cast(C, cdt), cast(log_dt, rdt),
            cast(D, rdt), cast(state, cdt))


def _s4d_readout(C, x, D, u):
    """``y = 2 Re(sum_n C_n x_n) + D u`` for x ``[..., H, N]``, u ``[..., H]``."""
    return 2.0 * jnp.real(jnp.sum(C * x, axis=-1)) + _skip(D, u)


def s4d_step(u, state, Lambda, B, C, log_dt, D=None, *, discretization="zoh"):
    """One token of S4D: ``x' = Lambda_bar x + B_bar u``, ``y = 2 Re(C x') + D u``.

    u ``[B, H]``; state ``[B, H, N]`` complex. Returns ``(y [B, H] in u's dtype, new_state)``.
    """
    _check_discretization(discretization)
    H, N = _validate_s4d_params(Lambda, B, C, log_dt, D)
    if u.ndim != 2 or u.shape[1] != H:
        raise ValueError(f"u must have shape [B, H] with H = {H}, got {tuple(u.shape)}")
    check_shape("state", state, (u.shape[0], H, N), "[B, H, N]")
    out_dtype = u.dtype
    u, Lambda, B, C, log_dt, D, state = _s4d_cast(u, Lambda, B, C, log_dt, D, state)
    Lambda_bar, B_bar, _ = _s4d_discrete(Lambda, B, log_dt, discretization)
    state = Lambda_bar * state + B_bar * u[..., None]
    return _s4d_readout(C, state, D, u).astype(out_dtype), state


def _causal_fft_conv(u, K):
    """``y[b, t, h] = sum_{l <= t} K[h, l] u[b, t - l, h]``; u ``[B, T, H]``, K ``[H, T]``.

    Zero-padding to 2T makes the circular convolution of the FFT a linear (causal) one.
    """
    T = u.shape[1]
    n = 2 * T
    u_f = jnp.fft.rfft(u, n=n, axis=1)
    k_f = jnp.fft.rfft(K, n=n, axis=-1).T  # [n/2 + 1, H]
    return jnp.fft.irfft(u_f * k_f, n=n, axis=1)[:, :T]


def _s4d_conv(u, Lambda_bar, B_bar, log_Lambda_bar, C, D, x0):
    T = u.shape[1]
    # powers[h, n, l] = Lambda_bar^l for l = 0..T: exp of a multiple of the log, so no error
    # accumulates along l as a running product would.
    powers = jnp.exp(log_Lambda_bar[..., None] * jnp.arange(T + 1, dtype=u.dtype))
    kernel = 2.0 * jnp.real(jnp.einsum("hn,hnl->hl", C * B_bar, powers[..., :T]))
    y = _causal_fft_conv(u, kernel) + _skip(D, u)
    # x_T = sum_l Lambda_bar^(T-1-l) B_bar u_l + Lambda_bar^T x0.
    final = jnp.einsum("blh,hnl->bhn", u.astype(B_bar.dtype),
                       B_bar[..., None] * powers[..., T - 1::-1])
    if x0 is not None:
        free = jnp.einsum("bhn,hnl->blh", C * x0, powers[..., 1:])
        y = y + 2.0 * jnp.real(free)
        final = final + powers[..., T] * x0
    return y, final


def _s4d_recurrent(u, Lambda_bar, B_bar, C, D, x0, impl):
    a = jnp.broadcast_to(Lambda_bar, (*u.shape, Lambda_bar.shape[-1]))
    b = B_bar * u[..., None]
    x, final = linear_scan(a, b, initial_state=x0, impl=impl)
    return _s4d_readout(C, x, D, u), final


@functools.partial(jax.jit, static_argnames=("discretization", "impl"))
def _s4d(u, Lambda, B, C, log_dt, D, x0, discretization, impl):
    out_dtype = u.dtype
    u, Lambda, B, C, log_dt, D, x0 = _s4d_cast(u, Lambda, B, C, log_dt, D, x0)
    Lambda_bar, B_bar, log_Lambda_bar = _s4d_discrete(Lambda, B, log_dt, discretization)
    if impl == "conv":
        y, final = _s4d_conv(u, Lambda_bar, B_bar, log_Lambda_bar, C, D, x0)
    else:
        y, final = _s4d_recurrent(u, Lambda_bar, B_bar, C, D, x0, impl)
    return y.astype(out_dtype), final


def s4d(u, Lambda, B, C, log_dt, D=None, *, initial_state=None, discretization="zoh",
        impl="auto"):
    """S4D over a sequence: per channel h, ``x_t = Lambda_bar x_{t-1} + B_bar u_t``,
    ``y_t = 2 Re(C x_t) + D u_t`` (module docstring: shapes, discretisation and forms).

    Args:
      u: ``[B, T, H]`` real input.
      Lambda, B, C: ``[H, N]`` complex continuous parameters (``Re Lambda < 0`` for stability).
      log_dt: ``[H]`` log step size.
      D: ``[H]`` skip connection, or None.
      initial_state: ``[B, H, N]`` complex state before the first token (None: zeros).
      discretization: ``"zoh"`` or ``"bilinear"``.
      impl: ``"conv"`` (FFT convolution), ``"scan"`` (associative scan), ``"reference"``
        (``lax.scan``), ``"pallas"`` or ``"auto"`` (``memjax.ops.dispatch``).

    Returns:
      ``(y [B, T, H] in u's dtype, final_state [B, H, N] complex)``.
    """
    form = dispatch.resolve("s4d", impl)
    _check_discretization(discretization)
    H, N = _validate_s4d_params(Lambda, B, C, log_dt, D)
    _validate_u(u, H)
    check_shape("initial_state", initial_state, (u.shape[0], H, N), "[B, H, N]")
    if u.shape[1] == 0:
        return _empty(u, initial_state, (u.shape[0], H, N), Lambda, B, C, log_dt, D)
    if form == "pallas":
        return dispatch.kernel("s4d")(u, Lambda, B, C, log_dt, D, initial_state=initial_state,
                                      discretization=discretization)
    return _s4d(u, Lambda, B, C, log_dt, D, initial_state, discretization, form)


def _empty(u, initial_state, state_shape, *params):
    cdt, _ = _dtypes(u, *params, initial_state)
    return empty_sequence(u.shape, u.dtype, initial_state, state_shape, cdt)


# ---------------------------------------------------------------------------------------------
# S5: one MIMO SSM with a shared state
# ---------------------------------------------------------------------------------------------


def _s5_prepare(u, Lambda, B, C, log_dt, D, state, discretization):
    cdt, rdt = _dtypes(u, Lambda, B, C, log_dt, D, state)
    Lambda_bar, gain, _ = discretize(Lambda.astype(cdt), jnp.exp(log_dt.astype(rdt)),
                                     discretization)
    B_bar = gain[:, None] * B.astype(cdt)
    D = None if D is None else D.astype(rdt)
    state = None if state is None else state.astype(cdt)
    return u.astype(rdt), Lambda_bar, B_bar, C.astype(cdt), D, state


def _s5_readout(C, x, D, u, conj_sym):
    """``y = (2 if conj_sym else 1) Re(C x) + D u``; x ``[..., P]``, u ``[..., H]``."""
    y = jnp.real(jnp.einsum("hp,...p->...h", C, x))
    return (2.0 * y if conj_sym else y) + _skip(D, u)


def s5_step(u, state, Lambda, B, C, log_dt, D=None, *, discretization="zoh", conj_sym=True):
    """One token of S5: ``x' = Lambda_bar x + B_bar u``, ``y = 2 Re(C x') + D u``.

    u ``[B, H]``; state ``[B, P]`` complex. Returns ``(y [B, H] in u's dtype, new_state)``.
    """
    _check_discretization(discretization)
    P, H = _validate_s5_params(Lambda, B, C, log_dt, D)
    if u.ndim != 2 or u.shape[1] != H:
        raise ValueError(f"u must have shape [B, H] with H = {H}, got {tuple(u.shape)}")
    check_shape("state", state, (u.shape[0], P), "[B, P]")
    out_dtype = u.dtype
    u, Lambda_bar, B_bar, C, D, state = _s5_prepare(u, Lambda, B, C, log_dt, D, state,
                                                    discretization)
    state = Lambda_bar * state + jnp.einsum("ph,bh->bp", B_bar, u)
    return _s5_readout(C, state, D, u, conj_sym).astype(out_dtype), state


@functools.partial(jax.jit, static_argnames=("discretization", "conj_sym", "impl", "chunk_size"))
def _s5(u, Lambda, B, C, log_dt, D, x0, discretization, conj_sym, impl, chunk_size):
    out_dtype = u.dtype
    u, Lambda_bar, B_bar, C, D, x0 = _s5_prepare(u, Lambda, B, C, log_dt, D, x0, discretization)
    b = jnp.einsum("ph,bth->btp", B_bar, u.astype(B_bar.dtype))
    a = jnp.broadcast_to(Lambda_bar, b.shape)
    x, final = linear_scan(a, b, initial_state=x0, impl=impl, chunk_size=chunk_size)
    return _s5_readout(C, x, D, u, conj_sym).astype(out_dtype), final


def s5(u, Lambda, B, C, log_dt, D=None, *, initial_state=None, discretization="zoh",
       conj_sym=True, impl="auto", chunk_size=128):
    """S5 over a sequence: ``x_t = Lambda_bar x_{t-1} + B_bar u_t``, ``y_t = 2 Re(C x_t) + D u_t``.

    Args:
      u: ``[B, T, H]`` real input.
      Lambda: ``[P]`` complex eigenvalues (``Re < 0``); B: ``[P, H]``; C: ``[H, P]`` complex.
      log_dt: ``[P]`` log step per mode.
      D: ``[H]`` skip connection, or None.
      initial_state: ``[B, P]`` complex (None: zeros).
      discretization: ``"zoh"`` or ``"bilinear"``.
      conj_sym: the P modes stand for conjugate pairs, so the output is ``2 Re(C x)``; with
        False it is ``Re(C x)``.
      impl: ``"scan"``, ``"chunk"``, ``"reference"``, ``"pallas"`` or ``"auto"``
        (``memjax.ops.dispatch``).
      chunk_size: block length of the chunk form.

    Returns:
      ``(y [B, T, H] in u's dtype, final_state [B, P] complex)``.
    """
    form = dispatch.resolve("s5", impl)
    _check_discretization(discretization)
    chunk_size = check_chunk_size(chunk_size)
    P, H = _validate_s5_params(Lambda, B, C, log_dt, D)
    _validate_u(u, H)
    check_shape("initial_state", initial_state, (u.shape[0], P), "[B, P]")
    if u.shape[1] == 0:
        return _empty(u, initial_state, (u.shape[0], P), Lambda, B, C, log_dt, D)
    if form == "pallas":
        return dispatch.kernel("s5")(u, Lambda, B, C, log_dt, D, initial_state=initial_state,
                                     discretization=discretization, conj_sym=conj_sym,
                                     chunk_size=chunk_size)
    return _s5(u, Lambda, B, C, log_dt, D, initial_state, discretization, bool(conj_sym), form,
               chunk_size)
