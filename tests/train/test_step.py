"""The train and eval steps on hand-built inputs: batches, losses, accuracy, sown aux losses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.tasks.data import IGNORE_INDEX
from memjax.train.step import (cross_entropy, loss_fn, make_eval_step, mean_squared_error,
                               pad_rows, supervised_batch)

X = IGNORE_INDEX


def test_supervised_batch_keeps_labelled_positions_in_order():
    labels = np.array([[X, 3, X, 5, X], [X, X, X, X, X], [7, X, X, X, 9]])
    batch = supervised_batch({"inputs": np.arange(15).reshape(3, 5), "labels": labels})
    np.testing.assert_array_equal(batch["positions"][[0, 2]], [[1, 3], [0, 4]])
    np.testing.assert_array_equal(batch["targets"], [[3, 5], [0, 0], [7, 9]])
    np.testing.assert_array_equal(batch["mask"], [[1, 1], [0, 0], [1, 1]])
    assert batch["inputs"].dtype == batch["positions"].dtype == np.int32


def test_supervised_batch_width_is_a_power_of_two_at_most_t():
    three = np.array([[1, 2, 3, X, X, X]])
    assert supervised_batch({"inputs": three, "labels": three})["positions"].shape == (1, 4)
    full = np.array([[1, 2, 3, 4, 5, 6]])  # 6 supervised: the next power of two, 8, exceeds T
    assert supervised_batch({"inputs": full, "labels": full})["positions"].shape == (1, 6)


def test_pad_rows_adds_fully_masked_rows_only_when_needed():
    batch = {"inputs": np.ones((2, 3), np.int32), "mask": np.ones((2, 3), np.float32)}
    padded = pad_rows(batch, 4)
    np.testing.assert_array_equal(padded["mask"], [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(padded["inputs"][2:], 0)
    assert padded["inputs"].dtype == np.int32
    assert pad_rows(batch, 2) is batch


def test_cross_entropy_and_accuracy_average_supervised_positions_only():
    logits = np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
                              [[0.5, 0.25, 0.25], [1e-6, 1e-6, 1.0]]], np.float32))
    batch = {"targets": np.array([[0, 1], [2, 2]]), "mask": np.array([[1.0, 1.0], [1.0, 0.0]])}
    loss, metrics = cross_entropy(jnp.asarray(logits), batch)
    expected = -(np.log(0.7) + np.log(0.1) + np.log(0.25)) / 3  # the masked position is skipped
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), 1 / 3, rtol=1e-6)  # only (0, 0) right


def test_mean_squared_error_averages_channels_and_supervised_positions():
    preds = jnp.array([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])
    batch = {"targets": np.array([[[0.0, 0.0], [1.0, 3.0], [0.0, 0.0]]]),
             "mask": np.array([[1.0, 1.0, 0.0]])}
    loss, metrics = mean_squared_error(preds, batch)
    np.testing.assert_allclose(float(loss), ((1 + 4) / 2 + (1 + 9) / 2) / 2)
    assert metrics["mse"] == loss


class FixedOutputs:
    """A stand-in model whose outputs are given (it ignores parameters and inputs)."""

    def __init__(self, outputs):
        self.outputs = jnp.asarray(outputs)

    def apply(self, variables, inputs, *args, mutable=None):
        return (self.outputs, {}) if mutable else self.outputs


def test_eval_step_sums_per_example_accuracy_over_rows_with_targets():
    one_hot = np.eye(4, dtype=np.float32)
    logits = one_hot[[[1, 2], [3, 0], [0, 0]]]  # predictions [[1, 2], [3, 0], [0, 0]]
    batch = {"inputs": np.zeros((3, 4), np.int32), "positions": np.zeros((3, 2), np.int32),
             "targets": np.array([[1, 2], [3, 3], [0, 0]]),
             "mask": np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])}  # row 3: padding
    accuracy_sum, examples = make_eval_step(FixedOutputs(logits))(None, batch)
    assert float(accuracy_sum) == 1.5 and int(examples) == 2


def test_mse_eval_step_sums_per_position():
    preds = np.array([[[1.0], [2.0]], [[3.0], [0.0]]])
    batch = {"inputs": np.zeros((2, 2, 1), np.float32), "targets": np.zeros((2, 2, 1)),
             "mask": np.array([[1.0, 1.0], [1.0, 0.0]])}
    sums, counts = make_eval_step(FixedOutputs(preds), "mse")(None, batch)
    np.testing.assert_allclose(sums, [1 + 9, 4])
    np.testing.assert_allclose(counts, [2, 1])


class SowsPenalty(nn.Module):
    """Logits from a Dense layer; sows their mean square as the loss `penalty` and a metric."""

    @nn.compact
    def __call__(self, inputs, positions):
        logits = nn.Dense(3)(jax.nn.one_hot(inputs, 3))
        logits = jnp.take_along_axis(logits, positions[..., None], axis=1)
        self.sow("losses", "penalty", jnp.mean(jnp.square(logits)))
        self.sow("metrics", "logit_max", jnp.max(logits))
        return logits


@pytest.fixture
def sown_setup():
    model = SowsPenalty()
    inputs = np.array([[0, 1, 2], [2, 1, 0]], np.int32)
    batch = supervised_batch({"inputs": inputs, "labels": np.array([[X, 1, 2], [X, X, 0]])})
    params = model.init(jax.random.key(0), batch["inputs"], batch["positions"])["params"]
    return model, params, batch


def test_sown_loss_is_added_with_its_weight_and_reported(sown_setup):
    model, params, batch = sown_setup
    task, _ = cross_entropy(model.apply({"params": params}, batch["inputs"], batch["positions"]), batch)
    total, metrics = loss_fn(params, model, batch, aux_weights={"penalty": 0.5})
    penalty = metrics["aux/penalty"]
    np.testing.assert_allclose(float(total), float(task + 0.5 * penalty), rtol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(task))  # `loss` is the task loss
    assert set(metrics) == {"loss", "accuracy", "aux/penalty", "aux/logit_max"}
    default, _ = loss_fn(params, model, batch)  # an unnamed sown loss weighs 1.0
    np.testing.assert_allclose(float(default), float(task + penalty), rtol=1e-6)


def test_sown_loss_changes_the_gradient(sown_setup):
    model, params, batch = sown_setup

    def grads(weight):
        return jax.grad(lambda p: loss_fn(p, model, batch, aux_weights={"penalty": weight})[0])(params)

    without, with_penalty = grads(0.0), grads(3.0)
    penalty_grad = jax.grad(lambda p: jnp.mean(jnp.square(model.apply(
        {"params": p}, batch["inputs"], batch["positions"]))))(params)
    jax.tree.map(lambda a, b, g: np.testing.assert_allclose(b - a, 3.0 * g, rtol=1e-4, atol=1e-6),
                 without, with_penalty, penalty_grad)
    assert any(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(penalty_grad))
