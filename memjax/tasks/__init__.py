"""Grain datasets for the synthetic memory tasks, and their metrics."""

from memjax.tasks.mqar import (
    IGNORE_INDEX,
    Segment,
    batches_per_epoch,
    check_settings,
    make_example,
    make_examples,
    segment_dataset,
    segment_seeds,
    test_datasets,
    train_dataset,
    zoology_test_segments,
    zoology_train_segments,
)

__all__ = [
    "IGNORE_INDEX",
    "Segment",
    "batches_per_epoch",
    "check_settings",
    "make_example",
    "make_examples",
    "segment_dataset",
    "segment_seeds",
    "test_datasets",
    "train_dataset",
    "zoology_test_segments",
    "zoology_train_segments",
]
