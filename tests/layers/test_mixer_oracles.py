"""Every registered mixer against an independent float64 NumPy oracle (tests/layers/numpy_mixers.py).

The layer runs in float64 (x64 scoped to the test) from its own `init` parameters, perturbed so
that no parameter keeps a special initial value (zero LoRA maps, unit norm scales, zero biases
would hide a wrong gate or a skipped term). Checked: the forward output; the gradients with
respect to parameters and input, against central differences of the oracle; the output from
bfloat16 parameters and input. Tiny shapes: batch 2, T = 12, d_model 16.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import numpy_bmojo
import numpy_hybrids
import numpy_mixers
from numpy_mixers import to_np

from memjax.layers import MIXERS, build_mixer

D, T, BATCH = 16, 12, 2
ORACLES = numpy_mixers.ORACLES | numpy_hybrids.ORACLES | numpy_bmojo.ORACLES

# (kind, options, tolerances): every option an oracle reads is given explicitly, so that a
# changed layer default cannot make the oracle and the layer agree by accident. chunk_size 4 makes
# the chunk forms span three chunks of T = 12. Tolerances (relative to the output's largest
# magnitude; for gradients, of the directional derivative) are about 10x the error measured on
# 2026-12-03, given after each line as forward / gradient / bfloat16; the bfloat16 ones are about
# 4x (the measured error is a few bfloat16 roundings already). The first case of each kind also
# checks gradients and bfloat16; the variants after it check the forward pass only. The layers
# that round a gate or time step to float32 by design (everything but attention, linear
# attention, Based and the RNNs) sit near 1e-8 rather than 1e-16.
CASES = [
    ("attention", dict(num_heads=2, window=0), (3e-15, 6e-12, 1.5e-2)),  # 2.7e-16 6.4e-13 3.7e-3
    ("attention", dict(num_heads=2, window=5), (3e-15,)),  # 2.7e-16
    ("attention", dict(num_heads=2, window=5, persistent_tokens=3), (3e-15,)),  # 2.5e-16
    ("linear_attention", dict(num_heads=2, chunk_size=4), (4e-15, 6e-10, 2e-2)),  # 4.2e-16 6.0e-11 5.3e-3
    ("based", dict(num_heads=2, feature_dim=4, window=0, window_heads=2, chunk_size=4),
     (3e-15, 5e-11, 1.5e-2)),  # 2.6e-16 4.3e-12 3.5e-3
    ("based", dict(num_heads=2, feature_dim=4, window=3, window_heads=2, chunk_size=4),
     (3e-15,)),  # 2.8e-16
    ("base_conv", dict(expand=2, conv_size=3), (7e-16, 5e-12, 1.8e-2)),  # 6.8e-17 4.6e-13 4.4e-3
    ("base_conv", dict(expand=1, conv_size=5), (2e-15,)),  # 1.7e-16
    ("deltanet", dict(num_heads=2, gated=False, allow_neg_eigval=False, head_size=0,
                      chunk_size=4),
     (1e-6, 1.5e-6, 3.5e-2)),  # 9.5e-8 1.4e-7 8.4e-3
    ("deltanet", dict(num_heads=2, gated=False, allow_neg_eigval=True, head_size=0,
                      chunk_size=4),
     (1e-6,)),  # 9.5e-8
    ("gated_deltanet", dict(num_heads=2, gated=True, allow_neg_eigval=False, head_size=0,
                            chunk_size=4), (4e-7, 3e-7, 4e-2)),  # 3.3e-8 3.1e-8 9.7e-3
    # Six heads of 4 (width 24 from d_model 16): the state sized apart from d_model.
    ("gated_deltanet", dict(num_heads=6, gated=True, allow_neg_eigval=False, head_size=4,
                            chunk_size=4), (4e-7,)),
    ("gla", dict(num_heads=2, expand_k=0.5, gate_rank=4, gate_normalizer=16.0, chunk_size=4),
     (5e-8, 8e-7, 2e-2)),  # 4.6e-9 8.0e-8 4.4e-3
    ("gla", dict(num_heads=2, expand_k=0.5, gate_rank=4, gate_normalizer=16.0, output_gate=False,
                 chunk_size=4), (5e-8,)),
    ("retnet", dict(num_heads=4, output_gate=True, chunk_size=4),
     (1.2e-8, 2.5e-6, 2e-2)),  # 1.2e-9 2.3e-7 4.8e-3
    ("retnet", dict(num_heads=4, output_gate=False, chunk_size=4), (1.2e-8,)),
    ("rwkv7", dict(num_heads=2, low_rank=4), (3e-7, 3e-4, 2e-2)),  # 3.0e-8 3.0e-5 4.6e-3
    ("mamba", dict(state_dim=4, polarized=False, chunk_size=4),
     (2e-7, 6e-7, 5e-2)),  # 2.0e-8 5.8e-8 1.2e-2
    ("mamba", dict(state_dim=4, polarized=True, chunk_size=4), (3e-7,)),  # 3.1e-8
    ("mamba2", dict(head_dim=8, state_dim=4, polarized=False, chunk_size=4),
     (3e-7, 4e-7, 3e-2)),  # 3.1e-8 4.3e-8 7.7e-3
    ("mamba2", dict(head_dim=8, state_dim=4, polarized=True, chunk_size=4), (6e-8,)),  # 5.6e-9
    ("s4d", dict(state_dim=8, discretization="zoh"), (5e-7, 2e-6, 6e-3)),  # 4.9e-8 1.7e-7 1.5e-3
    ("s4d", dict(state_dim=8, discretization="bilinear", lambda_init="lin"), (5e-7,)),  # 5.3e-8
    ("s5", dict(state_dim=8, conj_sym=True, discretization="zoh"),
     (7e-7, 1.4e-4, 8e-3)),  # 7.0e-8 1.4e-5 1.9e-3
    ("s5", dict(state_dim=8, conj_sym=False, discretization="bilinear"), (7e-7,)),  # 7.4e-8
    ("hippo_rnn", dict(hidden=8, order=5, memory_channels=2),
     (5e-15, 1e-7, 8e-3)),  # 4.6e-16 1.1e-8 2.0e-3
    ("lstm", dict(hidden=8), (3e-15, 4e-7, 1e-2)),  # 2.7e-16 4.0e-8 2.5e-3
    ("gru", dict(hidden=8), (4e-15, 1e-6, 6e-3)),  # 4.1e-16 1.0e-7 1.4e-3
    # The MLP memories' inner step is unstable at the perturbed weights (|W_1|^2 near 4, so the
    # curvature times theta = 0.5 exceeds 2): their outputs are sensitive enough that the
    # float32 norm of l2_normalize shows as 5e-6, and they are checked forward only.
    ("lmm", dict(num_heads=2, architecture="linear", depth=2, memory_chunk=4, omega_window=1,
                 optimizer="gd", momentum=True, retrieve="after", max_lr=1.0, feature_map="identity"),
     (2e-6, 2e-6, 0.2)),  # 2.1e-7 1.9e-7 4.6e-2
    ("lmm", dict(num_heads=2, architecture="mlp", depth=2, memory_chunk=4, omega_window=1,
                 optimizer="gd", momentum=True, retrieve="after", max_lr=1.0,
                 feature_map="identity"), (5e-5,)),  # 4.8e-6
    ("lmm", dict(num_heads=2, architecture="linear", depth=2, memory_chunk=4, omega_window=3,
                 optimizer="muon", momentum=True, retrieve="before", max_lr=0.5,
                 feature_map="identity"), (1e-6,)),  # 9.1e-8
    ("lmm", dict(num_heads=2, architecture="mlp", depth=2, memory_chunk=1, omega_window=2,
                 optimizer="gd", momentum=False, retrieve="after", max_lr=0.3,
                 feature_map="identity"), (1e-6,)),  # 4.8e-8
    ("lmm", dict(num_heads=2, architecture="mlp", depth=2, memory_chunk=4, omega_window=2,
                 optimizer="muon", momentum=True, retrieve="after", max_lr=0.2,
                 feature_map="polynomial", feature_degree=2), (1e-6,)),  # 5.8e-8
    ("titans_mag", dict(num_heads=2, architecture="linear", depth=2, memory_chunk=4,
                        omega_window=1, optimizer="gd", momentum=True, retrieve="after",
                        max_lr=1.0, feature_map="identity", window=4, attn_heads=2,
                        persistent_tokens=2), (3e-7, 5e-7, 2.5e-2)),  # 2.8e-8 4.8e-8 6.4e-3
    # Segments of 5 over T = 12 (the last one partial), memory mini-batches of 3 across them;
    # also the test that MAC retrieves from the memory before the segment: the oracle does. Its
    # gradient error is the finite difference's (per leaf it falls 10-1000x from eps 1e-3 to
    # 1e-4: a strongly curved output), not the layer's.
    ("titans_mac", dict(num_heads=2, architecture="linear", depth=2, memory_chunk=3,
                        omega_window=2, optimizer="gd", momentum=True, retrieve="after",
                        max_lr=1.0, segment=5, attn_heads=2, persistent_tokens=2),
     (3e-6, 3e-3, 0.25)),  # 2.9e-7 3.1e-4 5.4e-2
    ("titans_mac", dict(num_heads=2, architecture="mlp", depth=2, memory_chunk=4,
                        omega_window=1, optimizer="muon", momentum=True, retrieve="before",
                        max_lr=0.2, segment=4, attn_heads=2, persistent_tokens=0), (1e-6,)),
    # Three memories, top-2, a shared memory, over T = 12 in chunks of 4: each memory skips
    # tokens inside chunks; capacity 1.0 drops about a tenth of the assignments. The gradient
    # error is the float32 norm of l2_normalize (by design): with float64 gates it stays at
    # 3e-6, and top-3 of 3 memories or M = 1 gives 8e-8.
    ("mom", dict(num_heads=2, num_memories=3, top_k=2, renormalize=True, shared_memory=True,
                 capacity=0.0, memory="gated_deltanet", chunk_size=4),
     (5e-7, 5e-5, 5e-2)),  # 4.9e-8 4.7e-6 1.3e-2
    ("mom", dict(num_heads=2, num_memories=3, top_k=2, renormalize=True, shared_memory=False,
                 capacity=1.0, memory="gated_deltanet", chunk_size=4), (1e-6,)),
    # Top-1 weighted by the router probability (not renormalised to 1).
    ("mom", dict(num_heads=2, num_memories=4, top_k=1, renormalize=False, shared_memory=False,
                 capacity=0.0, memory="deltanet", chunk_size=4), (1e-6,)),
    ("mom", dict(num_heads=2, num_memories=2, top_k=1, renormalize=True, shared_memory=True,
                 capacity=0.0, memory="linear_attention", chunk_size=4), (1e-6,)),
    ("mom", dict(num_heads=2, num_memories=3, top_k=2, renormalize=True, shared_memory=False,
                 capacity=1.5, memory="gla", chunk_size=4), (1e-6,)),
    # Segments of 5 over T = 12 (the last partial): the third reads a memory the delta update
    # changed. Infini-attention computes in float64 throughout.
    ("infini_attention", dict(num_heads=2, segment=5, delta=False),
     (2e-15, 9e-12, 1e-2)),  # 1.3e-16 8.5e-13 2.5e-3
    ("infini_attention", dict(num_heads=2, segment=5, delta=True), (3e-15,)),  # 2.6e-16
    # A window of 5 over T = 12: tokens 0..6 leave it for the memory. The deltanet variant is
    # forward-only: one random direction's derivative is 0.02 against terms summing to 680, so
    # float32 rounding (3.5e-6 absolute) reads as 1.7e-4 relative.
    ("hippocampus", dict(num_heads=2, window=5, memory="gated_deltanet", chunk_size=4),
     (5e-7, 1.5e-7, 9e-2)),  # 4.2e-8 1.3e-8 2.2e-2
    ("hippocampus", dict(num_heads=2, window=5, memory="deltanet", chunk_size=4),
     (6e-7,)),  # 5.8e-8
    # A window of 4 over T = 12 (tokens 0..7 leave it), 3 eidetic tokens. E = 2 with the gated
    # memory is forward-only: its 2nd and 3rd surprises differ by 0.8%, which bfloat16 flips
    # (0.46: a hard top-E selection cannot be stable at near-ties).
    ("bmojo", dict(num_heads=2, window=4, eidetic=3, memory="gated_deltanet", chunk_size=4),
     (3e-7, 6e-7, 4.5e-2)),  # 2.6e-8 5.6e-8 1.1e-2
    ("bmojo", dict(num_heads=2, window=4, eidetic=2, memory="gated_deltanet", chunk_size=4),
     (3e-7,)),  # 2.6e-8
    ("bmojo", dict(num_heads=2, window=4, eidetic=2, memory="deltanet", chunk_size=4),
     (7e-7,)),  # 6.8e-8
]


def case_id(case):
    kind, options, _ = case
    shown = {k: v for k, v in options.items() if k not in ("chunk_size", "num_heads")}
    return kind + "".join(f",{k}={v}" for k, v in shown.items())


def oracle_for(kind, options):
    """The oracle of `kind` with the options it declares (all of them must be in the case)."""
    fn = ORACLES[kind]
    wanted = [n for n, prm in inspect.signature(fn).parameters.items() if prm.kind == prm.KEYWORD_ONLY]
    missing = [n for n in wanted if n not in options
               and inspect.signature(fn).parameters[n].default is inspect.Parameter.empty]
    assert not missing, f"case for {kind} lacks {missing}"
    return lambda p, x: fn(p, x, **{n: options[n] for n in wanted if n in options})


def perturbed_params(layer, seed=0, scale=0.3):
    """`layer.init` parameters plus N(0, scale^2) noise on every entry, rounded to float32 values,
    as float64 NumPy (so a float32 copy holds exactly what the oracle sees)."""
    x = jnp.zeros((BATCH, T, D), jnp.float32)
    params = to_np(jax.jit(layer.init)(jax.random.key(seed), x)["params"])
    rng = np.random.default_rng(seed + 100)
    return jax.tree_util.tree_map(lambda a: f32_values(a + scale * rng.normal(size=a.shape)), params)


def f32_values(a):
    return np.asarray(a, np.float32).astype(np.float64)


def rel_err(got, want):
    """Max absolute error over the max magnitude of the oracle's output."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def float64_forward(kind, layer):
    """`y(params, x)`. The RNN layers (LSTM, GRU, HiPPO-RNN) keep a float32 carry when started
    without a cache, so they get a float64 cache here and run in float64 (their plain float32
    path is checked against the same oracles in test_hippo_rnn.py)."""
    if kind not in ("hippo_rnn", "lstm", "gru"):
        return lambda p, x: layer.apply({"params": p}, x)

    def forward(p, x):
        cache = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            layer.init_cache(BATCH, T))
        return layer.apply({"params": p}, x, cache)[0]

    return forward


