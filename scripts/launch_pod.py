"""Launches `scripts/train.py` on every worker of a Cloud TPU VM slice (a pod slice).

    python scripts/launch_pod.py --config configs/mqar.py:model=gated_deltanet \
        --tpu memjax-v5e-64 --zone us-west4-a --accelerator-type v5litepod-64 \
        --workdir gs://my-bucket/runs/mqar --dry-run

Five steps, each one command: (1) create the slice (`gcloud compute tpus tpu-vm create`; skipped
with `--existing`), (2) pack the repository's committed files (`git archive HEAD`, run here),
(3) copy the tarball to every worker (`tpu-vm scp --worker=all`), (4) set up every worker
(unpack, `make setup`, for a gs:// workdir the `gcs` extra (gcsfs, google-cloud-storage), then
`jax[tpu]` at the version pinned in constraints.txt, which brings the libtpu wheel), (5) start training on every worker in the background (`nohup`, log in
`~/memjax/train.log`) with `MEMJAX_DISTRIBUTED=1`. `--dry-run` prints the commands, shell-quoted,
one a line, with `#` notes; otherwise they run in order and the first failure stops the launch.

Checked before anything runs: the config loads with the overrides and passes
`memjax.config_validation` (the host-memory check excepted: the model is sized for the TPU's
memory, not this machine's), and the accelerator type parses (`HOST_RULES`). The data mesh is
`--config.mesh.data=-1` (every device of the slice) unless a `--set mesh.*` override is given.

scripts/train.py starts JAX's distributed system (`memjax.train.distributed.initialize()`), and
the trainer trains across hosts (each process generates only its rows of every batch, checkpoints
are saved from every process; tested with two CPU processes, tests/train/test_multiprocess.py).
--workdir may be gs://... (shared storage, which a multi-host slice needs for its checkpoints):
the trainer, checkpoints, metrics and results take it through `memjax.paths` (etils.epath).
Not yet (see `NOT_YET`): any of this run on a TPU pod or against Google Cloud Storage.
"""

import argparse
import ast
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REMOTE_DIR = "memjax"  # the repository's copy on each worker, under the login user's home
LOG = "train.log"  # under REMOTE_DIR on each worker


@dataclasses.dataclass(frozen=True)
class HostRule:
    """How one TPU generation's accelerator type `<generation>-<N>` maps to chips and hosts."""

    cores_per_chip: int  # what N counts: 1 = chips (v5e, v6e), 2 = TensorCores, two per chip
    chips_per_host: int  # chips per TPU VM worker on a multi-host slice
    single_host_chips: int  # slices up to this many chips are one VM
    runtime: str  # default --runtime-version


# Sources: Cloud TPU docs, "TPU versions" / per-version pages and "TPU software versions".
# - v4, v5p: N counts TensorCores (2 per chip); 4 chips (8 cores) per host: v4-8 is 1 host,
#   v4-32 is 4 hosts.
# - v5e (`v5litepod`), v6e: N counts chips. v5litepod-1/-4/-8 (v6e-1/-4/-8) are one VM (the
#   8-chip slice is a single 8-chip VM, ct5lp-hightpu-8t); from 16 chips up a slice is made of
#   4-chip VMs (ct5lp-hightpu-4t / ct6e-standard-4t), so v5litepod-64 is 16 workers. (The v5e
#   page's "number of hosts" column counts physical 8-chip hosts, 8 for 64 chips; the TPU VM
#   workers that `--worker=all` reaches are the 4-chip VMs.)
HOST_RULES = {
    "v4": HostRule(cores_per_chip=2, chips_per_host=4, single_host_chips=4,
                   runtime="tpu-ubuntu2204-base"),
    "v5p": HostRule(cores_per_chip=2, chips_per_host=4, single_host_chips=4,
                    runtime="v2-alpha-tpuv5"),
    "v5litepod": HostRule(cores_per_chip=1, chips_per_host=4, single_host_chips=8,
                          runtime="v2-alpha-tpuv5-lite"),
    "v6e": HostRule(cores_per_chip=1, chips_per_host=4, single_host_chips=8,
                    runtime="v2-alpha-tpuv6e"),
}
ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}  # names people use that gcloud does not

