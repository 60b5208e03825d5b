"""The trainer: build from config, resume if a checkpoint exists, train, evaluate, checkpoint.

    result = train(config, workdir)

Outputs under `workdir` (a local path or a URI such as `gs://bucket/run`, `memjax.paths`):
`config.json`, `metrics.jsonl`, `tensorboard/`, `checkpoints/<step>/` and, once training ends,
`result.json` (final per-segment test metrics). Starting again with the
same workdir resumes from the latest checkpoint (parameters, optimizer, RNG, data-iterator state
and partial metric sums), so an interrupted run ends exactly as an uninterrupted one would.
SIGTERM/SIGINT save a checkpoint at the current step (once) and stop (`Preempted`).

Several processes (multi-host; `memjax.train.distributed.initialize()` first, as
`scripts/train.py` does): every process runs this same loop on the same global batches (the
batches of a one-process run, `task.batch_size` rows). Each generates only its own rows of every
batch (`memjax.tasks.data.with_rows`: the rows its devices hold, `memjax.train.mesh.process_rows`)
and hands them to JAX as its part of the global array (`memjax.train.mesh.global_batch`). The
supervised width M must be the same on every process without a per-step exchange, so with
several processes it covers the number of supervised positions the batch's slice declares
(`memjax.tasks.data.Slice.max_supervised`, a fixed count in every task of `memjax.tasks`, so M
is the one-process M), or is the full length T for a slice that declares none
(`memjax.train.step.prepare_rows`); one process keeps the width of its batch's most supervised
row. The data iterator has one state (the batches' order), the same on every process and for
any rows, and checkpoints resume under any process count. Evaluation runs the same full
evaluation on every process, each generating its rows of every test batch (global arrays,
replicated sums), so metrics equal a one-process run's. Checkpoints are saved and restored by
every process (Orbax writes each array's shards from the processes that hold them, and the JSON
extras from process 0). A signal reaching any one process stops them all at the same step: the processes agree on their
stop flags with a tiny all-gather at log, evaluation and checkpoint steps (where the host waits
for the device anyway), so a signal takes effect within `train.log_every` steps.

The task chooses the loss (`TaskData.loss`): train metrics `loss` and `accuracy`
(classification) or `loss` and `mse` (regression), plus `grad_norm` and the `aux/...` values
that layers sow (`memjax.train.step`; sown losses are weighted by `train.aux_loss_weights`).
Evaluations come from `config.evals` (`memjax.train.evaluators`; by default from the task:
`test/<slice>/accuracy`, pooled `test/accuracy` and MQAR's recall probe, or `test/.../mse`).
`train.target_accuracy` stops training early once `test/accuracy` reaches it (never for
evaluations without it, such as regression). Curves (lists) go to `result.json` only.

The host never waits for a step: steps are dispatched back to back, their metrics collected on
the device (`memjax.train.step_metrics`), and the host reads them only at log, evaluation,
checkpoint and stop steps. A non-finite loss is found then, named by the step where it began;
every checkpoint is written after such a read, so nothing from a diverged step on is saved.
Files other than checkpoints are written by process 0 only.

Parallelism (`config.mesh`, `memjax.train.mesh`): the train state is created in the shardings
that `memjax.train.sharding.SHARDING_RULES` give it (parameters and optimizer state split over
`fsdp` and `tensor`, step and RNG replicated; a parameter without a rule stops the launch),
batches are split over `data` x `fsdp`, and the jitted step keeps those shardings; checkpoints
restore into them. `train.grad_accum_steps` and `train.compute_dtype`: `memjax.train.step`.
"""

import contextlib
import json
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from memjax.config_validation import validate_config
from memjax.config import to_dict
from memjax.models import build_model
from memjax.paths import as_path
from memjax.tasks import data
from memjax.tasks.registry import TASKS
from memjax.train import mesh as mesh_lib
from memjax.train import sharding as sharding_lib
from memjax.train import step_metrics
from memjax.train.checkpoint import Checkpointer, UnreadableCheckpoint, abstract_like
from memjax.train.evaluators import build_evaluators
from memjax.train.metrics import MetricWriter, NullWriter
from memjax.train.optim import build_optimizer
from memjax.train.step import TrainState, make_train_step, prepare_rows


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing from that step on was saved."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved first."""