class Case:
    """One case's layer, perturbed parameters, input, oracle, and one jitted float64 function
    giving the layer's output and the gradient of `sum(weights * y)`."""

    def __init__(self, index):
        self.kind, self.options, self.tolerances = CASES[index]
        self.layer = build_mixer(D, {"name": self.kind, **self.options})
        self.params = perturbed_params(self.layer)
        self.x = f32_values(np.random.default_rng(1).normal(size=(BATCH, T, D)))
        self.oracle = oracle_for(self.kind, self.options)
        self.weights = np.random.default_rng(2).normal(size=(BATCH, T, D))
        self._forward = float64_forward(self.kind, self.layer)

    def layer_output(self):
        """The layer's output in float64, as NumPy."""
        with jax.enable_x64(True):
            return np.asarray(jax.jit(self._forward)(self._device_params(), jnp.asarray(self.x)))

    def layer_output_and_grads(self):
        """`(y, (grad_params, grad_x))` of the layer in float64 (one compilation for both)."""
        def loss(p, x):
            y = self._forward(p, x)
            return jnp.sum(jnp.asarray(self.weights) * y), y

        with jax.enable_x64(True):
            (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
                self._device_params(), jnp.asarray(self.x))
            return np.asarray(y), jax.tree_util.tree_map(np.asarray, grads)

    def _device_params(self):
        return jax.tree_util.tree_map(jnp.asarray, self.params)

    def oracle_loss(self, params, x):
        return float(np.sum(self.weights * self.oracle(params, x)))

    def bfloat16_output(self):
        """The layer's output from bfloat16 parameters (float32 where complex) and input, and
        the oracle's output from the same rounded values."""
        dtype = jnp.float32 if self.kind in ("s4d", "s5") else jnp.bfloat16  # no bf16 complex
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), self.params)
        x = jnp.asarray(self.x, jnp.bfloat16)
        got = jax.jit(lambda p, x: self.layer.apply({"params": p}, x))(params, x)
        assert got.dtype == jnp.bfloat16
        return got, self.oracle(to_np(params), np.asarray(x, np.float64))


