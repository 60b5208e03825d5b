"""Feature maps for linear attention: pure functions on the last axis of ``[..., K]`` arrays.

A feature map ``phi: R^K -> R^F`` turns a kernel ``kappa(q, k)`` into an inner product,
``phi(q) . phi(k) = kappa(q, k)``, so linear attention with ``phi(q), phi(k)`` in place of
``q, k`` computes a kernelised attention with a ``[F, V]`` state per head. Every map here acts
on the last axis only: input ``[..., K]``, output ``[..., F]`` with the leading axes unchanged,
and comes with a ``*_dim(K)`` function giving ``F`` (what a layer needs to size its state and
``state_size``).

============== ========================= ========================================================
name           F (output dim)            kernel identity ``phi(q) . phi(k) =``
============== ========================= ========================================================
identity       K                         ``q . k``
elu_plus_one   K                         ``(elu(q) + 1) . (elu(k) + 1)`` (every feature > 0)
relu           K                         ``relu(q) . relu(k)`` (every feature >= 0)
taylor         1 + K + K^2               ``1 + s + s^2 / 2`` with ``s = q . k / sqrt(K)``
taylor_dedup   1 + K + K(K+1)/2          same as ``taylor`` (upper triangle of ``x x^T`` only)
polynomial     sum_{i=0..p} K^i          ``sum_i c_i (q . k)^i`` for coefficients ``c [p+1]``
============== ========================= ========================================================

``taylor`` is Based's second-order Taylor map, the truncation of ``exp(q . k / sqrt(K))``::

    phi(x) = [1,  x / K^(1/4),  vec(x x^T) / sqrt(2 K)]

since ``(x/K^(1/4)) . (y/K^(1/4)) = x.y / sqrt(K)`` and
``vec(x x^T) . vec(y y^T) = (x.y)^2``, so the last block contributes ``(x.y)^2 / (2K) = s^2 / 2``.
``taylor_dedup`` keeps only the ``i <= j`` entries of ``x x^T``: diagonal entries keep the weight
``1 / sqrt(2K)``, off-diagonal ones (each standing for the pair ``(i, j), (j, i)``) get
``sqrt(2) / sqrt(2K) = 1 / sqrt(K)``, so their squared weight ``1/K = 2 * 1/(2K)`` counts both.

``polynomial`` is ATLAS's degree-p map with learnable per-degree coefficients::

    phi(x) = concat_{i=0..p} sqrt(c_i) * vec(x^{(x)i})        (x^{(x)0} = [1])

using ``vec(x^{(x)i}) . vec(y^{(x)i}) = (x . y)^i``. With ``c_i = 1/i!`` (``exp_taylor_coeffs``,
ATLAS's initialisation) it is the degree-p truncation of ``exp(q . k)``; with
``c = [1, 1/sqrt(K), 1/(2K)]`` it reproduces the ``taylor`` kernel. The coefficients must be
non-negative (``sqrt``); a layer keeps them so by storing an unconstrained parameter ``r`` and
using ``c = softplus(r)`` (``positive_coeffs``), initialised with ``init_coeff_param`` (the inverse
softplus of ``1/i!``). softplus keeps ``c_i > 0`` strictly, which also keeps the gradient of
``sqrt(c_i)`` finite (it is infinite at ``c_i = 0``). The polynomial map does no temperature
scaling: scale ``x`` first if wanted. The feature dimension grows as ``K^p``: K=16, p=3 already
gives 4369 features per head.

Dtype: the output has the input's floating dtype (integer inputs are promoted to JAX's default
float); ``polynomial`` uses ``promote_types(x.dtype, coeffs.dtype)``. Accumulation across tokens
is the linear-attention operator's business, not the map's.

Use by name (for configs)::

    F = feature_dim("taylor", K)
    phi_q = feature_map("taylor", q)
    F = feature_dim("polynomial", K, degree=2)
    phi_q = feature_map("polynomial", q, coeffs=positive_coeffs(raw))
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FEATURE_MAPS",
    "elu_plus_one",
    "elu_plus_one_dim",
    "exp_taylor_coeffs",
    "feature_dim",
    "feature_map",
    "identity",
    "identity_dim",
    "init_coeff_param",
    "polynomial",
    "polynomial_dim",
    "positive_coeffs",
    "relu",
    "relu_dim",
    "taylor",
    "taylor_dedup",
    "taylor_dedup_dim",
    "taylor_dim",
]


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int if it is a positive integer (bools rejected), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_float(x) -> jax.Array:
    """``x`` as a JAX array of rank >= 1 with a floating dtype (integers -> default float)."""
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"feature maps act on the last axis of [..., K]; got a scalar {x.shape}")
    if x.shape[-1] < 1:
        raise ValueError(f"the feature axis (last) must be non-empty, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


# ---------------------------------------------------------------------------------------------
# Elementwise maps: F = K
# ---------------------------------------------------------------------------------------------


def identity(x) -> jax.Array:
    """``phi(x) = x``: ``[..., K] -> [..., K]``; ``phi(q) . phi(k) = q . k``."""
    return _as_float(x)


def identity_dim(K: int) -> int:
    """Output dimension of ``identity``: ``K``."""
    return _check_positive_int("K", K)


def elu_plus_one(x) -> jax.Array:
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al.): ``[..., K] -> [..., K]``.

    Equal to ``x + 1`` for ``x > 0`` and ``exp(x)`` otherwise, and computed in that form: the
    literal ``elu(x) + 1 = expm1(x) + 1`` rounds to exactly 0 below ``x ~ -17`` in float32 (``-37``
    in float64, ``-8`` in float16, ``-6`` in bfloat16), whereas ``exp(x)`` stays strictly positive
    until it underflows (below ``x ~ -87`` in float32 / bfloat16 with XLA's flush-to-zero,
    ``-708`` in float64, ``-17`` in float16). So features are > 0 and ``phi(q) . phi(k) > 0``
    for any realistic input, and a normalised linear attention does not divide by zero.
    """
    x = _as_float(x)
    return jnp.where(x > 0, x + 1, jnp.exp(jnp.minimum(x, 0)))


