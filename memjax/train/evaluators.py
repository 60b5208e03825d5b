"""Evaluators chosen by config: `config.evals` maps an evaluation's name to its settings.

    config.evals = ml_collections.ConfigDict({
        "test": {"type": "accuracy"},        # test/<slice>/accuracy, test/accuracy
        "probe": {"type": "recall_probe"},   # probe/<slice>/{swapped,original}_accuracy, pooled
    })

The name is the prefix of the metrics an evaluation writes; `type` picks a registered evaluator
(`EVALUATORS`); other keys are that evaluator's options. Without `config.evals` (or with an
empty one) the evaluations follow from the task (`default_evals`): `accuracy` on the test slices
for classification, plus `recall_probe` when the task has a probe (MQAR), or `mse` for
regression, which gives every config written before this registry its metric names and values.

An evaluator is registered as `factory(name, options, context) -> evaluate(params) -> metrics`,
with `options` a dict and `context` an `EvalContext`; factories run once, evaluations at every
`train.eval_every` steps. Evaluators of one loss share one compiled eval step.

Several processes: every process runs the same full evaluation, over the same batches. Each
generates only its own rows of every test batch (`memjax.tasks.data.with_rows`; padding rows
past a short last batch), prepares them with the width all processes agree on
(`memjax.train.step.prepare_rows`), hands them to JAX as its part of the global batch
(`memjax.train.mesh.global_batch`), and gets the eval step's sums replicated, so every process
computes the metrics of a one-process run.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from memjax.registry import Registry
from memjax.tasks import data
from memjax.train import mesh as mesh_lib
from memjax.train.step import make_eval_step, pad_rows, prepare_batch, prepare_rows

EVALUATORS = Registry("evaluator")


@dataclasses.dataclass
class EvalContext:
    """What evaluators read: the task's data, the model, and how batches are placed."""

    task: Any  # memjax.tasks.registry.TaskData
    model: Any
    batch_size: int  # test batches are padded to this many rows (even sharding)
    sharding: Any  # batch sharding, or None for the default device
    _steps: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def rows(self) -> slice | None:
        """This process's rows of every (padded) test batch; None without a sharding (all)."""
        if self.sharding is None:
            return None
        return mesh_lib.process_rows(self.sharding, self.batch_size)

    def batches(self, datasets):
        """Yields `(slice name, raw batch)` over every batch of every slice of `datasets`, each
        read once: this process's rows of it (`data.with_rows`), or all without a sharding."""
        rows = self.rows
        for slice_name, batches in datasets.items():
            if rows is not None:
                batches = data.with_rows(batches, rows)
            for i in range(len(batches)):
                yield slice_name, batches[i]

    def eval_step(self, loss: str):
        """The jitted `make_eval_step(model, loss)`, made once per loss (one compilation)."""
        if loss not in self._steps:
            # Sums replicated: every process can read them (several processes, module doc).
            out = None if self.sharding is None else mesh_lib.replicated(self.sharding.mesh)
            self._steps[loss] = jax.jit(make_eval_step(self.model, loss), out_shardings=out)
        return self._steps[loss]

    def place(self, batch: dict, loss: str):
        """A raw batch from `batches` prepared for `loss` and padded to `batch_size` rows, on the
        devices: without a sharding the whole batch on the default device; with one, this
        process's rows (padded to its share) as its part of the global batch."""
        if self.sharding is None:
            return jax.device_put(pad_rows(prepare_batch(batch, loss), self.batch_size))
        rows = self.rows
        several = jax.process_count() > 1
        batch = pad_rows(prepare_rows(batch, loss, several), rows.stop - rows.start)
        return mesh_lib.global_batch(batch, self.sharding, rows=self.batch_size)


def default_evals(task) -> dict[str, dict]:
    """The evaluations a task gets when the config names none (see the module doc)."""
    if task.loss == "mse":
        return {"test": {"type": "mse"}}
    evals = {"test": {"type": "accuracy"}}
    if task.probe:
        evals["probe"] = {"type": "recall_probe"}
    return evals


def build_evaluators(evals, task, model, batch_size: int, sharding) -> Callable[[Any], dict]:
    """`params -> metrics` running every evaluation of `evals` (None/empty: `default_evals`).

    Metrics are merged in the order of `evals`; two evaluations writing one name is an error.
    """
    evals = {name: dict(options) for name, options in (evals or default_evals(task)).items()}
    context = EvalContext(task, model, batch_size, sharding)
    runs = []
    for name, options in evals.items():
        if "type" not in options:
            raise ValueError(f"evals.{name} needs a type; known: {', '.join(EVALUATORS.names())}")
        kind = options.pop("type")
        try:
            runs.append(EVALUATORS.get(kind)(name, options, context))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"evals.{name} (type {kind!r}): {error}") from None

    def evaluate(params) -> dict:
        metrics = {}
        for run in runs:
            new = run(params)
            clash = sorted(set(new) & set(metrics))
            if clash:
                raise ValueError(f"two evaluations write {clash}: give them distinct names")
            metrics |= new
        return metrics

    return evaluate