def directional_errors(case, grads, directions=3, eps=1e-4):
    """Relative error of `<grad, d>` against 4th-order central differences of the float64 oracle
    along random directions d over (params, x). Differences of the oracle rather than of the
    layer: several layers round a gate to float32 (by design), and that rounding divided by eps
    would swamp the comparison; the forward check already ties the layer to the oracle."""
    rng = np.random.default_rng(7)
    errors = []
    for _ in range(directions):
        dp = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape), case.params)
        dx = rng.normal(size=case.x.shape)
        analytic = sum(float(np.sum(g * u)) for g, u in
                       zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves((dp, dx))))

        def at(step, dp=dp, dx=dx):
            shifted = jax.tree_util.tree_map(lambda a, d: a + step * d, case.params, dp)
            return case.oracle_loss(shifted, case.x + step * dx)

        numeric = (8 * (at(eps) - at(-eps)) - (at(2 * eps) - at(-2 * eps))) / (12 * eps)
        errors.append(abs(numeric - analytic) / abs(analytic))
    return max(errors)


def test_every_registered_mixer_has_a_case():
    assert {kind for kind, _, _ in CASES} == set(MIXERS.names()) == set(ORACLES)
    first = [next(c for c in CASES if c[0] == kind) for kind in ORACLES]
    assert all(len(tolerances) == 3 for _, _, tolerances in first)  # gradients and bfloat16 too


