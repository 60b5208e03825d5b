"""Mixture of memories: what the router does to the memories' states, capacity, causality.

The float64 oracle (a plain loop over memories, tests/layers/numpy_mixers.py `mom_np`) checks
the output and gradients in test_mixer_oracles.py; prefill-then-decode is in test_decoding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.layers import build_mixer
from memjax.layers.mom import apply_capacity, load_balance_loss, route

D, T = 16, 12


def _x(seed=0, batch=2, length=T):
    return jax.random.normal(jax.random.key(seed), (batch, length, D))


def test_one_memory_top1_is_gated_deltanet_with_the_same_parameters():
    mom = build_mixer(D, {"name": "mom", "num_memories": 1, "top_k": 1, "chunk_size": 4})
    single = build_mixer(D, {"name": "gated_deltanet", "chunk_size": 4})
    params = mom.init(jax.random.key(1), _x())["params"]
    shared = {name: leaf for name, leaf in params.items() if name != "router"}
    assert (jax.tree_util.tree_structure(shared)
            == jax.tree_util.tree_structure(single.init(jax.random.key(1), _x())["params"]))
    np.testing.assert_array_equal(mom.apply({"params": params}, _x()),
                                  single.apply({"params": shared}, _x()))


def _routed_to_first(params):
    """The router sends every token of a positive input to memory 0 (logit +s against -s)."""
    kernel = np.zeros(params["router"]["kernel"].shape, np.float32)
    kernel[:, 0], kernel[:, 1:] = 1.0, -1.0
    return {**params, "router": {"kernel": jnp.asarray(kernel)}}


@pytest.mark.parametrize("impl", ["reference", "chunk"])
@pytest.mark.parametrize("family", ["gated_deltanet", "gla"])
def test_a_memory_no_token_is_routed_to_keeps_its_state_bit_for_bit(impl, family):
    layer = build_mixer(D, {"name": "mom", "num_memories": 3, "top_k": 1, "memory": family,
                            "chunk_size": 4, "impl": impl})
    x = jnp.abs(_x()) + 0.1  # positive: the router below prefers memory 0 for every token
    params = _routed_to_first(layer.init(jax.random.key(1), x)["params"])
    cache = layer.init_cache(2, T)
    cache["state"] = jax.random.normal(jax.random.key(2), cache["state"].shape)
    _, new_cache = layer.apply({"params": params}, x, cache)
    heads = layer.num_heads
    before, after = cache["state"], new_cache["state"]
    np.testing.assert_array_equal(after[:, heads:], before[:, heads:])  # memories 1 and 2
    assert not np.allclose(after[:, :heads], before[:, :heads])  # memory 0 took every token


def test_capacity_drops_follow_the_rule_and_are_counted():
    # Top-1 of 2 memories, capacity 1: a memory may hold (t + 1) / 2 of the first t + 1 tokens.
    # Every token wants memory 0, so it accepts positions 0, 2, 4, ... and drops the rest.
    layer = build_mixer(D, {"name": "mom", "num_memories": 2, "top_k": 1, "capacity": 1.0,
                            "chunk_size": 4})
    x = jnp.abs(_x()) + 0.1
    params = _routed_to_first(layer.init(jax.random.key(1), x)["params"])
    y, sown = layer.apply({"params": params}, x, mutable=["metrics"])
    metrics = {name: float(value[0]) for name, value in sown["metrics"].items()}
    assert metrics == {"share_0": 0.5, "share_1": 0.0, "dropped": 0.5}
    np.testing.assert_array_equal(y, layer.apply({"params": params}, x))  # deterministic

    selected = jnp.zeros((1, 8, 2), bool).at[:, :, 0].set(True)
    accepted, counts = apply_capacity(selected, 1.0, 1, jnp.zeros((1, 2), jnp.int32), 0)
    np.testing.assert_array_equal(accepted[0, :, 0], [1, 0, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(counts, [[4, 0]])
    # Resuming at position 8 with those counts continues the same pattern.
    more, _ = apply_capacity(selected, 1.0, 1, counts, 8)
    np.testing.assert_array_equal(more[0, :, 0], [1, 0, 1, 0, 1, 0, 1, 0])


def test_capacity_with_mixed_routing_matches_a_written_out_count():
    rng = np.random.default_rng(0)
    selected = rng.random((2, 20, 4)) < 0.5
    capacity, top_k = 1.25, 2
    accepted, counts = apply_capacity(jnp.asarray(selected), capacity, top_k,
                                      jnp.zeros((2, 4), jnp.int32), 0)
    want = np.zeros_like(selected)
    for b in range(2):
        held = np.zeros(4)
        for t in range(20):
            for m in range(4):
                want[b, t, m] = selected[b, t, m] and held[m] < capacity * top_k * (t + 1) / 4
                held[m] += want[b, t, m]
    np.testing.assert_array_equal(accepted, want)
    np.testing.assert_array_equal(counts, want.sum(axis=1))


def test_the_layer_is_causal_and_keeps_sequences_apart():
    """Short convolutions run in time order before routing, and capacity counts only earlier
    tokens: changing token t of sequence 0 changes nothing before t, and nothing in sequence 1."""
    layer = build_mixer(D, {"name": "mom", "num_memories": 3, "top_k": 2, "capacity": 1.0,
                            "shared_memory": True, "chunk_size": 4})
    x = _x()
    params = layer.init(jax.random.key(1), x)["params"]
    y = layer.apply({"params": params}, x)
    t = 7
    y2 = layer.apply({"params": params}, x.at[0, t].add(3.0))
    np.testing.assert_array_equal(y2[0, :t], y[0, :t])
    np.testing.assert_array_equal(y2[1], y[1])
    assert not np.allclose(y2[0, t], y[0, t])


@pytest.mark.parametrize("top_k", [1, 2])
def test_probability_weights_train_the_router_at_top_1_where_renormalised_ones_cannot(top_k):
    """Renormalised top-1 weights are exactly 1: the task loss gives the router's logits no
    gradient (the choice is an arg-max). The probabilities themselves (renormalize=False) give it
    one at any k, as renormalised weights do from top-2 on."""
    logits = jax.random.normal(jax.random.key(0), (2, 5, 4))
    readout = jax.random.normal(jax.random.key(1), (2, 5, 4))  # stands in for o_tm

    def logit_grad(renormalize):
        return jax.grad(lambda l: jnp.sum(route(l, top_k, renormalize)[0] * readout))(logits)

    weights, probs, selected = route(logits, top_k, renormalize=False)
    np.testing.assert_array_equal(weights, jnp.where(selected, probs, 0.0))
    assert float(jnp.max(jnp.abs(logit_grad(False)))) > 0.05
    renormalised_grad = float(jnp.max(jnp.abs(logit_grad(True))))
    assert (renormalised_grad < 1e-6) if top_k == 1 else (renormalised_grad > 0.05)


def test_load_balance_loss_is_one_when_balanced_and_larger_when_not():
    M = 4
    uniform = jnp.full((1, 8, M), 1.0 / M)
    spread = jnp.asarray(np.eye(M, dtype=bool)[np.arange(8) % M][None])  # each memory twice
    np.testing.assert_allclose(load_balance_loss(uniform, spread, 1), 1.0, rtol=1e-6)
    skewed = jnp.asarray(np.tile([0.7, 0.1, 0.1, 0.1], (1, 8, 1)))
    all_first = jnp.zeros((1, 8, M), bool).at[:, :, 0].set(True)
    np.testing.assert_allclose(load_balance_loss(skewed, all_first, 1), M * 0.7, rtol=1e-6)


def test_training_sows_the_weighted_balance_loss():
    layer = build_mixer(D, {"name": "mom", "balance_weight": 0.5, "chunk_size": 4})
    params = layer.init(jax.random.key(1), _x())["params"]
    _, sown = layer.apply({"params": params}, _x(), mutable=["losses"])
    (loss,) = sown["losses"]["load_balance"]
    assert 0.5 <= float(loss) < 0.5 * layer.num_memories  # >= 1 unweighted, < M


@pytest.mark.parametrize("options, match", [
    ({"memory": "mamba"}, "unknown memory family 'mamba'"),
    ({"top_k": 5}, "top_k must be in"),
    ({"num_heads": 3}, "divisible|num_heads"),
])
def test_bad_options_raise(options, match):
    layer = build_mixer(D, {"name": "mom", **options})
    with pytest.raises(ValueError, match=match):
        layer.init(jax.random.key(0), _x())
