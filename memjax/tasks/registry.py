"""The task registry: `config.task.name` -> a builder of train and test data from the config.

Each task module registers its builder with `@TASKS.register("<name>")`; `memjax.tasks` imports
every task module, so importing anything from `memjax.tasks` fills the registry.
"""

import dataclasses
from typing import Callable, Sequence

import grain

from memjax.registry import Registry

TASKS = Registry("task")


@dataclasses.dataclass
class TaskData:
    train: grain.IterDataset  # endless batches {"inputs", "labels"} `[B, T]`; checkpointable iterator
    test: dict[str, grain.MapDataset]  # slice name -> batches, for per-slice metrics
    sample_length: int  # the training sequence length (longest), to initialise models


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