# Each kind's first case (forward, gradients and bfloat16) runs in `make test`; the forward-only
# variants after it run in `make test-extended`.
ORACLE_PARAMS = [pytest.param(i, id=case_id(c),
                              marks=[] if len(c[2]) == 3 else [pytest.mark.extended])
                 for i, c in enumerate(CASES)]


@pytest.mark.parametrize("index", ORACLE_PARAMS)
def test_mixer_matches_numpy_oracle(index):
    """Forward output (float64) against the oracle; with three tolerances also the parameter and
    input gradients and the bfloat16 output (one test per case: the checks share the layer's
    compilation, and a failure reports all of them)."""
    case = Case(index)
    want = case.oracle(case.params, case.x)
    assert np.max(np.abs(want)) > 0.1  # a non-trivial output to compare
    errors = {}
    if len(case.tolerances) == 3:
        got, grads = case.layer_output_and_grads()
        errors["gradient"] = directional_errors(case, grads)
        errors["bfloat16"] = rel_err(*case.bfloat16_output())
    else:
        got = case.layer_output()
    errors["forward"] = rel_err(got, want)
    limits = dict(zip(("forward", "gradient", "bfloat16"), case.tolerances))
    failed = {k: f"{errors[k]:.2e} > {limits[k]:.0e}" for k in errors if not errors[k] <= limits[k]}
    assert not failed, f"{case_id(CASES[index])}: {failed} (all errors: {errors})"