@contextlib.contextmanager
def _stop_signals():
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (main thread only).

    The previous handlers are restored on exit, whatever they were.
    """
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
    """Batches split evenly over the processes and the batch axes (`data` x `fsdp`), and into
    micro-batches that each split evenly too; every process holds devices of the mesh."""
    processes = jax.process_count()
    for key in ("batch_size", "eval_batch_size"):
        if config.task[key] % processes:
            raise ValueError(f"task.{key} = {config.task[key]} is not divisible by the "
                             f"{processes} processes (each takes an equal share of the batch)")
    mesh_lib.check_covers_processes(mesh)
    devices = mesh_lib.batch_devices(mesh)
    axes = f"mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}"
    for key in ("batch_size", "eval_batch_size"):
        if config.task[key] % devices:
            raise ValueError(f"task.{key} = {config.task[key]} is not divisible by the {devices} "
                             f"devices of the batch axes ({axes})")
    k = config.train.get("grad_accum_steps", 1)
    if config.task.batch_size % (k * devices):
        raise ValueError(f"task.batch_size = {config.task.batch_size} does not split into "
                         f"train.grad_accum_steps = {k} micro-batches of a multiple of the "
                         f"{devices} devices of the batch axes ({axes})")


def _agreed_signal(local: str | None) -> str | None:
    """The stop signal any process received, e.g. `"SIGTERM on process 1"`, or None.

    Every process must call this at the same steps: it all-gathers one int per process.
    """
    code = signal.Signals[local].value if local else 0
    codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
    first = int(np.flatnonzero(codes)[0]) if codes.any() else None
    return None if first is None else f"{signal.Signals(int(codes[first])).name} on process {first}"


def _is_complete(result: dict, config) -> bool:
    return result["stopped"] == "target_accuracy" or result["step"] >= config.train.steps


class _RunningMeans:
    """Sums of per-step train metrics since the last log; saved with checkpoints for exact resume.

    Sums are Python floats (float64) added one step at a time, in step order.
    """

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


def aux_loss_weights(cfg) -> dict[str, float]:
    """`train.aux_loss_weights`, `"name=weight,..."` (or a mapping), as a dict.

    Names are those layers pass to `self.sow("losses", name, ...)`; a sown loss not named here
    has weight 1.0.
    """
    spec = cfg.get("aux_loss_weights", "")
    if not isinstance(spec, str):
        return {str(k): float(v) for k, v in dict(spec).items()}
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"train.aux_loss_weights: {item!r} is not name=weight") from None
    return weights


def _scalars(metrics: dict) -> dict:
    """The scalar entries (what `metrics.jsonl` and TensorBoard get; curves stay in result.json)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, tuple))}


def _restore(checkpoints, abstract_state, model_config, fallback: bool, workdir):
    """`(step, state, extras)` of the newest checkpoint, or of the newest readable one.

    When the newest is unreadable, the error names the newest readable checkpoint and how to
    resume from it; with `fallback` (`train.restore_fallback`) the unreadable newer ones are
    moved to `workdir/unreadable_checkpoints/` with a warning and training resumes from it.
    """
    steps = checkpoints.all_steps()
    try:
        return (steps[0], *checkpoints.restore(steps[0], abstract_state, model_config))
    except UnreadableCheckpoint as error:
        newest_error = error
    for older in steps[1:]:
        try:
            state, extras = checkpoints.restore(older, abstract_state, model_config)
        except UnreadableCheckpoint:
            continue
        newer = [s for s in steps if s > older]
        if not fallback:
            moves = " ".join(str(checkpoints.directory / str(s)) for s in newer)
            raise UnreadableCheckpoint(
                f"{newest_error}\nThe newest readable checkpoint is {checkpoints.directory}/{older} "
                f"(step {older}). To resume from it, run again with "
                f"--config.train.restore_fallback=True (which moves {moves} to "
                f"{workdir}/unreadable_checkpoints/), or move those away yourself.") from None
        for s in newer:
            moved = checkpoints.set_aside(s, workdir / "unreadable_checkpoints")
            print(f"warning: checkpoint step {s} is unreadable; moved to {moved}", file=sys.stderr)
        print(f"warning: train.restore_fallback: resuming from step {older}", file=sys.stderr)
        return older, state, extras
    raise UnreadableCheckpoint(f"{newest_error}\nNo older checkpoint is readable either; delete "
                               f"{checkpoints.directory} to start over.") from None


