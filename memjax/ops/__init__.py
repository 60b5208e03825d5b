"""Memory operators: pure functions on arrays, one module per family (see DESIGN.md)."""

from memjax.ops.linear_attention import linear_attention, linear_attention_step

__all__ = ["linear_attention", "linear_attention_step"]