# Gaps between this launcher and a working multi-host run, printed as notes with every launch.
# Delete a line when its gap is closed.
NOT_YET = (
    "not yet tested against Google Cloud Storage: gs:// workdirs go through etils.epath (gcsfs) "
    "and Orbax/TensorStore, tested with local paths and with gs:// paths redirected to a local "
    "directory (tests/train/test_remote_workdir.py)",
    "not yet tested on a TPU pod: multi-host training (per-process batch rows, checkpoints "
    "from every process, preemption agreed across processes) is tested with two CPU processes "
    "on one machine only (tests/train/test_multiprocess.py)",
)


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator_type: str
    generation: str
    chips: int
    hosts: int
    rule: HostRule


def parse_accelerator(accelerator_type: str) -> Slice:
    """`v5litepod-64` -> 64 chips on 16 hosts; `ValueError` naming the problem otherwise."""
    match = re.fullmatch(r"(v[0-9a-z]+)-([0-9]+)", accelerator_type.strip())
    known = ", ".join(f"{g}-N" for g in HOST_RULES)
    if not match:
        raise ValueError(f"accelerator type {accelerator_type!r} is not <generation>-<count> "
                         f"(known: {known}; e.g. v5litepod-64, v4-32)")
    generation, count = match.group(1), int(match.group(2))
    if generation in ALIASES:
        raise ValueError(f"accelerator type {accelerator_type!r}: gcloud calls {generation} "
                         f"'{ALIASES[generation]}' (use {ALIASES[generation]}-{count})")
    if generation not in HOST_RULES:
        raise ValueError(f"unknown TPU generation {generation!r} in {accelerator_type!r} "
                         f"(known: {known})")
    rule = HOST_RULES[generation]
    unit = "TensorCores, 2 per chip" if rule.cores_per_chip == 2 else "chips"
    if count < rule.cores_per_chip or count % rule.cores_per_chip:
        raise ValueError(f"{accelerator_type}: the number after the dash counts {unit}, so it "
                         f"must be a positive multiple of {rule.cores_per_chip}")
    chips = count // rule.cores_per_chip
    if chips <= rule.single_host_chips:
        hosts = 1
    elif chips % rule.chips_per_host:
        raise ValueError(f"{accelerator_type}: {chips} chips do not fill hosts of "
                         f"{rule.chips_per_host} chips")
    else:
        hosts = chips // rule.chips_per_host
    return Slice(accelerator_type, generation, chips, hosts, rule)


def pinned_jax_version(constraints: Path = REPO / "constraints.txt") -> str:
    """The `jax==X` pin of constraints.txt."""
    for line in constraints.read_text().splitlines():
        match = re.fullmatch(r"jax==([0-9A-Za-z.+!-]+)", line.strip())
        if match:
            return match.group(1)
    raise ValueError(f"no 'jax==<version>' line in {constraints}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["train.steps=500"]` -> `{"train.steps": "500"}` (values kept as written)."""
    overrides = {}
    for item in items:
        key, has_value, value = item.partition("=")
        key = key.strip().removeprefix("config.")
        if not has_value or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set train.steps=500")
        overrides[key] = value
    return overrides


def with_mesh_default(overrides: dict[str, str]) -> dict[str, str]:
    """Every device on the data axis (`mesh.data=-1`) unless a `mesh.*` key is set."""
    if any(key == "mesh" or key.startswith("mesh.") for key in overrides):
        return dict(overrides)
    return {**overrides, "mesh.data": "-1"}


def literal(value: str):
    """A `--config.key=value` string as the config sees it (a Python literal, else a string)."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def check_config(spec: str, overrides: dict[str, str]) -> str:
    """Loads and validates the config; returns its file's path relative to the repository (the
    path on the workers). `ValueError` naming the problem otherwise."""
    path_part, _, _ = spec.partition(":")
    path = Path(path_part).resolve()
    if not path.is_file():
        raise ValueError(f"--config {spec!r}: no config file at {path_part!r}")
    if not path.is_relative_to(REPO):
        raise ValueError(f"--config {spec!r}: {path} is outside the repository {REPO}, so it "
                         "would not reach the workers (only the repository is copied)")
    from memjax.config import load_config  # imported here: loading a config imports JAX
    from memjax.config_validation import validate_config

    try:
        missing_field(load_config(spec), overrides)
        config = load_config(spec, {key: literal(value) for key, value in overrides.items()})
        validate_config(config, memory_bytes=2**62)  # sized for the TPU, not for this machine
    except Exception as error:  # noqa: BLE001  (a broken config file raises anything)
        detail = str(error).strip() or type(error).__name__
        raise ValueError(f"--config {spec!r} does not load: {detail}") from None
    return str(path.relative_to(REPO)) + spec[len(path_part):]


def missing_field(config, overrides: dict[str, str]) -> None:
    """`ValueError` for the first override naming a field the config does not have."""
    for key, value in overrides.items():
        node, where = config, "config"
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                fields = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                raise ValueError(f"{where} has no field {part!r} (its fields: {fields}), in "
                                 f"--set {key}={value}")
            node, where = node[part], f"{where}.{part}"


def train_py_initializes_distributed() -> bool:
    """Whether scripts/train.py starts JAX's distributed system yet (see NOT_YET)."""
    return "distributed.initialize" in (REPO / "scripts" / "train.py").read_text()


