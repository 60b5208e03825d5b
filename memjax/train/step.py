"""The train state, the loss at supervised positions, and the jit-able train and eval steps.

Two losses, chosen by the task (`TaskData.loss`):
  `"cross_entropy"`: token classification at the positions whose label is not IGNORE_INDEX
    (`supervised_batch`), scored by accuracy.
  `"mse"`: regression on float targets at every position the mask keeps (`regression_batch`),
    scored by mean squared error, also per position.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.tasks.data import IGNORE_INDEX  # label of unsupervised positions, for every task


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # PRNG key for stochastic layers; split once per step


def supervised_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Host-side: keeps, per row, only the positions whose label is not IGNORE_INDEX.

    `batch["inputs"]`, `batch["labels"]`: `[B, T]`. Returns inputs plus `positions`, `targets`,
    `mask` of shape `[B, M]`, where M (a power of two, at most T) covers the row with most
    supervised positions; the model then computes logits at M positions instead of T.
    """
    inputs, labels = np.asarray(batch["inputs"]), np.asarray(batch["labels"])
    supervised = labels != IGNORE_INDEX
    most = max(int(supervised.sum(axis=1).max()), 1)
    width = min(1 << (most - 1).bit_length(), labels.shape[1])
    positions = np.argsort(~supervised, axis=1, kind="stable")[:, :width]
    mask = np.take_along_axis(supervised, positions, axis=1)
    targets = np.where(mask, np.take_along_axis(labels, positions, axis=1), 0)
    return {"inputs": inputs.astype(np.int32), "positions": positions.astype(np.int32),
            "targets": targets.astype(np.int32), "mask": mask.astype(np.float32)}


def regression_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Host-side: a regression batch as float32 arrays with an explicit mask.

    `batch["inputs"]`: `[B, T, n]`, `batch["targets"]`: `[B, T, o]`, optional `batch["mask"]`:
    `[B, T]` (nonzero = supervised; default all positions). Returns the three as float32.
    """
    inputs = np.asarray(batch["inputs"], np.float32)
    targets = np.asarray(batch["targets"], np.float32)
    if inputs.ndim != 3 or targets.ndim != 3 or inputs.shape[:2] != targets.shape[:2]:
        raise ValueError(f"regression batches need inputs [B, T, n] and targets [B, T, o], got "
                         f"{inputs.shape} and {targets.shape}")
    mask = batch.get("mask")
    mask = np.ones(inputs.shape[:2], np.float32) if mask is None else (np.asarray(mask) != 0)
    return {"inputs": inputs, "targets": targets, "mask": mask.astype(np.float32)}


def prepare_batch(batch: dict[str, np.ndarray], loss: str) -> dict[str, np.ndarray]:
    """`supervised_batch` for `"cross_entropy"`, `regression_batch` for `"mse"`."""
    return regression_batch(batch) if loss == "mse" else supervised_batch(batch)


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads a supervised batch to `rows` rows with fully masked rows (for even sharding)."""
    missing = rows - batch["inputs"].shape[0]
    if missing <= 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def _logits_and_hits(model, params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"]).astype(jnp.float32)
    hits = (jnp.argmax(logits, axis=-1) == batch["targets"]) * batch["mask"]
    return logits, hits


def loss_fn(params, model, batch):
    """Mean cross-entropy over supervised positions, and token accuracy."""
    logits, hits = _logits_and_hits(model, params, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    count = jnp.maximum(batch["mask"].sum(), 1.0)
    loss = (ce * batch["mask"]).sum() / count
    return loss, {"loss": loss, "accuracy": hits.sum() / count}


def _squared_errors(model, params, batch):
    """Per-position squared error averaged over the output width, masked: `[B, T]`."""
    preds = model.apply({"params": params}, batch["inputs"]).astype(jnp.float32)
    return jnp.square(preds - batch["targets"]).mean(axis=-1) * batch["mask"]


def mse_loss_fn(params, model, batch):
    """Mean squared error over supervised positions (and output channels); metric `mse` = loss."""
    squared = _squared_errors(model, params, batch)
    loss = squared.sum() / jnp.maximum(batch["mask"].sum(), 1.0)
    return loss, {"loss": loss, "mse": loss}


def make_train_step(model, optimizer, loss: str = "cross_entropy"):
    """`(state, batch) -> (state, metrics)`: one AdamW/Muon update on the mean loss.

    `loss="cross_entropy"` (metrics `loss`, `accuracy`) or `"mse"` (metrics `loss`, `mse`).
    """
    objective = mse_loss_fn if loss == "mse" else loss_fn

    def train_step(state: TrainState, batch):
        rng, _ = jax.random.split(state.rng)
        grads, metrics = jax.grad(objective, has_aux=True)(state.params, model, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return train_step


def make_eval_step(model, loss: str = "cross_entropy"):
    """`(params, batch) -> (sum of per-example accuracy, number of examples)`.

    Per-example accuracy is the fraction of its supervised positions predicted exactly; rows
    without supervision (padding) count for nothing. This is Zoology's `valid/accuracy`.

    With `loss="mse"`: `(params, batch) -> (squared-error sums [T], supervised counts [T])`,
    summed over rows per position (padding rows have mask 0 and add nothing).
    """
    if loss == "mse":
        def mse_eval_step(params, batch):
            return _squared_errors(model, params, batch).sum(axis=0), batch["mask"].sum(axis=0)

        return mse_eval_step

    def eval_step(params, batch):
        _, hits = _logits_and_hits(model, params, batch)
        per_row = batch["mask"].sum(axis=1)
        has_targets = per_row > 0
        accuracy = jnp.where(has_targets, hits.sum(axis=1) / jnp.maximum(per_row, 1.0), 0.0)
        return accuracy.sum(), has_targets.sum()

    return eval_step
