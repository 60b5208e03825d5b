"""How every operator in memjax.ops picks its form: one vocabulary, one auto table, one tuning.

Forms (the ``impl`` argument of every operator):

- ``"reference"``: token-by-token ``lax.scan``, the source of truth.
- ``"chunk"``: chunkwise-parallel form in XLA.
- ``"scan"``: associative (parallel prefix) scan, ``lax.associative_scan``.
- ``"conv"``: FFT convolution (linear time-invariant systems only).
- ``"pallas"``: a kernel registered in the top-level ``kernels`` package for this operator and
  the current platform (``kernels.register(op, platform=...)``); an error naming what exists
  when there is none.
- ``"auto"``: the form ``AUTO`` names for the current platform.

``AUTO`` cites, per entry, the benchmark under docs/results that justifies it (the table and the
figures are in docs/results/op_dispatch.md). ``TUNING`` holds the block and group sizes of the
chunk forms per platform; none of them changes results beyond float rounding.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

import kernels

__all__ = ["AUTO", "FORMS", "TUNING", "kernel", "platform", "resolve", "tuning"]

# The XLA forms each operator implements (every operator also accepts "auto" and "pallas").
FORMS: dict[str, tuple[str, ...]] = {
    "linear_attention": ("reference", "chunk"),
    "delta_rule": ("reference", "chunk"),
    "generalized_delta_rule": ("reference", "chunk"),
    "ssd": ("reference", "chunk"),
    "selective_scan": ("reference", "scan", "chunk"),
    "linear_scan": ("reference", "scan", "chunk"),
    "s4d": ("reference", "scan", "conv"),
    "s5": ("reference", "scan", "chunk"),
    "softmax_attention": ("reference", "chunk"),
    "neural_memory": ("reference", "chunk"),
}


class Choice(NamedTuple):
    """What ``impl="auto"`` runs, and the evidence for it."""

    form: str
    evidence: str  # a file under docs/results, or why there is none


_SSM = "docs/results/bench_ssm_scans.json, docs/results/bench_ssm_scans_batch16.json"
_NO_ACCELERATOR = "unmeasured (no accelerator benchmark yet): the parallel form"

AUTO: dict[str, dict[str, Choice]] = {
    "cpu": {
        "linear_attention": Choice("chunk", "docs/results/bench_linear_attention.json, "
                                            "docs/results/bench_linear_attention_channel_decay.json"),
        "delta_rule": Choice("chunk", "docs/results/bench_delta_rule.json"),
        "generalized_delta_rule": Choice("chunk", "docs/results/bench_generalized_delta_rule.json"),
        "ssd": Choice("chunk", _SSM),
        "selective_scan": Choice("reference", _SSM),
        "linear_scan": Choice("reference", _SSM),
        "s4d": Choice("conv", "docs/results/bench_ssm_scans_batch16.json"),
        "s5": Choice("scan", "docs/results/bench_ssm_scans_batch16.json"),
        "softmax_attention": Choice("reference", "docs/results/bench_softmax_attention.json"),
        "neural_memory": Choice("chunk", "docs/results/bench_neural_memory.json"),
    },
}
# Accelerators: the chunk forms and the batch-measured CPU choices carry over; the elementwise
# scans that are sequential on CPU take their parallel form (what Mamba itself uses there).
AUTO["gpu"] = {
    **{op: Choice(c.form, f"unmeasured on gpu; as on cpu ({c.evidence})")
       for op, c in AUTO["cpu"].items()},
    "selective_scan": Choice("scan", _NO_ACCELERATOR),
    "linear_scan": Choice("scan", _NO_ACCELERATOR),
}
AUTO["tpu"] = {op: Choice(c.form, c.evidence.replace("on gpu", "on tpu"))
               for op, c in AUTO["gpu"].items()}

# Chunk-form tuning, measured on a 2-core AVX-512 CPU (B=1, H=8, K=V=128; the benchmark files
# above). linear_attention: tokens per step of the outer scan over blocks of chunks (its
# operands stay in cache), the most chunks per step (the state recurrence inside a step is
# unrolled), the longest sub-chunk of the per-channel intra-chunk scores. delta_rule: tokens per
# rematerialised group of chunks. generalized_delta_rule: one chunk per step was fastest forward
# and forward + backward for C = 16 ... 128; C = 16 takes two so that the saved states (one per
# step) stay at most one per 32 tokens.
_CPU_TUNING = {
    "linear_attention": {"block_tokens": 256, "max_block_chunks": 8, "sub_chunk": 16},
    "delta_rule": {"group_tokens": 512},
    "generalized_delta_rule": {"block_tokens": 32, "max_block_chunks": 32},
}
TUNING: dict[str, dict[str, dict[str, int]]] = {
    "cpu": _CPU_TUNING,
    "gpu": _CPU_TUNING,  # unmeasured: the CPU values
    "tpu": _CPU_TUNING,  # unmeasured: the CPU values
}


def platform() -> str:
    """The default JAX backend as ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm") else backend


def _forms(op: str) -> tuple[str, ...]:
    if op not in FORMS:
        raise ValueError(f"unknown operator {op!r}; operators: {tuple(FORMS)}")
    return FORMS[op]


def resolve(op: str, impl: str, on: str | None = None) -> str:
    """The form ``op`` runs for ``impl`` on platform ``on`` (default: the current one).

    Returns one of ``FORMS[op]`` or ``"pallas"``. Raises a ValueError listing the valid names for
    an unknown ``impl``, and one naming the operator, the platform and what exists when
    ``impl="pallas"`` has no registered kernel.
    """
    forms = _forms(op)
    on = on or platform()
    if on not in AUTO:
        raise ValueError(f"no dispatch table for platform {on!r}; platforms: {tuple(AUTO)}")
    if impl == "auto":
        return AUTO[on][op].form
    if impl == "pallas":
        kernel(op, on)  # raises when none is registered
        return impl
    if impl not in forms:
        raise ValueError(f"impl must be one of {('auto', *forms, 'pallas')}, got {impl!r}")
    return impl


def kernel(op: str, on: str | None = None) -> Callable:
    """The Pallas kernel registered for ``op`` on platform ``on`` (a clear error if none)."""
    on = on or platform()
    fn = kernels.lookup(op, on)
    if fn is None:
        raise ValueError(
            f"impl='pallas': no kernel is registered for {op!r} on platform {on!r} "
            f"(registered kernels: {kernels.registered() or 'none'}; XLA forms of {op}: "
            f"{_forms(op)})"
        )
    return fn


def tuning(op: str, on: str | None = None) -> dict[str, int]:
    """The tuning constants of ``op``'s chunk form on platform ``on`` (default: the current one)."""
    return TUNING[on or platform()][op]
