"""How far back can a trained MQAR model recall? Accuracy by the distance from key to query.

    python scripts/recall_by_distance.py runs/sweeps/memory_mixtures/mqar_hippocampus \
        [--step N] [--pairs 4,8,16] [--bins 16,32,48] [--examples 1000]

Loads the run's checkpoint (the latest, or --step), scores fresh MQAR examples (the run's vocab
and its first test segment's length, seed 12345: not the training stream) for each number of pairs, and prints
the accuracy of the queries whose pair's key sits 1..b1, b1+1..b2, ... tokens before them. For a
hybrid with a W-token window, ``--bins W`` splits the queries into those its window sees and
those only its memory can answer.
"""

import argparse
import json

import jax.numpy as jnp
import numpy as np

from memjax.models import build_model
from memjax.tasks import mqar
from memjax.train.checkpoint import Checkpointer

SEED = 12345


def load(run: str, step: int | None):
    """(model config, params) of `run` at `step` (None: its latest checkpoint)."""
    config = json.load(open(f"{run}/config.json"))
    checkpoints = Checkpointer(f"{run}/checkpoints", keep=1)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise SystemExit(f"{run} has no checkpoint")
        params = checkpoints.read_state(step)["params"]
    finally:
        checkpoints.close()
    return config, params, step


def query_distances(inputs: np.ndarray, labels: np.ndarray, num_pairs: int):
    """``(rows, positions, distances)`` of every query: its key is the same token, written at
    one of the positions 0, 2, ..., 2 num_pairs - 2."""
    rows, positions = np.nonzero(labels >= 0)
    keys = inputs[rows, : 2 * num_pairs : 2]
    pair = np.argmax(keys == inputs[rows, positions][:, None], axis=1)
    return rows, positions, positions - 2 * pair


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--pairs", default="4,8,16", help="comma-separated numbers of pairs")
    p.add_argument("--bins", default="16,32,48", help="upper edges of the distance bins")
    p.add_argument("--examples", type=int, default=1000)
    args = p.parse_args(argv)
    config, params, step = load(args.run, args.step)
    model = build_model(config["model"])
    vocab, seq_len = config["task"]["vocab_size"], config["task"]["test_segments"][0][0]
    edges = [0, *map(int, args.bins.split(",")), seq_len]
    print(f"{args.run} at step {step}: accuracy by key-to-query distance (queries in brackets)")
    print("| pairs | " + " | ".join(f"{lo + 1}-{hi}" for lo, hi in zip(edges, edges[1:])) + " | all |")
    print("|---" * (len(edges) + 1) + "|")
    for num_pairs in map(int, args.pairs.split(",")):
        batch = mqar.make_examples(vocab, seq_len, num_pairs, SEED, np.arange(args.examples))
        inputs, labels = batch["inputs"], batch["labels"]
        predictions = np.asarray(jnp.argmax(model.apply({"params": params}, jnp.asarray(inputs)), -1))
        rows, positions, distance = query_distances(inputs, labels, num_pairs)
        correct = predictions[rows, positions] == labels[rows, positions]
        cells = []
        for lo, hi in zip(edges, edges[1:]):
            chosen = (distance > lo) & (distance <= hi)
            cells.append(f"{correct[chosen].mean():.3f} ({chosen.sum()})" if chosen.any() else "-")
        print(f"| {num_pairs} | " + " | ".join(cells) + f" | {correct.mean():.3f} |")


if __name__ == "__main__":
    main()
