"""Sweeps: a study file's grid of runs, launched as `scripts/train.py` subprocesses.

A study is a Python file defining `PRESETS` (the grid sizes it offers, e.g. `("cpu", "full")`)
and `runs(preset: str) -> list[dict]`; each dict has `name` (the run
directory under the sweep directory), `config` (`path.py:args`) and optional `overrides`
(`{"train.steps": 500}`, passed as `--config.train.steps=500`). A run whose `result.json` exists
is complete and skipped, so an interrupted sweep started again runs only what is missing (and a
run killed midway resumes from its own checkpoint).

The sweep directory may be remote (`gs://bucket/sweep`, `memjax.paths`): the runs get remote
workdirs; a run's output goes to a local temporary file while it runs and is then appended to
its `log.txt` there.
"""

import concurrent.futures
import importlib.util
import json
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from memjax.paths import as_path, is_remote


def load_study_module(path):
    """The study file at `path` as a module (it defines `runs(preset)` and `PRESETS`)."""
    spec = importlib.util.spec_from_file_location("_memjax_study", path)
    if spec is None:
        raise FileNotFoundError(f"no study file at {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_study(path: str, preset: str) -> list[dict]:
    """The runs of `preset`, checked: unique names, only the known fields."""
    runs = load_study_module(path).runs(preset)
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"study {path} has duplicate run names")
    for run in runs:
        unknown = set(run) - {"name", "config", "overrides"}
        if unknown:
            raise ValueError(f"run {run.get('name')!r} has unknown fields {sorted(unknown)}")
    return runs


def command(run: dict, workdir) -> list[str]:
    overrides = [f"--config.{k}={v}" for k, v in run.get("overrides", {}).items()]
    return [sys.executable, "scripts/train.py", "--config", run["config"],
            "--workdir", str(workdir), "--config.train.progress_bar=False", *overrides]


def is_complete(workdir) -> bool:
    return (as_path(workdir) / "result.json").exists()


class _Children:
    """The live training subprocesses, so that stopping the sweep stops (and checkpoints) them.

    A SIGTERM to the sweep is forwarded to every child: each saves a checkpoint and exits (see
    `memjax.train.trainer`), and no further run starts. Without this the children would outlive
    the sweep and race a restarted sweep for the same run directories.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def stop(self, signum=signal.SIGTERM, frame=None):
        self.stopping.set()
        with self.lock:
            for proc in self.procs:
                proc.send_signal(signal.SIGTERM)


def launch(run: dict, workdir, children: _Children | None = None) -> dict | None:
    """Runs one training subprocess; logs to `workdir/log.txt`, wall time to `sweep_run.json`.

    The wall time accumulates over launches (a run resumed after an interrupted sweep reports
    its total). Returns None without launching when the sweep is stopping.
    """
    children = children or _Children()
    if children.stopping.is_set():
        return None
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info_path = workdir / "sweep_run.json"
    previous = json.loads(info_path.read_text()) if info_path.exists() else {}
    start = time.time()
    log_path = workdir / "log.txt"
    # A subprocess writes to a local file: log.txt itself, or for a remote workdir a temporary
    # file appended to log.txt once the run ends.
    with (tempfile.TemporaryFile() if is_remote(workdir) else open(log_path, "ab")) as log:
        with children.lock:
            if children.stopping.is_set():  # stopped while this run was being set up
                return None
            proc = subprocess.Popen(command(run, workdir), stdout=log, stderr=subprocess.STDOUT)
            children.procs.add(proc)
        code = proc.wait()
        with children.lock:
            children.procs.discard(proc)
        if is_remote(workdir):
            log.seek(0)
            earlier = log_path.read_bytes() if log_path.exists() else b""
            with log_path.open("wb") as out:
                out.write(earlier)
                shutil.copyfileobj(log, out)
    info = {"name": run["name"], "config": run["config"], "overrides": run.get("overrides", {}),
            "returncode": code, "wall_s": previous.get("wall_s", 0.0) + time.time() - start,
            "launches": previous.get("launches", 0) + 1}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def select_runs(runs: list[dict], only: tuple[str, ...]) -> list[dict]:
    """The runs named in `only`, in that order (all runs when `only` is empty)."""
    if not only:
        return runs
    by_name = {r["name"]: r for r in runs}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise ValueError(f"no run(s) {unknown} in this study; its runs: {', '.join(by_name)}")
    return [by_name[name] for name in only]


def run_sweep(study: str, sweep_dir, preset: str = "cpu", parallel: int = 1, dry_run: bool = False,
              only: tuple[str, ...] = ()):
    """Launches the study's missing runs, `parallel` at a time; returns their infos.

    `only`: run names to keep, in the given order (a subset of the study's runs); an unknown
    name is an error listing the study's runs.
    """
    sweep_dir = as_path(sweep_dir)
    runs = select_runs(load_study(study, preset), only)
    todo = [r for r in runs if not is_complete(sweep_dir / r["name"])]
    print(f"{len(runs)} runs in {study} (preset {preset}); {len(runs) - len(todo)} complete, "
          f"{len(todo)} to run")
    if dry_run:
        for run in todo:
            print(" ".join(command(run, sweep_dir / run["name"])))
        return []
    infos, children = [], _Children()
    in_main = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, children.stop) if in_main else None
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(launch, r, sweep_dir / r["name"], children) for r in todo]
            for future in concurrent.futures.as_completed(futures):
                info = future.result()
                if info is None:
                    continue
                status = ("ok" if info["returncode"] == 0
                          else f"FAILED (exit {info['returncode']}, see log.txt)")
                print(f"{info['name']}: {status}, {info['wall_s']:.0f} s in all", flush=True)
                infos.append(info)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous_handler)
    if children.stopping.is_set():
        raise SystemExit("sweep stopped by SIGTERM: running runs saved a checkpoint; "
                         "start the sweep again to finish the missing runs")
    return infos
