"""Runs a study's grid of training runs; finished runs are skipped, so a sweep resumes.

    python scripts/sweep.py experiments/zoology_mqar.py [--preset cpu] [--parallel N] [--dry-run] \
        [--sweep-dir runs/sweeps/<study>] [--only RUN,RUN,...]

Then `python scripts/report.py runs/sweeps/<study>` writes the table and plots.
"""

import argparse
from pathlib import Path

from memjax.sweep import run_sweep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a study file in experiments/")
    p.add_argument("--preset", default="cpu", help="grid size, as the study defines (default: cpu)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once on this machine")
    p.add_argument("--dry-run", action="store_true", help="print the commands of missing runs only")
    p.add_argument("--sweep-dir", default=None, help="default: runs/sweeps/<study name>")
    p.add_argument("--only", default="", help="comma-separated run names: run only these, in this order")
    args = p.parse_args(argv)
    sweep_dir = args.sweep_dir or Path("runs/sweeps") / Path(args.study).stem
    infos = run_sweep(args.study, sweep_dir, args.preset, args.parallel, args.dry_run,
                      tuple(filter(None, args.only.split(","))))
    failed = [i["name"] for i in infos if i["returncode"] != 0]
    if failed:
        raise SystemExit(f"failed runs: {', '.join(failed)}")


if __name__ == "__main__":
    main()
