"""The trainer: build from config, resume if a checkpoint exists, train, evaluate, checkpoint.

    result = train(config, workdir)

Outputs under `workdir`: `config.json`, `metrics.jsonl`, `tensorboard/`, `checkpoints/<step>/`
and, once training ends, `result.json` (final per-segment test accuracy). Starting again with the
same workdir resumes from the latest checkpoint (parameters, optimizer, RNG, data-iterator state
and partial metric sums), so an interrupted run ends exactly as an uninterrupted one would.
SIGTERM/SIGINT save a checkpoint at the current step and stop (`Preempted`).

The task chooses the loss (`TaskData.loss`). Classification (`"cross_entropy"`, the default):
train metrics `loss`, `accuracy`; test metrics `test/<slice>/accuracy` and the pooled
`test/accuracy`; `train.target_accuracy` stops training early once `test/accuracy` reaches it.
Regression (`"mse"`): train metrics `loss`, `mse`; test metrics `test/<slice>/mse` (mean over the
slice's supervised positions and examples), the pooled `test/mse`, and the curve
`test/<slice>/mse_by_position` (a list of T floats, NaN where nothing is supervised). The curves
are in `result.json` only; `metrics.jsonl` and TensorBoard get the scalars. `target_accuracy` is
ignored for regression (there is no accuracy; training runs `train.steps` steps).
"""

import contextlib
import functools
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from memjax.config import to_dict
from memjax.models import build_model
from memjax.tasks.registry import TASKS
from memjax.train import mesh as mesh_lib
from memjax.train.checkpoint import Checkpointer, abstract_like
from memjax.train.metrics import MetricWriter
from memjax.train.optim import build_optimizer
from memjax.train.step import TrainState, make_eval_step, make_train_step, pad_rows, prepare_batch


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing from that step on was saved."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved first."""


@contextlib.contextmanager
def _stop_signals():
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (main thread only)."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, lambda signum, _: flag.update(signal=signal.Signals(signum).name))
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _check_batch_divisible(config, mesh):
    devices = mesh.devices.size
    for key in ("batch_size", "eval_batch_size"):
        if config.task[key] % devices:
            raise ValueError(f"task.{key} = {config.task[key]} is not divisible by the {devices} "
                             "devices of the data axis (mesh.data)")


def _is_complete(result: dict, config) -> bool:
    return result["stopped"] == "target_accuracy" or result["step"] >= config.train.steps


class _RunningMeans:
    """Sums of per-step train metrics since the last log; saved with checkpoints for exact resume."""

    def __init__(self, sums=None):
        self.sums = dict(sums or {})

    def add(self, metrics: dict[str, float]):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["_steps"] = self.sums.get("_steps", 0.0) + 1

    def pop_means(self) -> dict[str, float]:
        steps = self.sums.pop("_steps", 1.0)
        means = {f"train/{k}": v / steps for k, v in self.sums.items()}
        self.sums = {}
        return means


def _check_task_and_model(task, model):
    """The model's input and output widths must be the ones the task's batches have."""
    input_dim, output_dim = getattr(model, "input_dim", 0), getattr(model, "output_dim", 0)
    if input_dim != task.input_dim:
        raise ValueError(f"model.input_dim = {input_dim} but the task's inputs are "
                         + (f"floats of width {task.input_dim}" if task.input_dim else "token ids")
                         + f": set model.input_dim = {task.input_dim}")
    if output_dim != task.output_dim:
        raise ValueError(f"model.output_dim = {output_dim} but the task's loss is "
                         f"{task.loss} with targets of width {task.output_dim}: set "
                         f"model.output_dim = {task.output_dim}")


def evaluate(eval_step, params, test_sets, eval_batch_size, sharding, loss="cross_entropy",
             probe_sets=None) -> dict:
    """Per-segment accuracy `test/<segment>/accuracy` and pooled `test/accuracy` (over examples).

    With `probe_sets` (`TaskData.probe`, MQAR's key-swap recall probe): also, per probed segment,
    `probe/<segment>/swapped_accuracy` (predictions scored against the swapped-in key's value) and
    `probe/<segment>/original_accuracy` (against the value before the swap), and both pooled over
    the probed examples as `probe/swapped_accuracy` and `probe/original_accuracy`. Recall shows as
    swapped ~ test accuracy and original near chance; a model that ignores the key keeps original
    ~ test accuracy. The probe calls the same `eval_step` on batches of the same shapes as the test
    batches (no new compilation), once per label array: MQAR probes the first 250 of each
    segment's 1000 test examples (`mqar.PROBE_EXAMPLES`), so evaluation costs about 1.5x.

    For `loss="mse"`, `evaluate_mse` instead.
    """
    if loss == "mse":
        return evaluate_mse(eval_step, params, test_sets, eval_batch_size, sharding)
    score = functools.partial(_accuracies, eval_step, params, eval_batch_size=eval_batch_size,
                              sharding=sharding)
    results = score(test_sets, "test", {"labels": "accuracy"})
    if probe_sets:
        results |= score(probe_sets, "probe", {"swapped_labels": "swapped_accuracy",
                                               "original_labels": "original_accuracy"})
    return results


