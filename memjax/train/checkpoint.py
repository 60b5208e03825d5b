"""Orbax checkpoints of the train state plus JSON extras (data-iterator state, metric sums, config).

Each checkpoint step holds two items: `state` (the TrainState pytree) and `extras` (JSON). Saves
are synchronous, so a checkpoint that `save` returned from is complete on disk; Orbax writes to
a temporary directory and renames it, so an interrupted save never replaces a good checkpoint.

Several processes: every process calls `save` and `restore` (Orbax writes each array's shards
from the processes that hold them and the JSON extras from process 0, with barriers between;
the directory must be one shared by all processes, e.g. `gs://bucket/run/checkpoints`: paths go
through `memjax.paths`). The one change made here outside Orbax, `set_aside`, is done by process
0 while the others wait.
"""

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from memjax.paths import as_path


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: it belongs to another model, or it is unreadable."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint's files cannot be read (corrupt or incomplete), as opposed to another model's."""


# Model settings added after checkpoints were first written, with the value that reproduces the
# model the code built before the setting existed: a checkpoint that lacks one is read as having
# it. (Before model.stack_short_convs, every mixer got the block's short convolution, including
# those with their own. Before model.scan_layers, blocks were a loop: per-layer parameters.)
LEGACY_MODEL_SETTINGS = {"layers": "", "mixers": {}, "stack_short_convs": True,
                         "scan_layers": False}


# Settings that choose how a mixer computes, not what (the operator's form and its chunk, equal
# up to float rounding): a checkpoint resumes under other values (another platform's kernel) or
# without them (written before the mixer had the option).
# `remat` (model.remat) only chooses what the backward pass recomputes.
FORM_SETTINGS = frozenset({"impl", "chunk_size", "remat"})


def _with_legacy_settings(saved_model: dict) -> dict:
    return {**LEGACY_MODEL_SETTINGS, **saved_model} if isinstance(saved_model, dict) else saved_model


def _differences(saved, current, prefix="") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (missing counts as different)."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if _normalise(saved) == _normalise(current) else [
            f"{prefix or '<root>'}: checkpoint has {saved!r}, config has {current!r}"]
    out = []
    for key in sorted((set(saved) | set(current)) - FORM_SETTINGS):
        name = f"{prefix}.{key}" if prefix else key
        if key not in saved or key not in current:
            where = "config" if key not in saved else "checkpoint"
            out.append(f"{name}: only in the {where}")
        else:
            out += _differences(saved[key], current[key], name)
    return out


def _normalise(value):
    # JSON turns tuples into lists; compare the two as equal.
    return [_normalise(v) for v in value] if isinstance(value, (list, tuple)) else value


class Checkpointer:
    """Keeps the last `keep` checkpoints under `directory`; saving happens when the trainer asks."""

    def __init__(self, directory, keep: int):
        self.directory = as_path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=False, create=True),
            item_names=("state", "extras"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Saved steps, newest first."""
        return sorted(self._manager.all_steps(), reverse=True)

    def set_aside(self, step: int, destination):
        """Moves checkpoint `step` to `destination/<step>` (kept for inspection, no longer used)."""
        target = as_path(destination) / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:  # the others see the directory only once it has moved
            multihost_utils.sync_global_devices(f"memjax: checkpoint {step} set aside")
        self._manager.reload()
        return target

    def save(self, step: int, state, extras: dict):
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    extras=ocp.args.JsonSave(extras)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state, model_config: dict):
        """Returns `(state, extras)` of checkpoint `step`, checked against `model_config` first.

        Raises CheckpointError naming every mismatching model setting, or UnreadableCheckpoint
        naming the step and the cause when the files cannot be read into `abstract_state`.
        """
        try:
            extras = self._manager.restore(
                step, args=ocp.args.Composite(extras=ocp.args.JsonRestore())).extras
        except Exception as error:  # Orbax raises many types for unreadable files.
            raise UnreadableCheckpoint(
                f"checkpoint {self.directory}/{step} is unreadable ({type(error).__name__}: {error})"
            ) from error
        mismatches = _differences(_with_legacy_settings(extras.get("model")), model_config, "model")
        if mismatches:
            raise CheckpointError(
                f"{self.directory} holds a checkpoint (step {step}) of a different model; "
                "use another --workdir or the original config. Mismatches:\n  "
                + "\n  ".join(mismatches))
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
        except Exception as error:  # the model settings matched, so the files are at fault
            raise UnreadableCheckpoint(
                f"checkpoint {self.directory}/{step} does not match the model's parameters or is "
                f"corrupt ({type(error).__name__}: {error})") from error
        return state, extras

    def read_state(self, step: int):
        """The saved state at `step` as nested dicts of arrays, without a target (for analysis)."""
        return self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state

    def close(self):
        self._manager.close()


def abstract_like(tree, sharding=None):
    """Shape/dtype/sharding placeholders of `tree`, the target Orbax restores into.

    `sharding`: one Sharding for every leaf, a tree of them like `tree` (the trainer's state
    shardings, `memjax.train.sharding.state_shardings`), or None for each leaf's own `.sharding`.
    Orbax reads each array straight into its target sharding, whatever mesh wrote it (a
    checkpoint saved replicated or under another mesh restores split as the target asks).
    """
    if sharding is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            tree)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding)
