"""The train state, the loss at supervised positions, and the jit-able train and eval steps.

Two losses, chosen by the task (`TaskData.loss`):
  `"cross_entropy"`: token classification at the positions whose label is not IGNORE_INDEX
    (`supervised_batch`), scored by accuracy.
  `"mse"`: regression on float targets at every position the mask keeps (`regression_batch`),
    scored by mean squared error, also per position.

Auxiliary losses and diagnostics: a layer may `self.sow("losses", name, value)` or
`self.sow("metrics", name, value)` (flax.linen). The train step applies the model with both
collections mutable; each sown value is reduced to the mean of its elements (and of repeated
sows at one place). Sown losses are added to the task loss with the weight given to their name
in `aux_weights` (default 1.0); sown losses (unweighted) and metrics are returned as train
metrics `aux/<module path>/<name>`. Evaluation applies the model without them (sow is a no-op).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

# Label of unsupervised positions, for every task; the key under which row batches carry their
# slice's declared most supervised positions (`memjax.tasks.data.with_rows`).
from memjax.tasks.data import IGNORE_INDEX, MAX_SUPERVISED


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # PRNG key for stochastic layers; split once per step


def supervised_width(most: int, length: int) -> int:
    """M: the smallest power of two >= `most` supervised positions (at least 1), at most T."""
    return min(1 << (max(most, 1) - 1).bit_length(), length)


def supervised_batch(batch: dict[str, np.ndarray], most: int | None = None) -> dict[str, np.ndarray]:
    """Host-side: keeps, per row, only the positions whose label is not IGNORE_INDEX.

    `batch["inputs"]`, `batch["labels"]`: `[B, T]`. Returns inputs plus `positions`, `targets`,
    `mask` of shape `[B, M]`, where M = `supervised_width(most, T)` (a power of two, at most T)
    covers `most` supervised positions per row, by default the count of the row with the most;
    the model then computes logits at M positions instead of T. A given `most` (the same on every
    process, whatever its rows: `prepare_rows`) is checked: a row with more supervised positions
    is a ValueError (it would lose some).
    """
    inputs, labels = np.asarray(batch["inputs"]), np.asarray(batch["labels"])
    supervised = labels != IGNORE_INDEX
    most_here = int(supervised.sum(axis=1).max()) if len(labels) else 0
    if most is None:
        most = most_here
    elif most_here > most:
        raise ValueError(f"a row has {most_here} supervised positions (labels other than "
                         f"IGNORE_INDEX), more than the {most} its slice declares "
                         "(memjax.tasks.data.Slice.max_supervised)")
    width = supervised_width(most, labels.shape[1])
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


def prepare_batch(batch: dict[str, np.ndarray], loss: str,
                  most: int | None = None) -> dict[str, np.ndarray]:
    """`supervised_batch` (of `most`) for `"cross_entropy"`, `regression_batch` for `"mse"`."""
    return regression_batch(batch) if loss == "mse" else supervised_batch(batch, most)


def prepare_rows(batch: dict, loss: str, several: bool) -> dict[str, np.ndarray]:
    """`prepare_batch` of one process's rows of a batch (`memjax.tasks.data.with_rows`), with a
    supervised width every process picks alike without seeing the others' rows.

    One process (`several` False; its rows are the whole batch): the width of the batch's own
    most supervised row, as `prepare_batch` picks. Several: covering the `MAX_SUPERVISED` the
    batch carries (its slice's declared most), else the full length T; the same for every
    process, and equal to the one-process width when some row of the batch has the declared
    count (every task in `memjax.tasks` has a fixed count per slice).
    """
    batch = dict(batch)
    declared = batch.pop(MAX_SUPERVISED, None)
    if loss == "mse" or not several:
        return prepare_batch(batch, loss)
    most = int(declared) if declared is not None else np.shape(batch["labels"])[1]
    return supervised_batch(batch, most)


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads a supervised batch to `rows` rows with fully masked rows (for even sharding)."""
    missing = rows - batch["inputs"].shape[0]
    if missing <= 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


AUX_COLLECTIONS = ("losses", "metrics")


def _flatten_sown(collection) -> dict[str, jax.Array]:
    """`{"a/b/name": scalar}` from a sown collection (nested dicts whose leaves are tuples)."""
    flat = {}
    for path, values in traverse_util.flatten_dict(collection, sep="/").items():
        flat[path] = jnp.mean(jnp.stack([jnp.mean(v.astype(jnp.float32)) for v in values]))
    return flat


def _apply(model, params, batch, *args, aux: bool):
    """The model's outputs on `batch["inputs"]`; with `aux`, also `(losses, metrics)` sown."""
    variables = {"params": params}
    if not aux:
        return model.apply(variables, batch["inputs"], *args)
    out, sown = model.apply(variables, batch["inputs"], *args, mutable=AUX_COLLECTIONS)
    return out, _flatten_sown(sown.get("losses", {})), _flatten_sown(sown.get("metrics", {}))


def _hits(logits, batch):
    """`[B, M]`: 1 where the argmax of `logits` is the target at a supervised position."""
    return (jnp.argmax(logits, axis=-1) == batch["targets"]) * batch["mask"]


def cross_entropy(logits, batch):
    """`(loss, metrics)`: mean cross-entropy over supervised positions, and token accuracy.

    `logits`: `[B, M, vocab]` at `batch["positions"]`; `targets`, `mask`: `[B, M]`. Both are
    means over the supervised positions of the whole batch (rows weigh by their count).
    """
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    count = jnp.maximum(batch["mask"].sum(), 1.0)
    loss = (ce * batch["mask"]).sum() / count
    return loss, {"loss": loss, "accuracy": _hits(logits, batch).sum() / count}


def squared_errors(preds, batch):
    """`[B, T]`: squared error averaged over the output width, times the mask."""
    return jnp.square(preds.astype(jnp.float32) - batch["targets"]).mean(axis=-1) * batch["mask"]


def mean_squared_error(preds, batch):
    """`(loss, metrics)`: squared error averaged over supervised positions and output channels;
    the metric `mse` equals the loss."""
    loss = squared_errors(preds, batch).sum() / jnp.maximum(batch["mask"].sum(), 1.0)
    return loss, {"loss": loss, "mse": loss}


def loss_fn(params, model, batch, loss: str = "cross_entropy", aux_weights=None):
    """`(total loss, metrics)`: the task loss plus the weighted sown losses (see the module doc).

    `aux_weights`: sown name (the last part of its path) -> weight; unnamed ones weigh 1.0.
    """
    if loss == "mse":
        out, aux_losses, aux_metrics = _apply(model, params, batch, aux=True)
        total, metrics = mean_squared_error(out, batch)
    else:
        out, aux_losses, aux_metrics = _apply(model, params, batch, batch["positions"], aux=True)
        total, metrics = cross_entropy(out, batch)
    weights = dict(aux_weights or {})
    for path, value in aux_losses.items():
        total = total + weights.get(path.rsplit("/", 1)[-1], 1.0) * value
    metrics |= {f"aux/{path}": value for path, value in (aux_losses | aux_metrics).items()}
    return total, metrics


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_compute_dtype(name: str):
    """The jnp dtype of `train.compute_dtype` ("float32" or "bfloat16"); ValueError otherwise."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"train.compute_dtype = {name!r}; known: {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def cast_floats(tree, dtype):
    """`tree` with its floating-point leaves cast to `dtype` (integer leaves kept)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def micro_batches(batch, k: int):
    """`batch` (leaves `[B, ...]`) as `k` micro-batches, leaves `[k, B / k, ...]`.

    Micro-batch `i` holds rows `i, i + k, i + 2k, ...`: when the batch is split over devices in
    contiguous blocks of a multiple of `k` rows, every micro-batch keeps the same split (each
    device computes its own rows of every micro-batch; nothing moves between devices).
    """
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"a batch of {x.shape[0]} rows does not split into "
                             f"train.grad_accum_steps = {k} micro-batches")
        return jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