def _accuracies(eval_step, params, datasets, prefix, metrics, *, eval_batch_size, sharding) -> dict:
    """Zoology accuracy of `datasets` (slice name -> batches) against each label array of `metrics`.

    `metrics` maps a label key of the batches (`int[B, T]`, beside `"inputs"`) to a metric name;
    returns `<prefix>/<slice>/<name>` per slice, then `<prefix>/<name>` pooled over all examples.
    Each batch is read once and scored against every label array.
    """
    results, pooled = {}, {key: [0.0, 0] for key in metrics}
    for slice_name, batches in datasets.items():
        sums = {key: [0.0, 0] for key in metrics}
        for i in range(len(batches)):
            raw = batches[i]
            for key in metrics:
                batch = {"inputs": raw["inputs"], "labels": raw[key]}
                batch = pad_rows(prepare_batch(batch, "cross_entropy"), eval_batch_size)
                acc_sum, n = eval_step(params, jax.device_put(batch, sharding))
                sums[key][0] += float(acc_sum)
                sums[key][1] += int(n)
        for key, name in metrics.items():
            results[f"{prefix}/{slice_name}/{name}"] = sums[key][0] / max(sums[key][1], 1)
            pooled[key] = [pooled[key][0] + sums[key][0], pooled[key][1] + sums[key][1]]
    for key, name in metrics.items():
        results[f"{prefix}/{name}"] = pooled[key][0] / max(pooled[key][1], 1)
    return results


