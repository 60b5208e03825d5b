"""Drifting in-context regression: construction, determinism, errors, optimal curve, training."""

import json
import math

import ml_collections
import numpy as np
import pytest

from memjax.config import load_config
from memjax.tasks import TASKS, data
from memjax.tasks.regression import RegressionSlice, make_example, make_examples, optimal_mse

D = 4


def settings(seq_len=12, drift=0.1, noise=0.2, num_examples=50):
    return RegressionSlice(seq_len, drift, noise, num_examples)


def test_shapes_dtypes_and_feedback_column():
    ex = make_example(D, settings(), seed=3, index=7, return_weights=True)
    assert ex["inputs"].shape == (12, D + 1) and ex["inputs"].dtype == np.float32
    assert ex["targets"].shape == (12, 1) and ex["targets"].dtype == np.float32
    assert ex["weights"].shape == (12, D)
    # Position t carries [x_t, y_{t-1}], with 0 at t = 0.
    assert ex["inputs"][0, D] == 0.0
    np.testing.assert_array_equal(ex["inputs"][1:, D], ex["targets"][:-1, 0])
    assert set(make_example(D, settings(), 3, 7)) == {"inputs", "targets"}


def test_targets_recomputed_from_the_documented_draws():
    s = settings(seq_len=10, drift=0.3, noise=0.5)
    ex = make_example(D, s, seed=11, index=4, return_weights=True)
    rng = data.example_rng(11, 4)
    w0 = rng.standard_normal(D) / math.sqrt(D)
    steps = rng.standard_normal((9, D)) / math.sqrt(D)
    x = rng.standard_normal((10, D))
    eta = rng.standard_normal(10)
    w = [w0]
    for step in steps:
        w.append(w[-1] + 0.3 * step)
    w = np.array(w)
    y = (w * x).sum(axis=1) + 0.5 * eta
    np.testing.assert_allclose(ex["weights"], w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ex["inputs"][:, :D], x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ex["targets"][:, 0], y, rtol=1e-5, atol=1e-6)


def test_noise_free_targets_are_the_inner_products_of_the_returned_w_and_x():
    batch = make_examples(D, settings(noise=0.0, drift=0.2), seed=1, indices=np.arange(8),
                          return_weights=True)
    x, w = batch["inputs"][..., :D], batch["weights"]
    np.testing.assert_allclose(batch["targets"][..., 0], (w * x).sum(-1), rtol=1e-5, atol=1e-6)


def test_drift_zero_gives_a_constant_w_and_drift_moves_it_at_the_stated_scale():
    still = make_examples(D, settings(drift=0.0), 5, np.arange(20), return_weights=True)["weights"]
    np.testing.assert_array_equal(still, np.broadcast_to(still[:, :1], still.shape))
    moving = make_examples(8, settings(seq_len=200, drift=0.5), 5, np.arange(50),
                           return_weights=True)["weights"]
    increments = np.diff(moving.astype(np.float64), axis=1)
    # Each coordinate's step has standard deviation drift / sqrt(d) = 0.5 / sqrt(8).
    assert increments.std() == pytest.approx(0.5 / math.sqrt(8), rel=0.03)
    w0 = moving[:, 0].astype(np.float64)
    assert w0.std() == pytest.approx(1 / math.sqrt(8), rel=0.15)


def test_slices_differing_in_drift_share_x_and_w0():
    a = make_examples(D, settings(drift=0.0), 9, [0, 1], return_weights=True)
    b = make_examples(D, settings(drift=0.7, noise=0.0), 9, [0, 1], return_weights=True)
    np.testing.assert_array_equal(a["inputs"][..., :D], b["inputs"][..., :D])
    np.testing.assert_array_equal(a["weights"][:, 0], b["weights"][:, 0])


def test_examples_are_a_pure_function_of_seed_and_index():
    s = settings()
    batch = make_examples(D, s, 2, [5, 0, 5])
    single = make_example(D, s, 2, 5)
    for key in ("inputs", "targets"):
        np.testing.assert_array_equal(batch[key][0], single[key])
        np.testing.assert_array_equal(batch[key][2], single[key])
        assert not np.array_equal(batch[key][1], single[key])
        assert not np.array_equal(make_example(D, s, 3, 5)[key], single[key])