def accuracies(context: EvalContext, params, datasets, prefix: str, metrics: dict) -> dict:
    """Zoology accuracy of `datasets` (slice name -> batches) against each label array of `metrics`.

    `metrics` maps a label key of the batches (`int[B, T]`, beside `"inputs"`) to a metric name;
    returns `<prefix>/<slice>/<name>` per slice (mean over its examples of the fraction of each
    example's supervised positions predicted exactly), then `<prefix>/<name>` pooled over all
    examples of all slices.
    """
    step = context.eval_step("cross_entropy")
    sums = {}  # (slice, label key) -> [sum of per-example accuracies, examples]
    for slice_name, raw in context.batches(datasets):
        extra = {k: raw[k] for k in (data.MAX_SUPERVISED,) if k in raw}
        for key in metrics:
            batch = context.place({"inputs": raw["inputs"], "labels": raw[key], **extra},
                                  "cross_entropy")
            acc_sum, n = step(params, batch)
            total = sums.setdefault((slice_name, key), [0.0, 0])
            total[0] += float(acc_sum)
            total[1] += int(n)
    results, pooled = {}, {key: [0.0, 0] for key in metrics}
    for slice_name in datasets:
        for key, name in metrics.items():
            acc, n = sums.get((slice_name, key), [0.0, 0])
            results[f"{prefix}/{slice_name}/{name}"] = acc / max(n, 1)
            pooled[key] = [pooled[key][0] + acc, pooled[key][1] + n]
    for key, name in metrics.items():
        results[f"{prefix}/{name}"] = pooled[key][0] / max(pooled[key][1], 1)
    return results


@EVALUATORS.register("accuracy")
def accuracy(name, options, context):
    """`<name>/<slice>/accuracy` and pooled `<name>/accuracy` on the task's test slices."""
    _no_options(options)
    _needs_loss(context, "cross_entropy")
    return lambda params: accuracies(context, params, context.task.test, name,
                                     {"labels": "accuracy"})


@EVALUATORS.register("recall_probe")
def recall_probe(name, options, context):
    """MQAR's key-swap recall probe (`memjax.tasks.recall_probe`) on `TaskData.probe`.

    Per probed slice `<name>/<slice>/swapped_accuracy` (predictions scored against the swapped-in
    key's value) and `<name>/<slice>/original_accuracy` (against the value before the swap), both
    pooled over the probed examples as `<name>/swapped_accuracy` and `<name>/original_accuracy`.
    Recall shows as swapped ~ test accuracy and original near chance; a model that ignores the
    key keeps original ~ test accuracy. Probe batches have the test batches' shapes (no new
    compilation); MQAR probes 250 of each slice's 1000 test examples, so it costs about 0.5x of
    the test evaluation.
    """
    _no_options(options)
    if not context.task.probe:
        raise ValueError("this task has no recall probe (TaskData.probe)")
    labels = {"swapped_labels": "swapped_accuracy", "original_labels": "original_accuracy"}
    return lambda params: accuracies(context, params, context.task.probe, name, labels)


@EVALUATORS.register("mse")
def mse(name, options, context):
    """Regression: per slice `<name>/<slice>/mse` and the curve `<name>/<slice>/mse_by_position`,
    pooled `<name>/mse`.

    A slice's `mse` is the mean squared error over all its supervised (example, position) pairs;
    `mse_by_position[t]` the mean over its examples at position t (NaN if none is supervised
    there). The pooled value pools every supervised pair of every slice. Curves are lists (they
    go to result.json only; metrics.jsonl and TensorBoard get the scalars).
    """
    _no_options(options)
    _needs_loss(context, "mse")
    step = context.eval_step("mse")

    def evaluate(params):
        sums, counts = {}, {}
        for slice_name, raw in context.batches(context.task.test):
            batch_sums, batch_counts = jax.device_get(step(params, context.place(raw, "mse")))
            sums[slice_name] = sums.get(slice_name, 0.0) + np.asarray(batch_sums, np.float64)
            counts[slice_name] = counts.get(slice_name, 0.0) + np.asarray(batch_counts, np.float64)
        results, total, count = {}, 0.0, 0.0
        for slice_name in context.task.test:
            s, c = sums.get(slice_name, 0.0), counts.get(slice_name, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                curve = np.where(c > 0, s / c, np.nan)
            results[f"{name}/{slice_name}/mse"] = float(np.sum(s) / max(np.sum(c), 1.0))
            results[f"{name}/{slice_name}/mse_by_position"] = [float(v) for v in np.atleast_1d(curve)]
            total, count = total + float(np.sum(s)), count + float(np.sum(c))
        results[f"{name}/mse"] = total / max(count, 1.0)
        return results

    return evaluate


def _needs_loss(context: EvalContext, loss: str):
    if context.task.loss != loss:
        raise ValueError(f"needs a task with loss {loss}; this task's loss is {context.task.loss}")


def _no_options(options: dict):
    if options:
        raise TypeError(f"unknown options {sorted(options)}")
