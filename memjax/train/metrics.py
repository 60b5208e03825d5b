"""Metric writers: `workdir/metrics.jsonl` (one JSON record per line) and TensorBoard."""

import json
import math
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricWriter:
    """Appends `{"step": s, **metrics}` records; on resume from step s drops records after s.

    Truncating on resume makes the file of an interrupted-then-resumed run identical to that
    of an uninterrupted one (records written after the last checkpoint are written again).
    """

    def __init__(self, workdir: Path, resume_step: int):
        self.path = Path(workdir) / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, float]):
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(name, value, step)

    def close(self):
        self._file.close()
        self._tb.close()


class NullWriter:
    """What processes other than 0 get: writes nothing (one process writes the files)."""

    def write(self, step: int, metrics: dict[str, float]):
        del step, metrics

    def close(self):
        pass


def read_metrics(workdir) -> list[dict]:
    """All records of `workdir/metrics.jsonl`, in order."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
