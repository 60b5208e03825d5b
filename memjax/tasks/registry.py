"""The task registry: `config.task.name` -> a builder of train and test data from the config.

Each task module registers its builder with `@TASKS.register("<name>")`; `memjax.tasks` imports
every task module, so importing anything from `memjax.tasks` fills the registry.
"""

import dataclasses
from typing import Callable, Sequence

import grain

from memjax.registry import Registry

TASKS = Registry("task")


LOSSES = ("cross_entropy", "mse")


@dataclasses.dataclass
class TaskData:
    """What the trainer needs from a task. The defaults describe a token classification task.

    `loss = "cross_entropy"`: batches `{"inputs": int[B, T], "labels": int[B, T]}`, labels
    `IGNORE_INDEX` where unsupervised; scored by accuracy (`input_dim = output_dim = 0`).
    `loss = "mse"`: batches `{"inputs": float[B, T, input_dim], "targets": float[B, T, output_dim]}`
    plus an optional `"mask": float[B, T]` (1 = supervised, default all ones); scored by mean
    squared error, per slice and per position. The model's `input_dim`/`output_dim` must match.

    `probe` (optional, classification only): slice name -> batches `{"inputs": int[B, T],
    "swapped_labels": int[B, T], "original_labels": int[B, T]}`, scored by the trainer as
    `probe/<slice>/swapped_accuracy` and `probe/<slice>/original_accuracy` beside the test
    accuracy (MQAR's key-swap recall probe, `memjax.tasks.recall_probe`).

    Datasets from `memjax.tasks.data` (`train_dataset`, `test_datasets`) let each process of a
    multi-host run generate only its rows of every batch (`data.with_rows`); other Grain datasets
    work too, each process then generating whole batches and keeping its rows.
    """

    train: grain.IterDataset  # endless batches (see above); checkpointable iterator
    test: dict[str, grain.MapDataset]  # slice name -> batches, for per-slice metrics
    sample_length: int  # the training sequence length (longest), to initialise models
    input_dim: int = 0  # 0: int token inputs [B, T]; n > 0: float inputs [B, T, n]
    output_dim: int = 0  # 0: vocab logits; o > 0: float targets [B, T, o] (regression)
    loss: str = "cross_entropy"  # one of LOSSES
    probe: dict[str, grain.MapDataset] | None = None  # slice name -> probe batches (see above)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"TaskData.loss must be one of {LOSSES}, got {self.loss!r}")
        if (self.loss == "mse") != (self.output_dim > 0):
            raise ValueError(f"loss {self.loss!r} with output_dim = {self.output_dim}: mse needs "
                             "output_dim > 0, cross_entropy needs output_dim = 0")
        if self.input_dim < 0:
            raise ValueError(f"TaskData.input_dim must be >= 0, got {self.input_dim}")
        if self.probe is not None and self.loss != "cross_entropy":
            raise ValueError("TaskData.probe is scored by accuracy: it needs loss 'cross_entropy'")


def parse_settings(cfg, key: str, parse: Callable[[tuple], object]) -> list:
    """`[parse(entry) for entry in cfg[key]]`, with errors that name the entry.

    `parse` turns one config tuple into a task's setting object and raises ValueError for an
    impossible one; the error is re-raised as `task.<key>[i] = (...): <reason>`.
    """
    entries: Sequence = cfg[key]
    if not entries:
        raise ValueError(f"task.{key} is empty")
    settings = []
    for i, entry in enumerate(entries):
        try:
            settings.append(parse(tuple(entry)))
        except (ValueError, TypeError) as error:
            raise ValueError(f"task.{key}[{i}] = {tuple(entry)}: {error}") from None
    return settings
