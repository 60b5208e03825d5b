"""`model.scan_layers` (blocks under nn.scan) and `model.remat` (rematerialised blocks).

A scanned model given the loop model's parameters (`stack_params`) computes the same logits,
gradients, sown losses and decoding; every remat policy gives the loop's gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode_helpers import prefill_then_decode
from memjax.config import lm_config, to_dict
from memjax.models import build_model
from memjax.models.lm import (REMAT_POLICIES, stack_layers, stack_params, unstack_layers,
                              unstack_params)
from memjax.train.step import loss_fn, supervised_batch

VOCAB, D, T, PROMPT = 32, 16, 12, 9

GDN = {"name": "gated_deltanet", "chunk_size": 4}
MOM = {"name": "mom", "num_memories": 2, "top_k": 1, "chunk_size": 4}  # sows losses, metrics
HYBRID = dict(mixer=None, layers="swa,gated_deltanet",
              mixers={"swa": {"name": "attention", "window": 3}, "gated_deltanet": GDN})

CASES = {
    "gated_deltanet": dict(num_layers=3, mixer=GDN, mlp_ratio=2.0, pos_emb="learned", max_len=T),
    "hybrid": dict(num_layers=4, **HYBRID),  # a period of 2, twice
    "mom": dict(num_layers=2, mixer=MOM),
    "attention": dict(num_layers=2, mixer={"name": "attention"}, mlp_ratio=2.0),  # cheap
}
SLOW = pytest.mark.slow  # on two busy CPU cores each gated_deltanet / mom case takes ~20-30 s


def make(case, **overrides):
    return build_model(dict(name="lm", vocab_size=VOCAB, d_model=D, short_conv=3)
                       | CASES[case] | overrides)


def tokens(batch=2, length=T):
    return jax.random.randint(jax.random.key(1), (batch, length), 0, VOCAB)


def loss(model, params, x):
    logits = model.apply({"params": params}, x)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])


def assert_trees_close(a, b, tol=2e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v),
                                                         rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("case", ["hybrid", pytest.param("gated_deltanet", marks=SLOW)])
def test_scanned_model_with_stacked_params_equals_the_loop(case):
    loop, scanned = make(case), make(case, scan_layers=True)
    x = tokens()
    params = loop.init(jax.random.key(0), x)["params"]
    stacked = stack_params(params, scanned.scan_period())
    # The stacked layout is the scanned model's own.
    own = jax.eval_shape(lambda: scanned.init(jax.random.key(0), x)["params"])
    assert jax.tree.structure(own) == jax.tree.structure(stacked)
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, stacked)
    assert jax.tree.structure(unstack_params(stacked)) == jax.tree.structure(params)

    np.testing.assert_allclose(np.asarray(scanned.apply({"params": stacked}, x)),
                               np.asarray(loop.apply({"params": params}, x)), rtol=2e-5, atol=2e-5)
    grads = jax.grad(lambda p: loss(loop, p, x))(params)
    scanned_grads = jax.grad(lambda p: loss(scanned, p, x))(stacked)
    assert_trees_close(unstack_params(scanned_grads), grads)


def test_period_is_the_shortest_repeat():
    assert make("gated_deltanet", scan_layers=True).scan_period() == 1
    assert make("hybrid", scan_layers=True).scan_period() == 2
    same = make("hybrid", layers="swa,swa", mixers={"swa": {"name": "attention", "window": 3}})
    assert same.scan_period() == 1
    params = make("hybrid").init(jax.random.key(0), tokens())["params"]
    stacked = stack_params(params, 2)
    assert stacked["blocks"]["block_0"]["mixer"]["qkv"]["kernel"].shape == (2, D, 3 * D)
    assert set(stacked["blocks"]) == {"block_0", "block_1"}


def test_params_of_the_other_layout_raise_a_clear_error():
    loop, scanned = make("gated_deltanet"), make("gated_deltanet", scan_layers=True)
    x = tokens()
    params = loop.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="stack_params"):
        scanned.apply({"params": params}, x)
    with pytest.raises(ValueError, match="unstack_params"):
        loop.apply({"params": stack_params(params)}, x)


def test_sown_losses_and_metrics_reduce_in_the_train_step_as_in_the_loop():
    """The train step sums per-layer auxiliary losses; the scan gives its sown values back per
    layer (under `blocks/`), so the weighted total and every per-layer metric agree."""
    loop, scanned = make("mom"), make("mom", scan_layers=True)
    labels = np.array(tokens(), np.int32)
    labels[:, ::2] = -100
    batch = supervised_batch({"inputs": np.asarray(tokens()), "labels": labels})
    params = loop.init(jax.random.key(0), batch["inputs"])["params"]
    weights = {"load_balance": 3.0}
    total, metrics = loss_fn(params, loop, batch, aux_weights=weights)
    scanned_total, scanned_metrics = loss_fn(stack_params(params), scanned, batch,
                                             aux_weights=weights)
    assert "aux/block_1/mixer/load_balance" in metrics
    renamed = {k.replace("aux/blocks/", "aux/"): v for k, v in scanned_metrics.items()}
    assert set(renamed) == set(metrics)
    for key in metrics:
        np.testing.assert_allclose(float(renamed[key]), float(metrics[key]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(scanned_total), float(total), rtol=1e-5)
    aux = sum(float(metrics[f"aux/block_{i}/mixer/load_balance"]) for i in range(2))
    np.testing.assert_allclose(float(total), float(metrics["loss"]) + 3.0 * aux, rtol=1e-5)
    # Gradients through the auxiliary losses agree too.
    grads = jax.grad(lambda p: loss_fn(p, loop, batch, aux_weights=weights)[0])(params)
    scanned_grads = jax.grad(lambda p: loss_fn(p, scanned, batch, aux_weights=weights)[0])(
        stack_params(params))
    assert_trees_close(unstack_params(scanned_grads), grads)


def test_plain_apply_sows_nothing_and_intermediates_come_back_per_layer():
    scanned = make("attention", scan_layers=True)
    x = tokens()
    params = scanned.init(jax.random.key(0), x)["params"]
    assert scanned.apply({"params": params}, x).shape == (2, T, VOCAB)
    _, sown = scanned.apply({"params": params}, x, mutable=["intermediates"],
                            capture_intermediates=lambda mdl, method: mdl.name == "mixer"
                            and method == "__call__")
    mixers = sown["intermediates"]["blocks"]
    assert set(mixers) == {"block_0", "block_1"}
    assert "losses" not in sown and "metrics" not in sown
    assert mixers["block_1"]["mixer"]["__call__"][0].shape == (2, T, D)


@pytest.mark.parametrize("case", ["hybrid", pytest.param("gated_deltanet", marks=SLOW)])
def test_scanned_prefill_then_decode_equals_full_forward(case):
    loop, scanned = make(case), make(case, scan_layers=True)
    x = tokens()
    params = stack_params(loop.init(jax.random.key(0), x)["params"], scanned.scan_period())
    full = scanned.apply({"params": params}, x)
    apply = jax.jit(lambda t, c: scanned.apply({"params": params}, t, cache=c))
    cache = scanned.init_cache(2, T)
    assert len(cache["blocks"]) == scanned.scan_period()
    decoded, cache = prefill_then_decode(apply, x, PROMPT, cache)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=2e-4, atol=2e-4)
    assert int(cache["length"]) == T
    assert scanned.state_size(T) == loop.state_size(T)
    # The stacked cache is the loop's one, stacked: it continues decoding in the loop model.
    loop_cache = {"length": cache["length"], "blocks": unstack_layers(cache["blocks"])}
    assert jax.tree.structure(loop_cache) == jax.tree.structure(loop.init_cache(2, T))
    assert jax.tree.structure(stack_layers(loop_cache["blocks"], scanned.scan_period())) == \
        jax.tree.structure(cache["blocks"])


@pytest.mark.parametrize("case", ["attention", pytest.param("gated_deltanet", marks=SLOW)])
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("remat", [
    pytest.param(r, marks=[] if r == "full" else [pytest.mark.extended])
    for r in REMAT_POLICIES if r != "none"])
def test_every_remat_policy_gives_the_same_gradients(remat, scan, case):
    base, model = make(case), make(case, remat=remat, scan_layers=scan)
    x = tokens()
    params = base.init(jax.random.key(0), x)["params"]
    grads = jax.grad(lambda p: loss(base, p, x))(params)
    if scan:
        params = stack_params(params)
    remat_grads = jax.grad(lambda p: loss(model, p, x))(params)
    assert_trees_close(unstack_params(remat_grads) if scan else remat_grads, grads, tol=1e-6)


@SLOW
def test_remat_decodes_and_sows():
    model = make("mom", remat="full", scan_layers=True)
    x = tokens()
    params = model.init(jax.random.key(0), x)["params"]
    _, sown = model.apply({"params": params}, x, mutable=["losses"])
    assert set(sown["losses"]["blocks"]) == {"block_0", "block_1"}
    logits, _ = model.apply({"params": params}, x, cache=model.init_cache(2, T))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply({"params": params}, x)),
                               rtol=2e-4, atol=2e-4)


def test_unknown_remat_raises_listing_the_known():
    model = make("gated_deltanet", remat="some")
    with pytest.raises(ValueError, match="unknown remat 'some'; known: none, full, dots_saveable"):
        model.init(jax.random.key(0), tokens())


def temp_bytes(remat, scan=False):
    model = build_model(dict(name="lm", vocab_size=VOCAB, d_model=64, num_layers=4,
                             mixer={"name": "gated_deltanet"}, remat=remat, scan_layers=scan))
    x = tokens(2, 256)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])
    grad_fn = jax.jit(jax.grad(lambda p, t: loss(model, p, t)))
    return grad_fn.lower(params, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_full_remat_needs_less_temporary_memory(scan):
    assert temp_bytes("full", scan) < temp_bytes("none", scan)


def test_config_has_the_keys_and_the_model_takes_them():
    model_cfg = lm_config(VOCAB, D, "gated_deltanet")
    assert model_cfg.scan_layers is False and model_cfg.remat == "none"
    options = to_dict(model_cfg) | {"scan_layers": True, "remat": "dots_saveable"}
    model = build_model(options)
    assert model.scan_layers and model.remat == "dots_saveable"
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens())["params"])
    assert params["blocks"]["block_0"]["mixer"]["out"]["kernel"].shape == (2, D, D)


def test_checkpoints_from_before_the_keys_resume_and_remat_may_change():
    from memjax.train.checkpoint import _differences, _with_legacy_settings

    current = to_dict(lm_config(VOCAB, D, "gated_deltanet"))
    saved = {k: v for k, v in current.items() if k not in ("scan_layers", "remat")}
    assert _differences(_with_legacy_settings(saved), current, "model") == []
    assert _differences(current, current | {"remat": "full"}, "model") == []
    assert _differences(current, current | {"scan_layers": True}, "model") == [
        "model.scan_layers: checkpoint has False, config has True"]