# Task metrics that are means over the supervised positions of the batch: with micro-batches
# they are combined weighted by each micro-batch's share of those positions (exact).
POSITION_MEANS = ("loss", "accuracy", "mse")


def make_train_step(model, optimizer, loss: str = "cross_entropy", aux_weights=None,
                    grad_accum_steps: int = 1, compute_dtype: str = "float32"):
    """`(state, batch) -> (state, metrics)`: one AdamW/Muon update on the mean loss.

    `loss="cross_entropy"` (metrics `loss`, `accuracy`) or `"mse"` (metrics `loss`, `mse`);
    `loss` is the task loss alone; sown auxiliary losses, weighted by `aux_weights`, are added to
    the objective and reported as `aux/...` (module doc). Plus `grad_norm`.

    `grad_accum_steps = k > 1`: the batch is split into k micro-batches (`micro_batches`) whose
    gradients are summed by `lax.scan`, then one optimizer update. The objective is the k = 1 one:
    each micro-batch's task loss weighs by its share of the batch's supervised positions (so the
    sum is the mean over the whole batch, whatever the masks), its sown losses by 1/k (a sown
    mean over the micro-batch's elements then averages to the batch's mean). Metrics likewise:
    `loss`, `accuracy`, `mse` exactly; `aux/...` the mean over micro-batches, which equals the
    k = 1 value for means over elements but not for other statistics (a max, a root-mean-square).

    `compute_dtype="bfloat16"`: the forward and backward passes run on a bfloat16 copy of the
    parameters (and float inputs); the parameters, their gradients and the optimizer state stay
    float32, and logits are cast to float32 for the loss (`cross_entropy`, `squared_errors`).
    """
    dtype = parse_compute_dtype(compute_dtype)
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps = {grad_accum_steps!r}: an int >= 1")

    def objective(params, batch):
        if dtype != jnp.float32:
            params, batch = cast_floats(params, dtype), _cast_inputs(batch, dtype)
        return loss_fn(params, model, batch, loss, aux_weights)

    def accumulated(params, batch):
        k = grad_accum_steps
        total_count = jnp.maximum(batch["mask"].sum(), 1.0)

        def micro_objective(p, micro):
            total, metrics = objective(p, micro)
            share = micro["mask"].sum() / total_count
            aux = total - metrics["loss"]  # the weighted sown losses
            return share * metrics["loss"] + aux / k, (share, metrics)

        def body(grads, micro):
            g, (share, metrics) = jax.grad(micro_objective, has_aux=True)(params, micro)
            metrics = {name: value * share if name in POSITION_MEANS else value / k
                       for name, value in metrics.items()}
            return jax.tree.map(jnp.add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(body, zeros, micro_batches(batch, k))
        return grads, jax.tree.map(lambda m: m.sum(axis=0), metrics)

    def train_step(state: TrainState, batch):
        rng, _ = jax.random.split(state.rng)
        if grad_accum_steps == 1:
            grads, metrics = jax.grad(objective, has_aux=True)(state.params, batch)
        else:
            grads, metrics = accumulated(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return train_step


def _cast_inputs(batch, dtype):
    """Float model inputs (regression) in the compute dtype; targets and masks stay float32."""
    inputs = batch["inputs"]
    if jnp.issubdtype(inputs.dtype, jnp.floating):
        return {**batch, "inputs": inputs.astype(dtype)}
    return batch


def make_eval_step(model, loss: str = "cross_entropy"):
    """`(params, batch) -> (sum of per-example accuracy, number of examples)`.

    Per-example accuracy is the fraction of its supervised positions predicted exactly; rows
    without supervision (padding) count for nothing. This is Zoology's `valid/accuracy`.

    With `loss="mse"`: `(params, batch) -> (squared-error sums [T], supervised counts [T])`,
    summed over rows per position (padding rows have mask 0 and add nothing).
    """
    if loss == "mse":
        def mse_eval_step(params, batch):
            errors = squared_errors(_apply(model, params, batch, aux=False), batch)
            return errors.sum(axis=0), batch["mask"].sum(axis=0)

        return mse_eval_step

    def eval_step(params, batch):
        hits = _hits(_apply(model, params, batch, batch["positions"], aux=False), batch)
        per_row = batch["mask"].sum(axis=1)
        has_targets = per_row > 0
        accuracy = jnp.where(has_targets, hits.sum(axis=1) / jnp.maximum(per_row, 1.0), 0.0)
        return accuracy.sum(), has_targets.sum()

    return eval_step
