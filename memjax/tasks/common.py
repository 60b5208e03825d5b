"""Small helpers shared by the task modules built on `memjax.tasks.data`.

* `check_ints` validates and normalises the int fields of a frozen settings dataclass in its
  ``__post_init__`` (numpy ints become Python ints, so settings hash, compare and print alike).
* `check_fraction` validates a number in [0, 1] (e.g. a needle depth).
* `build_task` is the whole body of a standard task builder: parse ``cfg.train_slices`` and
  ``cfg.test_slices`` into settings objects (errors name the entry), turn each into a
  `data.Slice` (with its ``max_supervised``), and return the `TaskData` with ``sample_length``
  the longest training length.

A settings object used with `build_task` has ``name``, ``num_examples`` and ``seq_len``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from memjax.tasks import data
from memjax.tasks.registry import TaskData, parse_settings


def check_ints(settings: Any, **minimums: int) -> None:
    """Checks each field ``name`` of ``settings`` is an int ``>= minimums[name]``.

    Raises ValueError naming the field and its value; stores the value back as a Python int
    (``settings`` may be a frozen dataclass).
    """
    for name, minimum in minimums.items():
        value = data.as_int(name, getattr(settings, name))
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
        object.__setattr__(settings, name, value)


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1], else a ValueError naming ``name`` and the value."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [0, 1], got {name}={value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {name}={value!r}") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {name}={value!r}")
    return number


def build_task(cfg, seed: int, parse: Callable[[tuple], Any],
               batch_fn: Callable[[Any], data.BatchFn],
               max_supervised: Callable[[Any], int | None] = lambda settings: None) -> TaskData:
    """Train and test data from ``cfg.train_slices`` / ``cfg.test_slices``.

    ``parse(entry)`` turns one config tuple into a settings object (raising ValueError for an
    impossible one); ``batch_fn(settings)`` returns that slice's ``(seed, indices) -> batch``;
    ``max_supervised(settings)`` the most supervised positions of one of its examples
    (``data.Slice.max_supervised``; None: not declared). Uses ``cfg.batch_size`` and
    ``cfg.eval_batch_size``.
    """
    train = parse_settings(cfg, "train_slices", parse)
    test = parse_settings(cfg, "test_slices", parse)

    def slices(settings_list):
        return [data.Slice(s.name, s.num_examples, batch_fn(s), max_supervised(s))
                for s in settings_list]

    return TaskData(
        train=data.train_dataset(slices(train), cfg.batch_size, seed),
        test=data.test_datasets(slices(test), cfg.eval_batch_size, seed),
        sample_length=max(s.seq_len for s in train),
    )
