"""Training throughput of one config at two commits, measured side by side. JSON out.

    python scripts/bench_commits.py 4dceadd HEAD --config configs/mqar.py:model=deltanet,vocab=256 \
        --overrides-b '{"model.stack_short_convs": true}' --steps 90 --rounds 6 --out tp.json

Each commit's `memjax` and `configs` are exported (`git archive`) to a temporary folder; then
the two alternate, one whole training run each per round (`memjax.train.trainer.train`: data
pipeline, jitted step, metric reads, the final evaluation, exactly what `scripts/train.py` runs),
so both share the machine's load. A run's rate is steps per second between the end of step 10
(compilation done) and the end of the last step, both waited for on the device. Reports every
rate, the medians and median(B) / median(A) (above 1: B is faster). `--overrides-a/-b` (JSON
config overrides) express a setting that a commit renamed or whose default changed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs inside the exported tree (its memjax first on sys.path); prints one JSON line.
RUN_ONE = """
import json, sys, tempfile, time
import jax
from memjax.config import load_config
from memjax.train.trainer import train

spec, steps, extra = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
marks = {}

def hook(step, state):
    if step in (10, steps):
        jax.block_until_ready(state.params)
        marks[step] = time.perf_counter()

config = load_config(spec, {"train.steps": steps, "train.warmup_steps": 5,
                            "train.eval_every": 10**6, "train.checkpoint_every": 10**6,
                            "train.progress_bar": False, "train.target_accuracy": 0.0, **extra})
with tempfile.TemporaryDirectory() as workdir:
    train(config, workdir, hooks=[hook])
print(json.dumps({"steps_per_s": (steps - 10) / (marks[steps] - marks[10])}))
"""


def export(commit: str, destination: Path) -> str:
    """Writes `memjax` and `configs` at `commit` under `destination`; returns the full hash."""
    full = subprocess.run(["git", "rev-parse", commit], check=True, capture_output=True,
                          text=True).stdout.strip()
    destination.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", full, "memjax", "configs"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    return full


def run_once(tree: Path, config: str, steps: int, overrides: dict) -> float:
    run = subprocess.run([sys.executable, "-c", RUN_ONE, config, str(steps), json.dumps(overrides)],
                         cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"training at {tree.name} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])["steps_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit_a")
    parser.add_argument("commit_b")
    parser.add_argument("--config", required=True, help="config spec, as scripts/train.py takes")
    parser.add_argument("--overrides-a", type=json.loads, default={})
    parser.add_argument("--overrides-b", type=json.loads, default={})
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.steps <= 10:
        parser.error("--steps must exceed the 10 untimed steps")
    rates = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as folder:
        trees = {"a": Path(folder, "a"), "b": Path(folder, "b")}
        commits = {"a": export(args.commit_a, trees["a"]), "b": export(args.commit_b, trees["b"])}
        overrides = {"a": args.overrides_a, "b": args.overrides_b}
        for round_ in range(args.rounds):
            for side in "ab":
                rates[side].append(run_once(trees[side], args.config, args.steps, overrides[side]))
                print(f"round {round_ + 1} {side} {commits[side][:8]}: "
                      f"{rates[side][-1]:.3f} steps/s", flush=True)
    medians = {side: statistics.median(values) for side, values in rates.items()}
    result = {"config": args.config, "steps": args.steps, "rounds": args.rounds,
              "a": {"commit": commits["a"], "overrides": args.overrides_a,
                    "steps_per_s": rates["a"], "median": medians["a"]},
              "b": {"commit": commits["b"], "overrides": args.overrides_b,
                    "steps_per_s": rates["b"], "median": medians["b"]},
              "b_over_a": medians["b"] / medians["a"]}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
