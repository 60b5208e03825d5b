"""Does a trained MoM route each MQAR query to the memories its pair was written to?

    python scripts/diagnose_mom_routing.py runs/diag/learn_mom 1500

Loads the run's checkpoint at the given step, scores 1000 fresh MQAR examples (T = 64, 4 pairs,
vocab 256), and for each MoM layer prints, by how many of its top-k memories a query shares
with its pair's value position (where the pair's key, mixed in by the short convolution, is
written), the share of queries and their accuracy. If routing limited recall, queries sharing
no memory would be far less accurate than the others.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from memjax.models import build_model
from memjax.tasks import mqar
from memjax.train.checkpoint import Checkpointer

VOCAB, T, PAIRS, EXAMPLES, SEED = 256, 64, 4, 1000, 12345


def main(run: str, step: int):
    config = json.load(open(f"{run}/config.json"))
    model = build_model(config["model"])
    checkpoints = Checkpointer(f"{run}/checkpoints", keep=1)
    try:
        params = checkpoints.read_state(step)["params"]
    finally:
        checkpoints.close()
    top_k = config["model"]["mixer"]["top_k"]
    batch = mqar.make_examples(VOCAB, T, PAIRS, SEED, np.arange(EXAMPLES))
    inputs, labels = batch["inputs"], batch["labels"]
    logits, captured = model.apply({"params": params}, jnp.asarray(inputs), mutable=["intermediates"],
                                   capture_intermediates=lambda module, _: module.name == "router")
    rows, positions = np.nonzero(labels >= 0)  # the queries
    correct = np.asarray(jnp.argmax(logits, -1))[rows, positions] == labels[rows, positions]
    # Keys sit at positions 0, 2, ..., 2 PAIRS - 2; a query's pair is written at its value, key + 1.
    pair = np.argmax(inputs[rows, : 2 * PAIRS : 2] == inputs[rows, positions][:, None], axis=1)
    value_positions = 2 * pair + 1
    print(f"accuracy {correct.mean():.3f} on {len(correct)} queries")
    for path, router_logits in jax.tree_util.tree_flatten_with_path(captured["intermediates"])[0]:
        top = np.argsort(-np.asarray(router_logits), axis=-1)[..., :top_k]  # [B, T, k]
        query_top, value_top = top[rows, positions], top[rows, value_positions]
        shared = (query_top[:, :, None] == value_top[:, None, :]).any(-1).sum(-1)
        layer = jax.tree_util.keystr(path[:1])
        for count in range(top_k + 1):
            chosen = shared == count
            if chosen.any():
                print(f"{layer} sharing {count} of top-{top_k}: {chosen.mean():.3f} of queries, "
                      f"accuracy {correct[chosen].mean():.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
