"""The memory of a test-time-memory operator: its architecture, inner loss and Newton-Schulz.

A memory (Titans' neural long-term memory, ATLAS, the Miras family) is a small network
``M_W: R^K -> R^V`` whose weights ``W`` are the recurrent state, trained at test time on the
associative ("attentional bias") loss ``loss(M_W(k_t), v_t)``. ``MemorySpec`` names every
choice; ``memjax.ops.neural_memory`` runs the recurrence.

Architectures (one head; leaves of the weights pytree, without the head axis):

- ``linear``: ``{"w": [V, K]}``, ``M(x) = w x`` (a matrix memory).
- ``mlp`` of depth L >= 2, hidden width ``expansion * K``: ``{"w0": [hidden, K], "w1":
  [hidden, hidden], ..., "w{L-1}": [V, hidden]}``, ``h = act(w_l h)`` for l < L - 1, then
  ``M(x) = w_{L-1} h (+ x if residual)``: Titans' deep memory, ATLAS's ``x + W1 act(W2 x)``.
- ``gated_mlp``: ``{"gate": [hidden, K], "up": [hidden, K], "down": [V, hidden]}``,
  ``M(x) = down(act(gate x) * up x) (+ x)``: ATLAS++.

Every weight enters as a matrix-vector product, so a token's gradient for each leaf is an outer
product ``delta a^T`` (the gradient at the product's output times its input); the chunk form of
the operator uses this to compute a mini-batch of updates and reads with matmuls only.

Inner losses on the prediction ``p = M(k)`` and target ``v`` (``r = p - v``), summed over the V
output features (``reduction="mean"`` divides by V, as the titans-pytorch port does; that scales
the effective inner learning rate by 1/V):

- ``l2``: ``sum r_j^2`` (Titans, eq. 12); ``dot``: ``-sum p_j v_j`` (Hebbian; DeepTransformer);
- ``huber``: ``sum h(r_j)``, ``h(r) = r^2 / 2`` if ``|r| <= delta`` else ``delta (|r| - delta/2)``
  (Yaad); ``lp``: ``sum |r_j|^p`` (Moneta).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["MemorySpec", "forward", "init_memory_params", "newton_schulz", "newton_schulz_factor",
           "token_loss", "weight_shapes"]

ARCHITECTURES = ("linear", "mlp", "gated_mlp")
LOSSES = ("l2", "dot", "huber", "lp")
REDUCTIONS = ("sum", "mean")
OPTIMIZERS = ("gd", "muon")
RETRIEVALS = ("after", "before")
ACTIVATIONS: dict[str, Callable] = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
                                    "silu": jax.nn.silu}
# Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024), as ATLAS uses them.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"MemorySpec.{name} must be one of {options}, got {value!r}")


def _positive_int(name: str, value, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"MemorySpec.{name} must be an int >= {least}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """Every choice of a test-time memory (hashable: it is a static argument of jitted forms).

    architecture, depth, expansion, activation, residual: the network ``M`` (module docstring).
    loss, reduction, huber_delta, lp: the inner (attentional-bias) loss.
    optimizer: ``"gd"`` (Titans: ``S_t = eta_t S_{t-1} + theta_t G_t``, ``W_t = (1 - alpha_t)
      W_{t-1} - S_t``) or ``"muon"`` (ATLAS: ``S_t = eta_t S_{t-1} + G_t``, ``W_t = (1 -
      alpha_t) W_{t-1} - theta_t NS(S_t)``, the learning rate after the orthogonalisation).
    momentum: False fixes ``eta = 0`` (no surprise memory; the momentum input is not taken).
    ns_steps: Newton-Schulz iterations of the Muon optimiser.
    memory_chunk: tokens per inner mini-batch: every gradient in a mini-batch is taken at the
      weights from its start (Titans' b, TTT's mini-batch size). A property of the model: it
      changes results, unlike an operator's chunk_size.
    window: the Omega rule's c: token t's gradient is ``sum_{i=t-c+1..t} gamma_i grad loss_i``
      (c = 1: Titans' online update).
    retrieve: ``"after"`` reads ``M_{W_t}(q_t)`` (the token's own store included), ``"before"``
      reads ``M_{W_{t-1}}(q_t)``.
    """

    architecture: str = "linear"
    depth: int = 2
    expansion: int = 2
    activation: str = "gelu"
    residual: bool = True
    loss: str = "l2"
    reduction: str = "sum"
    huber_delta: float = 1.0
    lp: float = 3.0
    optimizer: str = "gd"
    momentum: bool = True
    ns_steps: int = 5
    memory_chunk: int = 16
    window: int = 1
    retrieve: str = "after"

    def __post_init__(self):
        _choice("architecture", self.architecture, ARCHITECTURES)
        _choice("activation", self.activation, tuple(ACTIVATIONS))
        _choice("loss", self.loss, LOSSES)
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("retrieve", self.retrieve, RETRIEVALS)
        _positive_int("depth", self.depth, least=2)
        _positive_int("expansion", self.expansion)
        _positive_int("ns_steps", self.ns_steps)
        _positive_int("memory_chunk", self.memory_chunk)
        _positive_int("window", self.window)
        if not self.huber_delta > 0:
            raise ValueError(f"MemorySpec.huber_delta must be > 0, got {self.huber_delta!r}")
        if not self.lp >= 1:
            raise ValueError(f"MemorySpec.lp must be >= 1, got {self.lp!r}")

    def check_dims(self, K: int, V: int) -> None:
        """A clear error when the residual connection cannot add x [K] to the output [V]."""
        if self.architecture != "linear" and self.residual and K != V:
            raise ValueError(f"a residual {self.architecture} memory needs K == V (it adds its "
                             f"input to its output), got K={K}, V={V}; set residual=False")


def weight_shapes(spec: MemorySpec, K: int, V: int) -> dict[str, tuple[int, int]]:
    """``{leaf name: (out, in)}`` of one head's memory weights."""
    hidden = spec.expansion * K
    if spec.architecture == "linear":
        return {"w": (V, K)}
    if spec.architecture == "gated_mlp":
        return {"gate": (hidden, K), "up": (hidden, K), "down": (V, hidden)}
    dims = [K] + [hidden] * (spec.depth - 1) + [V]
    return {f"w{l}": (dims[l + 1], dims[l]) for l in range(spec.depth)}


def init_memory_params(key, spec: MemorySpec, H: int, K: int, V: int, dtype=jnp.float32) -> dict:
    """Initial memory weights per head, leaves ``[H, out, in]``: the learned ``W_0``.

    The layer that writes (the last one) starts at zero, so every memory starts as the zero map
    (linear) or the identity (residual MLPs) and the first gradients are well defined; the others
    are normal with std ``fan_in ** -0.5``.
    """
    spec.check_dims(K, V)
    shapes = weight_shapes(spec, K, V)
    last = list(shapes)[-1]
    keys = jax.random.split(key, len(shapes))
    return {name: (jnp.zeros((H, *shape), dtype) if name == last else
                   jax.random.normal(k, (H, *shape), dtype) / math.sqrt(shape[1]))
            for k, (name, shape) in zip(keys, shapes.items())}


def forward(spec: MemorySpec, matvec: Callable, x):
    """``M(x)`` with every weight product delegated: ``matvec(name, a)`` returns ``W_name a``.

    ``x`` may carry leading batch axes (``[..., K]``) if ``matvec`` accepts them; callers swap in
    the plain product, a product with gradient taps, or the chunk form's dual read.
    """
    act = ACTIVATIONS[spec.activation]
    if spec.architecture == "linear":
        return matvec("w", x)
    if spec.architecture == "gated_mlp":
        out = matvec("down", act(matvec("gate", x)) * matvec("up", x))
    else:
        h = x
        for l in range(spec.depth - 1):
            h = act(matvec(f"w{l}", h))
        out = matvec(f"w{spec.depth - 1}", h)
    return out + x if spec.residual else out


def apply(spec: MemorySpec, weights: dict, x):
    """``M_W(x)`` for one head: weights leaves ``[out, in]``, x ``[..., K]`` -> ``[..., V]``."""
    return forward(spec, lambda name, a: a @ weights[name].T, x)


def loss_from_prediction(spec: MemorySpec, p, v):
    """The inner loss of one token: prediction p and target v ``[V]`` -> scalar."""
    r = p - v
    if spec.loss == "l2":
        per_feature = r * r
    elif spec.loss == "dot":
        per_feature = -p * v
    elif spec.loss == "huber":
        a = jnp.abs(r)
        small = jnp.minimum(a, spec.huber_delta)  # huber(r) = small^2/2 + delta (|r| - small)
        per_feature = 0.5 * small * small + spec.huber_delta * (a - small)
    else:
        per_feature = jnp.abs(r) ** spec.lp
    total = jnp.sum(per_feature)
    return total / p.shape[-1] if spec.reduction == "mean" else total


def token_loss(spec: MemorySpec, weights: dict, k, v):
    """``loss(M_W(k), v)`` for one token: k ``[K]``, v ``[V]``."""
    return loss_from_prediction(spec, apply(spec, weights, k), v)


def gradient_factors(spec: MemorySpec, weights: dict, k, v):
    """One token's weight gradients as outer products: ``grad_W[name] = delta[name] a[name]^T``.

    Returns ``(delta, a)``: dicts of ``[out]`` and ``[in]`` vectors per leaf, where ``a`` is the
    leaf's input and ``delta`` the loss gradient at its output, both at ``weights``.
    """
    shapes = {name: w.shape for name, w in weights.items()}

    def loss_of_taps(taps):
        inputs = {}

        def matvec(name, a):
            inputs[name] = a
            return weights[name] @ a + taps[name]

        return loss_from_prediction(spec, forward(spec, matvec, k), v), inputs

    zero_taps = {name: jnp.zeros(shape[0], k.dtype) for name, shape in shapes.items()}
    delta, inputs = jax.grad(loss_of_taps, has_aux=True)(zero_taps)
    return delta, inputs


def newton_schulz(x, steps: int = 5, eps: float = 1e-7):
    """Muon's orthogonalisation of a matrix ``x [..., m, n]`` (the polar factor, approximately).

    ``X <- x / (||x||_F + eps)``, then ``steps`` times ``A = X X^T; X <- a X + (b A + c A A) X``
    with ``(a, b, c) = NS_COEFFS``; wide orientation (m <= n) inside, so A is the smaller Gram
    matrix. The quintic does not converge to exactly 1: singular values end in about [0.7, 1.2].
    A matrix far from square (``8 <= m``, ``3 m <= n``) runs the same iteration on ``[m, m]``
    Gram matrices (``_newton_schulz_gram``), which touches the ``[m, n]`` matrix far less often.
    """
    a, b, c = NS_COEFFS
    tall = x.shape[-2] > x.shape[-1]
    X = jnp.swapaxes(x, -1, -2) if tall else x
    m, n = X.shape[-2:]
    if steps > 0 and m >= 8 and n >= 3 * m:  # far from square: the Gram form is cheaper
        out = _newton_schulz_gram(X, steps, eps)
        return jnp.swapaxes(out, -1, -2) if tall else out
    squares = jnp.sum(X * X, axis=(-2, -1), keepdims=True)
    # sqrt at 0 has an infinite derivative: a zero matrix (no gradient yet) must not give NaN.
    norm = jnp.where(squares > 0, jnp.sqrt(jnp.where(squares > 0, squares, 1)), 0)
    X = X / (norm + eps)
    for _ in range(steps):
        A = X @ jnp.swapaxes(X, -1, -2)
        X = a * X + (b * A + c * (A @ A)) @ X
    return jnp.swapaxes(X, -1, -2) if tall else X


def _newton_schulz_gram(X, steps: int, eps: float):
    """``newton_schulz`` of a wide ``X [..., m, n]`` (``n >= 3 m``) in the ``[m, m]`` Gram space.

    Every iteration left-multiplies X by an ``[m, m]`` matrix, so after k more iterations from
    an iterate ``Y``, ``X = M Y`` with ``A = X X^T = M G M^T``, ``G = Y Y^T``: the iteration run
    on ``[m, m]`` matrices, equal to the plain one in exact arithmetic. The ``[m, n]`` matrix is
    touched by 2 products per block of iterations (G, then ``M Y``) instead of 2 per iteration,
    and the backward pass stores and revisits no ``[m, n]`` iterate inside a block (ATLAS's
    polynomial-feature memory, ``[16, 273]`` per head: about 3x less NS time, forward and
    backward, on CPU). Blocks of at most 3 iterations (``_gram_blocks``): M grows by up to
    ``a`` per iteration on small singular values, and its rounding error with it, so one block
    of 5 would be about 100x less accurate in float32 than the plain iteration on
    ill-conditioned inputs; restarting from ``Y = M Y`` after 3 keeps the error at the plain
    iteration's (measured: max relative error ~1e-5 at condition numbers 1e2..1e6 for
    ``[16, 273]``, float32).
    """
    G = X @ jnp.matrix_transpose(X)
    scale = _gram_scale(G, eps)
    for i, block in enumerate(_gram_blocks(steps)):
        if i:
            G = X @ jnp.matrix_transpose(X)
        M = _gram_iterations(G * (scale * scale) if i == 0 else G, block)
        X = (M * scale if i == 0 else M) @ X
    return X


def newton_schulz_factor(G, steps: int = 5, eps: float = 1e-7):
    """``F [..., m, m]`` with ``newton_schulz(X) = F X``, from the Gram matrix ``G = X X^T`` alone.

    For a wide ``X [..., m, n]`` (``m <= n``; for a tall one pass ``X^T X`` and use
    ``newton_schulz(X) = X F^T``). The chunk form of the Muon memory reads and updates through
    it without forming X (``neural_memory._mini_batch``). The iteration is
    ``_newton_schulz_gram``'s, in the same blocks of at most 3, except that a block restarts
    from ``M G M^T`` instead of recomputing ``G`` from the ``[m, n]`` iterate: the same in exact
    arithmetic (float64 tests compare it with the oracle).
    """
    scale = _gram_scale(G, eps)
    G = G * (scale * scale)
    F = scale * jnp.eye(G.shape[-1], dtype=G.dtype)
    blocks = _gram_blocks(steps)
    for i, block in enumerate(blocks):
        M = _gram_iterations(G, block)
        F = M @ F
        if i + 1 < len(blocks):
            G = M @ G @ jnp.matrix_transpose(M)
    return F


def _gram_scale(G, eps: float):
    """``1 / (||X||_F + eps)`` from ``G = X X^T`` (``[..., 1, 1]``): Newton-Schulz's first step."""
    squares = jnp.trace(G, axis1=-2, axis2=-1)[..., None, None]
    # sqrt at 0 has an infinite derivative: a zero matrix (no gradient yet) must not give NaN.
    norm = jnp.where(squares > 0, jnp.sqrt(jnp.where(squares > 0, squares, 1)), 0)
    return 1 / (norm + eps)


def _gram_blocks(steps: int) -> list[int]:
    """Iterations per block: ``steps`` split into the fewest blocks of at most 3, evenly."""
    blocks = -(-steps // 3)
    return [steps // blocks + (i < steps % blocks) for i in range(blocks)]


def _gram_iterations(G, steps: int):
    """``M [..., m, m]`` with ``X_k = M X_0`` after ``steps`` iterations from ``X_0 X_0^T = G``."""
    a, b, c = NS_COEFFS
    M = None  # the identity
    for _ in range(steps):
        A = G if M is None else M @ G @ jnp.matrix_transpose(M)
        P = b * A + c * (A @ A)
        M = a * jnp.eye(A.shape[-1], dtype=A.dtype) + P if M is None else a * M + P @ M
    return M
