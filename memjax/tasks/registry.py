"""The task registry: `config.task.name` -> a builder of train and test data from the config."""

import dataclasses

import grain

from memjax.registry import Registry
from memjax.tasks import mqar

TASKS = Registry("task")


@dataclasses.dataclass
class TaskData:
    train: grain.IterDataset  # endless batches {"inputs", "labels"} `[B, T]`; checkpointable iterator
    test: dict[str, grain.MapDataset]  # slice name -> batches, for per-slice accuracy
    sample_length: int  # the training sequence length (longest), to initialise models


def _segments(cfg, key: str, vocab_size: int) -> list[mqar.Segment]:
    segments = []
    for i, entry in enumerate(cfg[key]):
        if len(entry) != 3:
            raise ValueError(f"task.{key}[{i}] = {entry!r}: expected (seq_len, num_pairs, num_examples)")
        segment = mqar.Segment(*map(int, entry))
        try:
            mqar.check_settings(vocab_size, segment.seq_len, segment.num_pairs)
        except ValueError as error:
            raise ValueError(f"task.{key}[{i}] = {tuple(entry)}: {error}") from None
        segments.append(segment)
    if not segments:
        raise ValueError(f"task.{key} is empty")
    return segments


@TASKS.register("mqar")
def mqar_task(cfg, seed: int) -> TaskData:
    """MQAR from `config.task` (vocab_size, train/test segments, power_a, random_filler, batch sizes)."""
    train_segments = _segments(cfg, "train_segments", cfg.vocab_size)
    test_segments = _segments(cfg, "test_segments", cfg.vocab_size)
    options = dict(power_a=cfg.power_a, random_filler=cfg.random_filler)
    return TaskData(
        train=mqar.train_dataset(cfg.vocab_size, train_segments, cfg.batch_size, seed, **options),
        test=mqar.test_datasets(cfg.vocab_size, test_segments, cfg.eval_batch_size, seed, **options),
        sample_length=max(s.seq_len for s in train_segments),
    )