def elu_plus_one_dim(K: int) -> int:
    """Output dimension of ``elu_plus_one``: ``K``."""
    return _check_positive_int("K", K)


def relu(x) -> jax.Array:
    """``phi(x) = max(x, 0)``: ``[..., K] -> [..., K]``; features are non-negative."""
    return jax.nn.relu(_as_float(x))


def relu_dim(K: int) -> int:
    """Output dimension of ``relu``: ``K``."""
    return _check_positive_int("K", K)


# ---------------------------------------------------------------------------------------------
# Based: second-order Taylor map of exp(q.k / sqrt(K))
# ---------------------------------------------------------------------------------------------


def _outer_flat(a: jax.Array, b: jax.Array) -> jax.Array:
    """``vec(a b^T)`` on the last axis: ``[..., M], [..., N] -> [..., M * N]`` (row-major)."""
    out = a[..., :, None] * b[..., None, :]
    return out.reshape(*out.shape[:-2], out.shape[-2] * out.shape[-1])


def taylor(x) -> jax.Array:
    """Based's Taylor feature map: ``[..., K] -> [..., 1 + K + K^2]``.

    ``phi(x) = [1, x / K^(1/4), vec(x x^T) / sqrt(2K)]``, so that with ``s = q . k / sqrt(K)``::

        phi(q) . phi(k) = 1 + s + s^2 / 2

    the second-order Taylor expansion of ``exp(s)``. The kernel is always >= 1/2 > 0.
    """
    x = _as_float(x)
    K = x.shape[-1]
    one = jnp.ones((*x.shape[:-1], 1), x.dtype)
    linear = x * (K**-0.25)
    quadratic = _outer_flat(x, x) * ((2.0 * K) ** -0.5)
    return jnp.concatenate([one, linear, quadratic.astype(x.dtype)], axis=-1)


def taylor_dim(K: int) -> int:
    """Output dimension of ``taylor``: ``1 + K + K^2``."""
    K = _check_positive_int("K", K)
    return 1 + K + K * K