class _Progress:
    """A tqdm bar on a terminal; otherwise one line per log step (logs are not flooded)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.interactive = enabled and sys.stdout.isatty()
        self.enabled, self.total = enabled, total
        self.bar = tqdm(total=total, initial=initial, disable=not self.interactive,
                        dynamic_ncols=True, file=sys.stdout)

    def step(self):
        self.bar.update(1)

    def log(self, step: int, values: dict[str, float]):
        text = {k: (f"{v:.3f}" if abs(v) < 1e4 else f"{v:.0f}") for k, v in values.items()}
        if self.interactive:
            self.bar.set_postfix(**text)
        elif self.enabled:
            print(f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in text.items()),
                  flush=True)

    def close(self):
        self.bar.close()


def train(config, workdir, hooks=()) -> dict:
    """Trains `config` in `workdir` (resuming if possible); returns the final result dict.

    `hooks` are called as `hook(step, state)` after every step is dispatched (for custom
    logging, or for tests that simulate a crash); they run on the host while the device may
    still be computing, so one that reads `state` waits for it. The result holds the final step,
    why training stopped, and the evaluation metrics; process 0 also writes it to
    `workdir/result.json`.
    """
    workdir = as_path(workdir)  # local (made absolute) or gs://... (memjax.paths)
    cfg = config.train
    # Everything that can reject the config happens before anything is written.
    validate_config(config)
    task = TASKS.get(config.task.name)(config.task, config.seed)
    model = build_model(to_dict(config.model))
    optimizer = build_optimizer(cfg)
    weights = aux_loss_weights(cfg)
    mesh = mesh_lib.build_mesh(config.mesh)
    _check_batch_divisible(config, mesh)
    _check_task_and_model(task, model)
    train_step = make_train_step(model, optimizer, task.loss, weights,
                                 grad_accum_steps=cfg.get("grad_accum_steps", 1),
                                 compute_dtype=cfg.get("compute_dtype", "float32"))
    batch_sharding = mesh_lib.batch_sharded(mesh)
    evaluate = build_evaluators(to_dict(config.get("evals")), task, model,
                                config.task.eval_batch_size, batch_sharding)
    is_writer = jax.process_index() == 0

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

    # Parameters and optimizer state are created in their shardings (memjax.train.sharding;
    # a parameter without a sharding rule stops the launch here, before anything is written).
    state, shardings = sharding_lib.init_sharded(init_state, jax.random.key(config.seed), mesh)
    checkpoints = Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    try:  # the checkpointer is closed however training ends (else Orbax's threads complain)
        return _train_loop(config, workdir, hooks, task, model, state, checkpoints, evaluate,
                           train_step, mesh, shardings, batch_sharding, is_writer)
    finally:
        checkpoints.close()


def _buffer_factory(train_step, state, batch, capacity: int, sharding):
    """`() -> StepMetrics`: an empty buffer of `capacity` rows for the metrics `train_step` returns.

    Every buffer comes from this one jitted function, so all have the same sharding and the
    step that takes them compiles once (a buffer cleared by another function may carry an
    equivalent but unequal sharding, and the step would compile again).
    """
    names = list(jax.eval_shape(train_step, state, batch)[1])
    return jax.jit(lambda: step_metrics.StepMetrics.empty(names, capacity), out_shardings=sharding)


def _train_loop(config, workdir, hooks, task, model, state, checkpoints, evaluate, train_step,
                mesh, shardings, batch_sharding, is_writer) -> dict:
    """Resumes from the latest checkpoint, trains to the end, evaluates; returns the result."""
    cfg = config.train
    model_config = to_dict(config.model)
    replicated = mesh_lib.replicated(mesh)
    # This process's rows of every batch (module doc); the iterator state is that of the whole
    # batches, the same on every process.
    batch_size = config.task.batch_size
    train_iter = iter(data.with_rows(task.train, mesh_lib.process_rows(batch_sharding, batch_size)))
    running = _RunningMeans()
    if checkpoints.latest_step() is not None:
        restored, state, extras = _restore(checkpoints, abstract_like(state, shardings),
                                           model_config, cfg.get("restore_fallback", False), workdir)
        train_iter.set_state(extras["data_iterator"])
        running = _RunningMeans(extras["running_sums"])
        print(f"resumed from {checkpoints.directory}/{restored}")
    start = int(state.step)
    if is_writer:
        (workdir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    num_params = sum(x.size for x in jax.tree.leaves(state.params))

    # State in its shardings, batch split over (data, fsdp), metric buffer replicated.
    step_fn = sharding_lib.jit_train_step(step_metrics.recording(train_step), shardings, mesh,
                                          num_extra=1)
    # Made at the first step, whose trace names the metrics (aux ones included).
    new_buffer = buffer = None
    score = "mse" if task.loss == "mse" else "accuracy"  # the train metric shown beside the loss
    writer = MetricWriter(workdir, resume_step=start) if is_writer else NullWriter()
    progress = _Progress(cfg.progress_bar and is_writer, cfg.steps, start)
    several = jax.process_count() > 1
    stopped, test_metrics, step, saved = "steps", {}, start, None
    # Throughput counts the train loop only (not evaluation or checkpoints): seconds are summed
    # over the stretches between host reads, tokens over the steps in them.
    window_seconds, window_tokens, window_start = 0.0, 0, time.perf_counter()

    def read_metrics():
        """Waits for the dispatched steps; adds their metrics to `running`; checks the loss."""
        nonlocal buffer, window_seconds
        rows, first_bad = step_metrics.read(buffer)
        window_seconds += time.perf_counter() - window_start
        if first_bad:
            loss = rows[first_bad - (step - len(rows)) - 1]["loss"]
            raise TrainingDiverged(
                f"non-finite loss ({loss}) at step {first_bad}; stopping without saving "
                f"(latest checkpoint: {checkpoints.latest_step()}). Lower train.lr or raise "
                "train.warmup_steps.")
        for row in rows:
            running.add(row)
        buffer = new_buffer()

    def save():
        nonlocal saved
        checkpoints.save(step, state, {"data_iterator": train_iter.get_state(),
                                       "running_sums": running.sums, "model": model_config})
        saved = step

    try:
        with _stop_signals() as stop:
            while step < cfg.steps:
                # This process's rows, prepared, as its part of the global batch (module doc).
                batch = mesh_lib.global_batch(prepare_rows(next(train_iter), task.loss, several),
                                              batch_sharding, rows=batch_size)
                if buffer is None:
                    new_buffer = _buffer_factory(train_step, state, batch, cfg.log_every, replicated)
                    buffer = new_buffer()
                state, buffer = step_fn(state, buffer, batch)
                step += 1
                window_tokens += batch["inputs"].shape[0] * batch["inputs"].shape[1]
                for hook in hooks:
                    hook(step, state)
                progress.step()
                log = step % cfg.log_every == 0
                evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
                save_now = step % cfg.checkpoint_every == 0 or step == cfg.steps
                # One process reads its stop flag after every step; several agree on theirs only
                # at these steps, which all of them reach together (_agreed_signal below).
                if not (log or evaluate_now or save_now or (stop["signal"] and not several)):
                    continue
                read_metrics()
                if log:
                    logged = running.pop_means() | {"perf/tokens_per_s": window_tokens / window_seconds}
                    writer.write(step, logged)
                    progress.log(step, {"loss": logged["train/loss"],
                                        score[:3]: logged[f"train/{score}"],
                                        "tok_s": logged["perf/tokens_per_s"]})
                    window_seconds, window_tokens = 0.0, 0
                if evaluate_now:
                    test_metrics = evaluate(state.params)
                    writer.write(step, _scalars(test_metrics))
                    if cfg.target_accuracy and test_metrics.get("test/accuracy", -1.0) >= cfg.target_accuracy:
                        stopped = "target_accuracy"
                if save_now or stopped != "steps":
                    save()
                if stopped != "steps":
                    break
                # A signal may have landed at any point of this step, its evaluation or its
                # save: stop here, saving this step unless it was just saved.
                if step < cfg.steps:
                    received = _agreed_signal(stop["signal"]) if several else stop["signal"]
                    if received:
                        if saved != step:
                            save()
                        raise Preempted(f"{received} at step {step}: saved checkpoint "
                                        f"{checkpoints.directory}/{step}; run again to resume")
                window_start = time.perf_counter()
    finally:
        progress.close()
        writer.close()
    if not test_metrics:  # resumed at the final step, which was saved but not evaluated yet
        test_metrics = evaluate(state.params)
    result = {"step": step, "stopped": stopped, "num_params": int(num_params),
              "state_size_bytes": int(model.state_size(task.sample_length)),
              "workdir": str(workdir), "checkpoints": str(checkpoints.directory), **test_metrics}
    if is_writer:
        (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