def test_optimal_curve_starts_at_the_prior_and_reaches_the_noise_floor():
    stationary = optimal_mse(D, settings(seq_len=16, drift=0.0, noise=0.0), 0, np.arange(400))
    assert stationary.shape == (400, 16)
    assert stationary[:, 0].mean() == pytest.approx(1.0, rel=0.2)  # E<w, x>^2 = E|w|^2 = 1
    assert stationary[:, D:].max() < 1e-6  # d noise-free observations determine w
    noisy = optimal_mse(D, settings(seq_len=40, drift=0.0, noise=0.3), 0, np.arange(400))
    assert noisy[:, 30:].mean() == pytest.approx(0.09, rel=0.2)
    drifting = optimal_mse(D, settings(seq_len=40, drift=0.3, noise=0.3), 0, np.arange(400))
    assert drifting[:, 30:].mean() > 1.3 * noisy[:, 30:].mean()  # drift costs accuracy


def task_config(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        name="drifting_regression", dim=D, train_slices=((12, 0.1, 0.1, 64),),
        test_slices=((12, 0.1, 0.1, 20), (16, 0.0, 0.1, 20)), batch_size=16, eval_batch_size=8))
    cfg.update(overrides)
    return cfg


def test_builder_declares_float_io_and_the_mse_loss():
    task = TASKS.get("drifting_regression")(task_config(), seed=0)
    assert (task.loss, task.input_dim, task.output_dim, task.sample_length) == ("mse", D + 1, 1, 12)
    assert list(task.test) == ["T12_drift0.1_noise0.1", "T16_drift0_noise0.1"]
    batch = next(iter(task.train))
    assert batch["inputs"].shape == (16, 12, D + 1) and batch["targets"].shape == (16, 12, 1)
    assert task.test["T16_drift0_noise0.1"][2]["inputs"].shape == (4, 16, D + 1)  # 20 = 8 + 8 + 4


@pytest.mark.parametrize("overrides, message", [
    ({"dim": 0}, r"task.dim = 0: dim must be >= 1"),
    ({"train_slices": ((0, 0.1, 0.1, 64),)}, r"task.train_slices\[0\] = \(0, 0.1, 0.1, 64\): seq_len must be >= 1"),
    ({"train_slices": ((12, -0.1, 0.1, 64),)}, r"task.train_slices\[0\].*drift must be a finite number >= 0, got drift=-0.1"),
    ({"test_slices": ((12, 0.1, float("nan"), 64),)}, r"task.test_slices\[0\].*noise must be a finite number >= 0"),
    ({"test_slices": ((12, 0.1, 0.1, 0),)}, r"task.test_slices\[0\].*num_examples must be >= 1"),
    ({"train_slices": ((12, 0.1, 64),)}, r"task.train_slices\[0\].*expected \(seq_len, drift, noise, num_examples\)"),
    ({"train_slices": ((12.5, 0.1, 0.1, 64),)}, r"seq_len must be an int"),
])
def test_bad_settings_fail_with_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        TASKS.get("drifting_regression")(task_config(**overrides), seed=0)


@pytest.mark.integration
def test_smoke_training_reduces_the_loss_and_reports_curves(tmp_path):
    from memjax.train.metrics import read_metrics
    from memjax.train.trainer import train

    config = load_config("configs/regression.py:smoke")
    result = train(config, tmp_path)
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(r["train/mse"] == r["train/loss"] for r in read_metrics(tmp_path) if "train/mse" in r)
    for name in ("T16_drift0.1_noise0.1", "T16_drift0_noise0.1"):
        curve = result[f"test/{name}/mse_by_position"]
        assert len(curve) == 16 and all(np.isfinite(curve))
        # The slice MSE is the mean of its curve (every position supervised, equal counts).
        assert result[f"test/{name}/mse"] == pytest.approx(np.mean(curve), rel=1e-6)
    assert "test/mse" in result and "test/accuracy" not in result
    assert json.loads((tmp_path / "result.json").read_text()) == result
    # metrics.jsonl keeps scalars only; the curves are in result.json.
    assert not any(isinstance(v, list) for r in read_metrics(tmp_path) for v in r.values())


def test_model_without_float_inputs_is_rejected_before_writing(tmp_path):
    from memjax.train.trainer import train

    config = load_config("configs/regression.py:smoke", {"model.input_dim": 0})
    with pytest.raises(ValueError, match=r"model.input_dim = 0 but the task's inputs are floats of width 5"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
