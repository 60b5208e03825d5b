"""Sweeps: a study file's grid of runs, launched as `scripts/train.py` subprocesses.

A study is a Python file defining `runs(preset: str) -> list[dict]`; each dict has `name` (the run
directory under the sweep directory), `config` (`path.py:args`) and optional `overrides`
(`{"train.steps": 500}`, passed as `--config.train.steps=500`). A run whose `result.json` exists
is complete and skipped, so an interrupted sweep started again runs only what is missing (and a
run killed midway resumes from its own checkpoint).
"""

import concurrent.futures
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path


def load_study(path: str, preset: str) -> list[dict]:
    spec = importlib.util.spec_from_file_location("_memjax_study", path)
    if spec is None:
        raise FileNotFoundError(f"no study file at {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = module.runs(preset)
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"study {path} has duplicate run names")
    for run in runs:
        unknown = set(run) - {"name", "config", "overrides"}
        if unknown:
            raise ValueError(f"run {run.get('name')!r} has unknown fields {sorted(unknown)}")
    return runs


def command(run: dict, workdir: Path) -> list[str]:
    overrides = [f"--config.{k}={v}" for k, v in run.get("overrides", {}).items()]
    return [sys.executable, "scripts/train.py", "--config", run["config"],
            "--workdir", str(workdir), "--config.train.progress_bar=False", *overrides]


def is_complete(workdir: Path) -> bool:
    return (workdir / "result.json").exists()


def launch(run: dict, workdir: Path) -> dict:
    """Runs one training subprocess; logs to `workdir/log.txt`, wall time to `sweep_run.json`."""
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(workdir / "log.txt", "a") as log:
        code = subprocess.call(command(run, workdir), stdout=log, stderr=subprocess.STDOUT)
    info = {"name": run["name"], "config": run["config"], "overrides": run.get("overrides", {}),
            "returncode": code, "wall_s": time.time() - start}
    (workdir / "sweep_run.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_sweep(study: str, sweep_dir, preset: str = "cpu", parallel: int = 1, dry_run: bool = False):
    """Launches the study's missing runs, `parallel` at a time; returns their infos."""
    sweep_dir = Path(sweep_dir)
    runs = load_study(study, preset)
    todo = [r for r in runs if not is_complete(sweep_dir / r["name"])]
    print(f"{len(runs)} runs in {study} (preset {preset}); {len(runs) - len(todo)} complete, "
          f"{len(todo)} to run")
    if dry_run:
        for run in todo:
            print(" ".join(command(run, sweep_dir / run["name"])))
        return []
    infos = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(launch, r, sweep_dir / r["name"]): r for r in todo}
        for future in concurrent.futures.as_completed(futures):
            info = future.result()
            status = "ok" if info["returncode"] == 0 else f"FAILED (exit {info['returncode']}, see log.txt)"
            print(f"{info['name']}: {status} in {info['wall_s']:.0f} s", flush=True)
            infos.append(info)
    return infos
