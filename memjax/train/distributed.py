"""Multi-host start-up: `jax.distributed.initialize()` when training spans several processes.

    from memjax.train import distributed
    info = distributed.initialize()   # before any other JAX call
    if distributed.is_main_process(): ...

Which mode is chosen, from the environment:

- `MEMJAX_COORDINATOR_ADDRESS` (`host:port` of process 0), `MEMJAX_NUM_PROCESSES` and
  `MEMJAX_PROCESS_ID`: explicit start-up with those three values (any cluster, CPU or GPU). All
  three or none: a partial set is a `ValueError` naming the missing ones.
- otherwise `MEMJAX_DISTRIBUTED=1`: automatic start-up with no arguments, JAX discovers the
  processes itself (TPU pod slices, which `scripts/launch_pod.py` starts this way; also Slurm and
  Open MPI).
- otherwise (nothing set, or `MEMJAX_DISTRIBUTED=0`): a single process, nothing is started.

`initialize()` is idempotent: a second call (or a call after someone else already started JAX's
distributed system) starts nothing and returns the same record. It must run before JAX is used
otherwise (before the first `jax.devices()` or computation), as `jax.distributed.initialize`
requires.

`scripts/train.py` calls `initialize()` first thing in `main`. The trainer then runs the same
loop on every process (`memjax.train.trainer`: each process generates only its share of every
global batch and hands it to JAX, Orbax checkpoints from all processes, a signal to any process
stops all of them at one step); process 0 alone writes the logs, metrics and results.

CPU: cross-process collectives need an implementation on the CPU backend; `initialize()` picks
gloo (`jax_cpu_collectives_implementation`, chosen before the backend starts) unless one is set
already (JAX 0.12 defaults to gloo; an explicit "mpi" is kept). So several CPU processes on one
machine train together, e.g. two with `XLA_FLAGS=--xla_force_host_platform_device_count=1`
and `--config.mesh.data=-1` (`tests/train/test_multiprocess.py`).
"""

import dataclasses
import os
from collections.abc import Mapping

import jax

DISTRIBUTED_VAR = "MEMJAX_DISTRIBUTED"
COORDINATOR_VAR = "MEMJAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_VAR = "MEMJAX_NUM_PROCESSES"
PROCESS_ID_VAR = "MEMJAX_PROCESS_ID"
EXPLICIT_VARS = (COORDINATOR_VAR, NUM_PROCESSES_VAR, PROCESS_ID_VAR)


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: `process_index` in [0, `process_count`)."""

    process_index: int
    process_count: int


_started: ProcessInfo | None = None  # set by the first initialize() call


def initialize_args(environ: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` chosen by the environment (see the
    module docstring): None for a single process (start nothing), `{}` for automatic discovery,
    or `coordinator_address`, `num_processes` and `process_id`. Raises `ValueError` on a partial
    or malformed setting."""
    env = os.environ if environ is None else environ
    present = [name for name in EXPLICIT_VARS if env.get(name, "").strip()]
    if present:
        missing = [name for name in EXPLICIT_VARS if name not in present]
        if missing:
            raise ValueError(f"explicit multi-process start-up needs {', '.join(EXPLICIT_VARS)} "
                             f"all set; {', '.join(present)} set but {', '.join(missing)} missing")
        return _explicit_args(env)
    flag = env.get(DISTRIBUTED_VAR, "").strip()
    if flag in ("", "0"):
        return None
    if flag == "1":
        return {}
    raise ValueError(f"{DISTRIBUTED_VAR} must be 1 (start JAX's distributed system, discovering "
                     f"the processes: TPU pods) or 0 (a single process); got {flag!r}")


def _explicit_args(env: Mapping[str, str]) -> dict:
    address = env[COORDINATOR_VAR].strip()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{COORDINATOR_VAR} must be host:port (process 0's address and a free "
                         f"port), e.g. 10.0.0.2:1234; got {address!r}")
    values = {}
    for name in (NUM_PROCESSES_VAR, PROCESS_ID_VAR):
        raw = env[name].strip()
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer; got {raw!r}") from None
    count, index = values[NUM_PROCESSES_VAR], values[PROCESS_ID_VAR]
    if count < 1:
        raise ValueError(f"{NUM_PROCESSES_VAR} must be at least 1; got {count}")
    if not 0 <= index < count:
        raise ValueError(f"{PROCESS_ID_VAR} must be in [0, {NUM_PROCESSES_VAR} = {count}); "
                         f"got {index}")
    return {"coordinator_address": address, "num_processes": count, "process_id": index}


def initialize(environ: Mapping[str, str] | None = None) -> ProcessInfo:
    """Starts JAX's distributed system if the environment asks for several processes (module
    docstring); a no-op for a single process and on every call after the first. Returns this
    process's `ProcessInfo`."""
    global _started
    if _started is not None:
        return _started
    args = initialize_args(environ)
    if args is not None and not jax.distributed.is_initialized():
        if jax.config.jax_cpu_collectives_implementation is None:
            # Without one, a CPU computation across processes fails ("Multiprocess computations
            # aren't implemented on the CPU backend"); harmless for TPU and GPU devices.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**args)
    _started = ProcessInfo(jax.process_index(), jax.process_count())
    return _started


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, metrics and results."""
    return jax.process_index() == 0
