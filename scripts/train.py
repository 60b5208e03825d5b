"""Trains a model from a config file; re-running with the same --workdir resumes.

    python scripts/train.py --config configs/mqar.py:model=attention --workdir runs/x \
        --config.train.steps=500

Several processes (`memjax.train.distributed`): start one per host with MEMJAX_DISTRIBUTED=1
(TPU pods), or with MEMJAX_COORDINATOR_ADDRESS, MEMJAX_NUM_PROCESSES and MEMJAX_PROCESS_ID, the
same arguments and a --workdir they share; usually with --config.mesh.data=-1. Process 0 prints
the result and writes the files; a preempted run exits with 143 on every process.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from memjax.train import distributed
from memjax.train.trainer import Preempted, TrainingDiverged, train
from memjax.train.checkpoint import CheckpointError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, `path.py:arg`.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def print_result(result: dict):
    print(f"\nstep {result['step']} (stopped by {result['stopped']}), "
          f"{result['num_params']:,} parameters, state {result['state_size_bytes']:,} bytes")
    metric = "mse" if "test/mse" in result else "accuracy"  # regression tasks report MSE
    print(f"{'test segment':<24}{metric}")
    for key, value in result.items():
        if key.startswith("test/") and key.endswith(f"/{metric}") and key != f"test/{metric}":
            print(f"{key.split('/')[1]:<24}{value:.4f}")
    print(f"{'all (pooled)':<24}{result[f'test/{metric}']:.4f}")
    if "probe/swapped_accuracy" in result:  # MQAR's key-swap recall probe (recall vs a prior)
        print(f"{'key-swap probe':<24}swapped {result['probe/swapped_accuracy']:.4f} (recall: ~ "
              f"accuracy), original {result['probe/original_accuracy']:.4f} (prior: ~ accuracy)")
    print(f"run: {result['workdir']}\ncheckpoints: {result['checkpoints']}")


def parse_flags(argv):
    """absl flag parsing, with a one-line error for config keys that do not exist."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:  # ml_collections' unknown-key override errors
        message = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")
        sys.exit(f"error: bad --config override: {unknown_field(argv) or message}")


def unknown_field(argv) -> str | None:
    """`config.a has no field 'b' (its fields: ...)` for the first override naming a missing
    field, found by loading the config without overrides; None if none is found."""
    from memjax.config import load_config

    args = list(argv)
    spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if spec is None and "--config" in args[:-1]:
        spec = args[args.index("--config") + 1]
    try:
        config = load_config(spec) if spec else None
    except Exception:  # the config file itself is broken: absl's message says why
        return None
    for arg in args:
        if config is None or not arg.startswith("--config.") or "=" not in arg:
            continue
        node, where = config, "config"
        for key in arg[len("--config."):].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or key not in node:
                fields = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                return f"{where} has no field {key!r} (its fields: {fields}), in {arg}"
            node, where = node[key], f"{where}.{key}"
    return None


def ignore_closed_event_loop(unraisable, default_hook=sys.unraisablehook):
    """After a failed Orbax restore, tensorstore callbacks still post to Orbax's asyncio loop,
    which is closed by then; Python reports each as an unraisable "Event loop is closed" error
    that would bury the real message. Those are dropped; anything else is reported as usual."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    default_hook(unraisable)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO.
    sys.unraisablehook = ignore_closed_event_loop
    try:
        # Before any other JAX use: several processes start JAX's distributed system here.
        distributed.initialize()
        result = train(_CONFIG.value, _WORKDIR.value)
    except (TrainingDiverged, Preempted, CheckpointError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if not isinstance(error, Preempted) else 143)
    if distributed.is_main_process():
        print_result(result)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