def is_remote_path(workdir: str) -> bool:
    return re.match(r"[a-z][a-z0-9+.-]*://", workdir) is not None  # gs://, s3://, ...


@dataclasses.dataclass(frozen=True)
class Step:
    label: str
    argv: list[str]


def gcloud_target(args) -> list[str]:
    return ["--zone", args.zone] + (["--project", args.project] if args.project else [])


def plan(args) -> tuple[list[str], list[Step], str]:
    """(notes, steps, a closing note) for parsed arguments; `ValueError` on an invalid setting."""
    tpu = parse_accelerator(args.accelerator_type)
    runtime = args.runtime_version or tpu.rule.runtime
    overrides = with_mesh_default(parse_overrides(args.set))
    config_spec = check_config(args.config, overrides)
    mesh_data = literal(overrides.get("mesh.data", "1"))
    if isinstance(mesh_data, int) and mesh_data > tpu.chips:  # one JAX device per chip
        raise ValueError(f"--set mesh.data={mesh_data} but {tpu.accelerator_type} has "
                         f"{tpu.chips} devices (one per chip); use -1 for all of them")
    jax_version = pinned_jax_version()

    notes = [
        f"{args.tpu}: {tpu.accelerator_type} = {tpu.chips} chips on {tpu.hosts} host(s) "
        f"({tpu.chips // tpu.hosts} chips per host), runtime {runtime}",
        f"config {config_spec} loads and passes validation with overrides "
        + ", ".join(f"{k}={v}" for k, v in overrides.items()),
        "the tarball holds committed files only (git archive HEAD): commit changes first",
    ]
    if tpu.hosts > 1 and not is_remote_path(args.workdir):
        notes.append(f"warning: --workdir {args.workdir} is a local path: on a {tpu.hosts}-host "
                     "slice each worker would write its own copy; use shared storage (gs://...)")
    if not train_py_initializes_distributed():
        notes.append("not yet: scripts/train.py does not call "
                     "memjax.train.distributed.initialize(), so MEMJAX_DISTRIBUTED=1 has no "
                     "effect and each worker trains on its own")
    notes += NOT_YET

    target = gcloud_target(args)
    tarball = f"/tmp/memjax-{args.tpu}.tar.gz"
    steps = []
    if not args.existing:
        create = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.tpu, *target,
                  "--accelerator-type", tpu.accelerator_type, "--version", runtime]
        create += ["--spot"] if args.spot else ["--preemptible"] if args.preemptible else []
        steps.append(Step("create the slice", create))
    steps.append(Step("pack the repository",
                      ["git", "-C", str(REPO), "archive", "--format=tar.gz",
                       f"--output={tarball}", "HEAD"]))
    steps.append(Step("copy to every worker",
                      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                       f"{args.tpu}:{REMOTE_DIR}.tar.gz", "--worker=all", *target]))
    setup = "; ".join([
        "set -e",
        f"mkdir -p {REMOTE_DIR}",
        f"tar -xzf {REMOTE_DIR}.tar.gz -C {REMOTE_DIR}",
        f"cd {REMOTE_DIR}",
        # TPU VM images are Ubuntu 22.04 (Python 3.10); memjax needs >= 3.12 (find_python.sh).
        "if ! scripts/find_python.sh >/dev/null 2>&1 || ! command -v make >/dev/null; then "
        "sudo apt-get -o DPkg::Lock::Timeout=600 update -q && "
        "sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q software-properties-common make "
        "&& sudo add-apt-repository -y ppa:deadsnakes/ppa && "
        "sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q python3.12 python3.12-venv; fi",
        "make setup",
        *([".venv/bin/pip install -q -c constraints.txt -e '.[gcs]'"]
          if args.workdir.startswith("gs://") else []),  # gcsfs for epath, a client for TensorBoard
        f'.venv/bin/pip install -q -c constraints.txt "jax[tpu]=={jax_version}"',
    ])
    steps.append(Step("set up every worker",
                      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, "--worker=all",
                       *target, "--command", setup]))
    train = ["MEMJAX_DISTRIBUTED=1", "nohup", ".venv/bin/python", "scripts/train.py",
             "--config", config_spec, "--workdir", args.workdir,
             *(f"--config.{key}={value}" for key, value in overrides.items())]
    remote = f"cd {REMOTE_DIR} && {shlex.join(train)} > {LOG} 2>&1 < /dev/null &"
    steps.append(Step("start training on every worker",
                      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, "--worker=all",
                       *target, "--command", remote]))
    follow = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, "--worker=0", *target,
              "--command", f"tail -f {REMOTE_DIR}/{LOG}"]
    return notes, steps, f"then follow worker 0's log: {shlex.join(follow)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Create a TPU VM slice and start scripts/train.py on every worker.",
        epilog="Generations and default runtimes: " + ", ".join(
            f"{g} ({r.runtime})" for g, r in HOST_RULES.items()))
    parser.add_argument("--config", required=True,
                        help="config spec as for scripts/train.py, e.g. configs/mqar.py:model=deltanet")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, passed as --config.KEY=VALUE (repeatable)")
    parser.add_argument("--tpu", required=True, help="TPU VM (slice) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-64, v4-32")
    parser.add_argument("--runtime-version", help="default: the generation's (see below)")
    parser.add_argument("--project")
    preemption = parser.add_mutually_exclusive_group()
    preemption.add_argument("--spot", action="store_true", help="create a Spot slice")
    preemption.add_argument("--preemptible", action="store_true",
                            help="create a preemptible slice")
    parser.add_argument("--existing", action="store_true",
                        help="use an existing slice: skip creation")
    parser.add_argument("--workdir", required=True,
                        help="run directory; on a multi-host slice shared storage (gs://...)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands instead of running them")
    return parser


def main(argv: list[str] | None = None) -> list[list[str]]:
    """Parses `argv`, then prints (`--dry-run`) or runs the commands; returns them as argv lists."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        notes, steps, closing = plan(args)
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        for note in notes:
            print(f"# {note}")
        for step in steps:
            print(shlex.join(step.argv))
        print(f"# {closing}")
        return [step.argv for step in steps]
    for note in notes:
        print(f"# {note}", file=sys.stderr)
    for number, step in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {step.label}: {shlex.join(step.argv)}", file=sys.stderr,
              flush=True)
        try:
            code = subprocess.run(step.argv).returncode
        except FileNotFoundError:
            sys.exit(f"error: step {number}/{len(steps)} ({step.label}): {step.argv[0]!r} is "
                     "not installed or not on PATH")
        if code != 0:
            sys.exit(f"error: step {number}/{len(steps)} ({step.label}) failed with exit code "
                     f"{code}; later steps not run. The command: {shlex.join(step.argv)}")
    print(f"# {closing}", file=sys.stderr)
    return [step.argv for step in steps]


if __name__ == "__main__":
    main()