def taylor_dedup(x) -> jax.Array:
    """Based's Taylor map with the symmetric block de-duplicated: ``[..., K] -> [..., F]``,
    ``F = 1 + K + K(K+1)/2``.

    ``phi(x) = [1, x / K^(1/4), w_ij x_i x_j for i <= j]`` (pairs in ``numpy.triu_indices(K)``
    order), with ``w_ii = 1 / sqrt(2K)`` and ``w_ij = 1 / sqrt(K)`` (``sqrt(2)`` times the
    diagonal weight) for ``i < j``. It satisfies the same identity as ``taylor``::

        phi(q) . phi(k) = 1 + s + s^2 / 2,    s = q . k / sqrt(K)

    because ``sum_{i<=j} w_ij^2 q_i q_j k_i k_j = (q . k)^2 / (2K)``. Based's memory-saving
    variant: the state per head has ``F`` rows instead of ``1 + K + K^2``.
    """
    x = _as_float(x)
    K = x.shape[-1]
    rows, cols = np.triu_indices(K)
    weights = np.where(rows == cols, (2.0 * K) ** -0.5, K**-0.5)
    one = jnp.ones((*x.shape[:-1], 1), x.dtype)
    linear = x * (K**-0.25)
    quadratic = x[..., rows] * x[..., cols] * jnp.asarray(weights, x.dtype)
    return jnp.concatenate([one, linear, quadratic], axis=-1)


def taylor_dedup_dim(K: int) -> int:
    """Output dimension of ``taylor_dedup``: ``1 + K + K(K+1)/2``."""
    K = _check_positive_int("K", K)
    return 1 + K + K * (K + 1) // 2


# ---------------------------------------------------------------------------------------------
# ATLAS: degree-p polynomial map with per-degree coefficients
# ---------------------------------------------------------------------------------------------


def _coeffs_degree(coeffs, degree: int | None) -> tuple[jax.Array, int]:
    """Validate ``coeffs`` (``[p+1]``, non-negative when concrete) against ``degree``."""
    coeffs = jnp.asarray(coeffs)
    if coeffs.ndim != 1 or coeffs.shape[0] < 2:
        raise ValueError(
            f"coeffs must have shape [degree + 1] with degree >= 1, got shape {coeffs.shape}"
        )
    p = coeffs.shape[0] - 1
    if degree is not None and _check_positive_int("degree", degree) != p:
        raise ValueError(f"degree={degree} does not match coeffs of shape {coeffs.shape} ({p=})")
    if not jnp.issubdtype(coeffs.dtype, jnp.floating):
        coeffs = coeffs.astype(jnp.result_type(float))
    if not isinstance(coeffs, jax.core.Tracer):
        values = np.asarray(coeffs)
        if not np.all(values >= 0):  # also catches NaN
            raise ValueError(
                f"coeffs must be non-negative (use positive_coeffs / softplus), got {values}"
            )
    return coeffs, p


def polynomial(x, coeffs, *, degree: int | None = None) -> jax.Array:
    """ATLAS polynomial feature map: ``[..., K] -> [..., sum_{i=0..p} K^i]``.

    ``phi(x) = concat_{i=0..p} sqrt(c_i) * vec(x^{(x)i})`` with ``x^{(x)0} = [1]`` and
    ``vec(x^{(x)i})`` the ``K^i`` entries of the i-fold outer product (row-major), so::

        phi(q) . phi(k) = sum_{i=0..p} c_i (q . k)^i

    Args:
      x: ``[..., K]`` floating array.
      coeffs: ``[p + 1]`` non-negative per-degree coefficients ``c_0 .. c_p`` (p >= 1); the
        degree is ``len(coeffs) - 1``. Keep them non-negative in a layer with
        ``positive_coeffs(raw)`` (softplus). Concrete values are checked; traced values (under
        ``jit`` / ``grad``) cannot be, and a negative one yields NaN features.
      degree: optional; if given it must equal ``len(coeffs) - 1`` (a consistency check).

    Returns ``[..., polynomial_dim(K, p)]`` in ``promote_types(x.dtype, coeffs.dtype)``.
    """
    x = _as_float(x)
    coeffs, p = _coeffs_degree(coeffs, degree)
    dtype = jnp.promote_types(x.dtype, coeffs.dtype)
    x = x.astype(dtype)
    roots = jnp.sqrt(coeffs.astype(dtype))
    power = jnp.ones((*x.shape[:-1], 1), dtype)  # x^{(x)0}
    blocks = [power * roots[0]]
    for i in range(1, p + 1):
        power = _outer_flat(power, x)  # [..., K^i]
        blocks.append(power * roots[i])
    return jnp.concatenate(blocks, axis=-1)


