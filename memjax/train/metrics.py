"""Metric writers: `workdir/metrics.jsonl` (one JSON record per line) and TensorBoard.

The workdir may be remote (`gs://bucket/run`, `memjax.paths`). There `metrics.jsonl` is
rewritten whole at every write (a remote object cannot be appended to), and TensorBoard is
written by tensorboardX where it can write that storage (`gs://` with `google-cloud-storage`
installed, `s3://` with `boto3`); elsewhere TensorBoard is skipped with a one-line warning and
`metrics.jsonl` holds every record.
"""

import json
import math
import os
import sys

from tensorboardX import SummaryWriter, record_writer

from memjax.paths import as_path, is_remote, scheme

# URI schemes tensorboardX writes itself: scheme -> (its flag that the client library is
# importable, the package that provides it).
_TENSORBOARD_SCHEMES = {"gs": ("GCS_ENABLED", "google-cloud-storage"), "s3": ("S3_ENABLED", "boto3")}


def tensorboard_writer(logdir, resume_step: int):
    """tensorboardX's `SummaryWriter` for `logdir`, purging steps after `resume_step`; None
    (after a one-line warning on stderr) for remote storage tensorboardX cannot write."""
    logdir = os.fspath(logdir)
    if is_remote(logdir):
        flag, package = _TENSORBOARD_SCHEMES.get(scheme(logdir), (None, None))
        if flag is None or not getattr(record_writer, flag, False):
            needs = (f"tensorboardX needs {package} installed for {scheme(logdir)}://" if package
                     else f"tensorboardX cannot write {scheme(logdir)}://")
            print(f"warning: no TensorBoard in {logdir}: {needs} (metrics.jsonl has every record)",
                  file=sys.stderr)
            return None
    return SummaryWriter(logdir, purge_step=resume_step + 1)


class MetricWriter:
    """Appends `{"step": s, **metrics}` records; on resume from step s drops records after s.

    Truncating on resume makes the file of an interrupted-then-resumed run identical to that
    of an uninterrupted one (records written after the last checkpoint are written again).
    """

    def __init__(self, workdir, resume_step: int):
        workdir = as_path(workdir)
        self.path = workdir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            kept = [line + "\n" for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(kept))
        # Local: appended to an open file. Remote: the lines so far, rewritten at each write.
        self._lines = kept if is_remote(workdir) else None
        self._file = None if self._lines is not None else self.path.open("a")
        self._tb = tensorboard_writer(workdir / "tensorboard", resume_step)

    def write(self, step: int, metrics: dict[str, float]):
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        if self._tb is None:
            return
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(name, value, step)

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullWriter:
    """What processes other than 0 get: writes nothing (one process writes the files)."""

    def write(self, step: int, metrics: dict[str, float]):
        del step, metrics

    def close(self):
        pass


def read_metrics(workdir) -> list[dict]:
    """All records of `workdir/metrics.jsonl`, in order."""
    path = as_path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
