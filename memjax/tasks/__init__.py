"""Grain datasets for the synthetic tasks, and their metrics."""

from memjax.tasks.mqar import *  # noqa: F401,F403  (the public names are mqar.__all__)
from memjax.tasks.mqar import __all__
