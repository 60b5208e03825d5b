"""Trains a model from a config file; re-running with the same --workdir resumes.

    python scripts/train.py --config configs/mqar.py:model=attention --workdir runs/x \
        --config.train.steps=500
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

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
        sys.exit(f"error: bad --config override: {message}")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO.
    try:
        result = train(_CONFIG.value, _WORKDIR.value)
    except (TrainingDiverged, Preempted, CheckpointError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if not isinstance(error, Preempted) else 143)
    print_result(result)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
