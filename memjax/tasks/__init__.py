"""Synthetic tasks as Grain datasets. Importing this package registers every task in TASKS.

One module per task family; each defines its settings, a pure `(seed, index) -> example`
generator, and a builder registered under `config.task.name`.
"""

from memjax.tasks import data, copying, digits, induction, mqar, mqar_variants, passkey, regression, state_tracking  # noqa: F401  (importing a task module registers its builder)
from memjax.tasks.registry import TASKS, TaskData  # noqa: F401