def evaluate_mse(eval_step, params, test_sets, eval_batch_size, sharding) -> dict:
    """Per slice `test/<slice>/mse` and `test/<slice>/mse_by_position`; pooled `test/mse`.

    A slice's `mse` is the mean squared error over all its supervised (example, position) pairs;
    `mse_by_position[t]` the mean over its examples at position t (NaN if none is supervised
    there). `test/mse` pools every supervised pair of every slice.
    """
    results, total, count = {}, 0.0, 0.0
    for name, batches in test_sets.items():
        sums, counts = 0.0, 0.0
        for i in range(len(batches)):
            batch = pad_rows(prepare_batch(batches[i], "mse"), eval_batch_size)
            batch_sums, batch_counts = jax.device_get(eval_step(params, jax.device_put(batch, sharding)))
            sums, counts = sums + np.asarray(batch_sums, np.float64), counts + np.asarray(batch_counts, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            curve = np.where(counts > 0, sums / counts, np.nan)
        results[f"test/{name}/mse"] = float(np.sum(sums) / max(np.sum(counts), 1.0))
        results[f"test/{name}/mse_by_position"] = [float(v) for v in curve]
        total, count = total + float(np.sum(sums)), count + float(np.sum(counts))
    results["test/mse"] = total / max(count, 1.0)
    return results


def _scalars(metrics: dict) -> dict:
    """The scalar entries (what `metrics.jsonl` and TensorBoard get; curves stay in result.json)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, tuple))}


def train(config, workdir, hooks=()) -> dict:
    """Trains `config` in `workdir` (resuming if possible); returns the final result dict.

    `hooks` are called as `hook(step, state)` after every step (for custom logging, or for tests
    that simulate a crash). The result holds the final step, why training stopped, and the test
    metrics; it is also written to `workdir/result.json`.
    """
    workdir = Path(workdir).absolute()
    cfg = config.train
    # Everything that can reject the config happens before anything is written.
    task = TASKS.get(config.task.name)(config.task, config.seed)
    model = build_model(to_dict(config.model))
    optimizer = build_optimizer(cfg)
    mesh = mesh_lib.build_mesh(config.mesh.data)
    _check_batch_divisible(config, mesh)
    _check_task_and_model(task, model)
    replicated, batch_sharding = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)

    result_path = workdir / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if _is_complete(result, config):
            print(f"run in {workdir} is already complete (step {result['step']}, "
                  f"stopped by {result['stopped']}); delete it or use another --workdir to retrain.")
            return result

    def init_state(rng):
        init_rng, state_rng = jax.random.split(rng)
        if task.input_dim:
            sample = jnp.zeros((1, task.sample_length, task.input_dim), jnp.float32)
        else:
            sample = jnp.zeros((1, task.sample_length), jnp.int32)
        params = model.init(init_rng, sample)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=state_rng)

    state = jax.jit(init_state, out_shardings=replicated)(jax.random.key(config.seed))
    checkpoints = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    model_config = to_dict(config.model)
    train_iter = iter(task.train)
    running = _RunningMeans()
    latest = checkpoints.latest_step()
    if latest is not None:
        state, extras = checkpoints.restore(latest, abstract_like(state, replicated), model_config)
        train_iter.set_state(extras["data_iterator"])
        running = _RunningMeans(extras["running_sums"])
        print(f"resumed from {checkpoints.directory}/{latest}")
    start = int(state.step)
    (workdir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    num_params = sum(x.size for x in jax.tree.leaves(state.params))

    def save(step):
        checkpoints.save(step, state, {"data_iterator": train_iter.get_state(),
                                       "running_sums": running.sums, "model": model_config})

    train_step = jax.jit(make_train_step(model, optimizer, task.loss), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model, task.loss))
    score = "mse" if task.loss == "mse" else "accuracy"  # the train metric shown beside the loss
    writer = MetricWriter(workdir, resume_step=start)
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress_bar, dynamic_ncols=True,
               file=sys.stdout)
    stopped, test_metrics, step = "steps", {}, start
    window_seconds, window_tokens = 0.0, 0  # train-step time only (not eval or checkpoints)
    try:
        with _stop_signals() as stop:
            while step < cfg.steps:
                step_start = time.perf_counter()
                batch = prepare_batch(next(train_iter), task.loss)
                state, metrics = train_step(state, jax.device_put(batch, batch_sharding))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                window_seconds += time.perf_counter() - step_start
                step += 1
                if not math.isfinite(metrics["loss"]):
                    raise TrainingDiverged(
                        f"non-finite loss ({metrics['loss']}) at step {step}; stopping without "
                        f"saving (latest checkpoint: {checkpoints.latest_step()}). Lower train.lr "
                        "or raise train.warmup_steps.")
                running.add(metrics)
                window_tokens += batch["inputs"].shape[0] * batch["inputs"].shape[1]
                for hook in hooks:
                    hook(step, state)
                if step % cfg.log_every == 0:
                    logged = running.pop_means() | {"perf/tokens_per_s": window_tokens / window_seconds}
                    writer.write(step, logged)
                    bar.set_postfix(loss=f"{logged['train/loss']:.3f}",
                                    **{score[:3]: f"{logged[f'train/{score}']:.3f}"},
                                    tok_s=f"{logged['perf/tokens_per_s']:.0f}")
                    window_seconds, window_tokens = 0.0, 0  # train-step time only (not eval or checkpoints)
                bar.update(1)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    test_metrics = evaluate(eval_step, state.params, task.test, config.task.eval_batch_size,
                                            batch_sharding, task.loss, task.probe)
                    writer.write(step, _scalars(test_metrics))
                    # Early stopping is for classification only (regression has no accuracy).
                    if (cfg.target_accuracy and task.loss == "cross_entropy"
                            and test_metrics["test/accuracy"] >= cfg.target_accuracy):
                        stopped = "target_accuracy"
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopped != "steps":
                    save(step)
                if stopped != "steps":
                    break
                if stop["signal"]:
                    save(step)
                    raise Preempted(f"{stop['signal']} at step {step}: saved checkpoint "
                                    f"{checkpoints.directory}/{step}; run again to resume")
    finally:
        bar.close()
        writer.close()
        checkpoints.close()
    if not test_metrics:  # resumed at the final step, which was saved but not evaluated yet
        test_metrics = evaluate(eval_step, state.params, task.test, config.task.eval_batch_size,
                                batch_sharding, task.loss, task.probe)
    result = {"step": step, "stopped": stopped, "num_params": int(num_params),
              "state_size_bytes": int(model.state_size(task.sample_length)),
              "workdir": str(workdir), "checkpoints": str(checkpoints.directory), **test_metrics}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
