"""Optimizer masks: Muon only on 2-D hidden matrices, chosen by parameter class from config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memjax.config import lm_config, to_dict, train_config
from memjax.layers import initializers
from memjax.models import build_model
from memjax.train.optim import build_optimizer, learning_rate_schedule

HIDDEN = {"projection", "output", "ssm_input", "recurrent"}


def _params(mixer="gated_deltanet"):
    """A model with every class the optimizer distinguishes: untied LM head, MLP, conv, norms."""
    cfg = to_dict(lm_config(64, 16, mixer)) | {"tie_embeddings": False, "mlp_ratio": 2.0}
    return build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def _first_update(train, params, grads):
    optimizer = build_optimizer(train)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return updates


def test_muon_applies_to_2d_hidden_matrices_and_adam_to_the_rest():
    params = _params()
    train = train_config(steps=10, lr=1e-2)
    train.warmup_steps, train.weight_decay, train.grad_clip = 0, 0.0, 0.0  # lr 1e-2 at once
    train.optimizer = "muon"
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    muon = _first_update(train, params, grads)
    # Adam as optax's Muon runs it for the leaves it skips (Nesterov momentum, Muon's default):
    # what every exempt leaf must receive exactly.
    adam = optax.adam(learning_rate_schedule(train), b1=train.b1, b2=train.b2, nesterov=True)
    reference, _ = adam.update(grads, adam.init(params), params)
    classes = initializers.classify(params)
    seen = set()
    for path, cls in jax.tree_util.tree_flatten_with_path(classes)[0]:
        u_muon = np.asarray(_at(muon, path))
        u_adam = np.asarray(_at(reference, path))
        p = _at(params, path)
        if p.ndim == 2 and cls in HIDDEN:
            seen.add("muon")
            assert not np.allclose(u_muon, u_adam), (path, cls)
            # Orthogonalised: singular values of the update are about equal (not Adam's signs).
            s = np.linalg.svd(u_muon, compute_uv=False)
            assert s.max() / s.min() < 5, (path, s)
        else:
            seen.add(cls)
            np.testing.assert_allclose(u_muon, u_adam, rtol=1e-6, err_msg=str(path))
    assert {"muon", "embedding", "head", "conv", "norm", "dynamics"} <= seen


def test_muon_treats_each_layer_of_a_scanned_stack_as_the_loop_does():
    """Under model.scan_layers the kernels are [layers, in, out] stacks in `blocks/`: each layer
    gets the update the unscanned model's 2-D kernel gets (not Adam's)."""
    from memjax.models.lm import stack_params
    params = _params()
    train = train_config(steps=10, lr=1e-2)
    train.warmup_steps, train.weight_decay, train.grad_clip = 0, 0.0, 0.0
    train.optimizer = "muon"
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    loop = stack_params(_first_update(train, params, grads))
    scanned = _first_update(train, stack_params(params), stack_params(grads))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(loop)[0],
                            jax.tree_util.tree_leaves(scanned)):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-7, err_msg=str(path))


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_lm_head_and_embedding_have_their_own_classes():
    classes = initializers.classify(_params())
    assert classes["lm_head"]["kernel"] == "head"
    assert classes["embed"]["embedding"] == "embedding"


def test_muon_exempt_is_checked_against_the_class_list():
    train = train_config()
    train.muon_exempt = "embedding,heads"
    with pytest.raises(ValueError, match=r"train.muon_exempt names unknown parameter classes \['heads'\]"):
        build_optimizer(train)
