"""Memory operators: pure functions on arrays, one module per family (see docs/design.md)."""

from memjax.ops.delta_rule import delta_rule, delta_rule_step
from memjax.ops.diagonal_ssm import s4d, s4d_step, s5, s5_step
from memjax.ops.generalized_delta_rule import generalized_delta_rule, generalized_delta_rule_step
from memjax.ops.linear_attention import linear_attention, linear_attention_step
from memjax.ops.memory_nets import weight_shapes as memory_weight_shapes
from memjax.ops.neural_memory import (MemorySpec, MemoryState, init_memory_params,
                                      initial_memory_state, neural_memory, neural_memory_step)
from memjax.ops.attention import softmax_attention
from memjax.ops.scan import linear_scan, linear_scan_step
from memjax.ops.selective_scan import selective_scan, selective_scan_step
from memjax.ops.ssd import ssd, ssd_step

__all__ = [
    "delta_rule",
    "delta_rule_step",
    "generalized_delta_rule",
    "generalized_delta_rule_step",
    "linear_attention",
    "linear_attention_step",
    "linear_scan",
    "linear_scan_step",
    "MemorySpec",
    "MemoryState",
    "init_memory_params",
    "initial_memory_state",
    "memory_weight_shapes",
    "neural_memory",
    "neural_memory_step",
    "s4d",
    "s4d_step",
    "s5",
    "s5_step",
    "selective_scan",
    "selective_scan_step",
    "softmax_attention",
    "ssd",
    "ssd_step",
]