def polynomial_dim(K: int, degree: int | None = None, *, coeffs=None) -> int:
    """Output dimension of ``polynomial``: ``sum_{i=0..p} K^i``.

    Give the degree ``p`` directly, or ``coeffs`` (``[p + 1]``; only its shape is used), or both
    (they must agree).
    """
    K = _check_positive_int("K", K)
    if coeffs is not None:
        shape = tuple(np.shape(coeffs))
        if len(shape) != 1 or shape[0] < 2:
            raise ValueError(
                f"coeffs must have shape [degree + 1] with degree >= 1, got shape {shape}"
            )
        if degree is not None and _check_positive_int("degree", degree) != shape[0] - 1:
            raise ValueError(f"degree={degree} does not match coeffs of shape {shape}")
        degree = shape[0] - 1
    if degree is None:
        raise ValueError("polynomial_dim needs degree= or coeffs=")
    p = _check_positive_int("degree", degree)
    return sum(K**i for i in range(p + 1))


def exp_taylor_coeffs(degree: int, dtype=None) -> jax.Array:
    """``[1/0!, 1/1!, ..., 1/p!]`` (``[p + 1]``): ATLAS's initial coefficients, for which
    ``polynomial`` is the degree-p Taylor truncation of ``exp(q . k)``."""
    p = _check_positive_int("degree", degree)
    return jnp.asarray([1.0 / math.factorial(i) for i in range(p + 1)], dtype=dtype)


def positive_coeffs(raw) -> jax.Array:
    """Map an unconstrained parameter ``[p + 1]`` to coefficients ``softplus(raw) > 0``."""
    return jax.nn.softplus(jnp.asarray(raw))


def init_coeff_param(degree: int, dtype=None) -> jax.Array:
    """Initial raw parameter ``r`` with ``positive_coeffs(r) == exp_taylor_coeffs(degree)``
    (the inverse softplus ``log(expm1(c))`` of ``1/i!``)."""
    p = _check_positive_int("degree", degree)
    c = np.array([1.0 / math.factorial(i) for i in range(p + 1)], dtype=np.float64)
    return jnp.asarray(np.log(np.expm1(c)), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Registry / dispatcher
# ---------------------------------------------------------------------------------------------


class _Entry(NamedTuple):
    fn: Callable[..., jax.Array]
    dim: Callable[..., int]
    map_params: tuple[str, ...]  # keyword parameters accepted by feature_map
    dim_params: tuple[str, ...]  # keyword parameters accepted by feature_dim


_REGISTRY: dict[str, _Entry] = {
    "identity": _Entry(identity, identity_dim, (), ()),
    "elu_plus_one": _Entry(elu_plus_one, elu_plus_one_dim, (), ()),
    "relu": _Entry(relu, relu_dim, (), ()),
    "taylor": _Entry(taylor, taylor_dim, (), ()),
    "taylor_dedup": _Entry(taylor_dedup, taylor_dedup_dim, (), ()),
    "polynomial": _Entry(polynomial, polynomial_dim, ("coeffs", "degree"), ("coeffs", "degree")),
}

FEATURE_MAPS: tuple[str, ...] = tuple(sorted(_REGISTRY))
"""Names accepted by ``feature_map`` / ``feature_dim``."""


def _lookup(name: str, params: dict, which: str) -> _Entry:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown feature map {name!r}; known: {', '.join(FEATURE_MAPS)}")
    entry = _REGISTRY[name]
    allowed = entry.map_params if which == "map" else entry.dim_params
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = f"takes {', '.join(allowed)}" if allowed else "takes no parameters"
        raise ValueError(f"feature map {name!r} {takes}; got unexpected {', '.join(unknown)}")
    return entry


def feature_map(name: str, x, **params) -> jax.Array:
    """Apply the feature map ``name`` (one of ``FEATURE_MAPS``) to the last axis of ``x``.

    ``[..., K] -> [..., feature_dim(name, K, **params)]``. Parameters: ``polynomial`` needs
    ``coeffs`` (``[p + 1]``) and accepts ``degree`` as a check; the others take none. Unknown
    names or parameters raise ValueError. ``name`` must be static under ``jit``.
    """
    entry = _lookup(name, params, "map")
    if name == "polynomial" and "coeffs" not in params:
        raise ValueError("feature map 'polynomial' needs coeffs= (shape [degree + 1])")
    return entry.fn(x, **params)


def feature_dim(name: str, K: int, **params) -> int:
    """Output dimension of the feature map ``name`` for input dimension ``K``.

    ``polynomial`` needs ``degree=`` or ``coeffs=`` (only its shape is read); the others take no
    parameters. Unknown names or parameters raise ValueError.
    """
    return _lookup(name, params, "dim").dim(K, **params)
