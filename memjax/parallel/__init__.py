"""Parallelism beyond data parallelism: context (sequence) parallelism for the recurrent
operators (see ``memjax.parallel.context``)."""

from memjax.parallel.context import (context_parallel_delta_rule,
                                     context_parallel_linear_attention, context_parallel_ssd)

__all__ = [
    "context_parallel_delta_rule",
    "context_parallel_linear_attention",
    "context_parallel_ssd",
]
