"""What every Pallas kernel in this package shares: the interpret-mode rule, tiling checks with
errors that name the constraint, time padding, poisoned outputs for tests, and sharding.

Interpret mode: a kernel runs in Pallas interpret mode exactly when its platform is ``"cpu"``
(the kernels registered for ``"cpu"`` are the TPU or GPU kernels interpreted, so tests on this
machine run the code that the accelerators lower). ``memjax.ops`` reaches them only through
``impl="pallas"``; ``impl="auto"`` never picks a kernel on CPU.

Poisoned outputs: inside ``with poisoned_outputs():`` every kernel called through
``pallas_call`` here gets its outputs pre-filled with NaN (aliased in, ``input_output_aliases``),
so a tile the kernel forgets to write stays NaN and fails any comparison. Outside, outputs are
uninitialised.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import export
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

__all__ = ["TRITON_CALL", "TilingError", "export_without_hardware", "interpret",
           "output_buffers", "pad_time", "pallas_call",
           "poisoned_outputs", "poisoning", "require_divisible", "shard_batch_and_heads"]

_POISON = [False]


class TilingError(ValueError):
    """A shape the kernel cannot tile; the message names the kernel, the dimension and the rule."""


def interpret(platform: str) -> bool:
    """Whether a kernel built for ``platform`` runs in Pallas interpret mode (CPU only)."""
    return platform == "cpu"


def require_divisible(kernel: str, name: str, value: int, multiple: int, why: str) -> None:
    """Raise a TilingError unless ``value % multiple == 0``.

    Example message: ``linear_attention (tpu): K = 40 must be a multiple of 8 (the sublane
    width of a float32 tile)``.
    """
    if value % multiple:
        raise TilingError(f"{kernel}: {name} = {value} must be a multiple of {multiple} ({why})")


def pad_time(x, multiple: int, axis: int = 1, value=0.0):
    """``x`` zero-padded (or ``value``-padded) at the end of ``axis`` to a multiple of
    ``multiple``. Zero keys/values/decays leave a linear recurrence's state unchanged, which is
    why padding at the end is exact for the state too (log-decay pads with 0: no decay)."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


@contextlib.contextmanager
def poisoned_outputs():
    """Within this context, kernels fill their outputs with NaN before writing (tests only)."""
    previous, _POISON[0] = _POISON[0], True
    try:
        yield
    finally:
        _POISON[0] = previous


def poisoning() -> bool:
    """Whether kernels being traced now should poison their outputs."""
    return _POISON[0]


def output_buffers(shapes):
    """For poisoning: NaN-filled arrays to alias to a pallas_call's outputs, or None when not
    poisoning. ``shapes``: a list of ``jax.ShapeDtypeStruct`` (the call's ``out_shape``)."""
    if not poisoning():
        return None
    return [jnp.full(s.shape, jnp.nan, s.dtype) for s in shapes]


def pallas_call(kernel, out_shape, *, in_specs, args, **kwargs):
    """``pl.pallas_call(kernel, ...)(*args)``, poisoning the outputs when ``poisoning()``.

    Poisoning: NaN buffers (``output_buffers``) are appended as extra inputs in memory
    space ANY (never copied into the kernel, which does not see them) and aliased to the outputs,
    so an output tile the kernel leaves unwritten stays NaN.
    """
    buffers = output_buffers(out_shape)
    if buffers is None:
        return pl.pallas_call(kernel, out_shape, in_specs=in_specs, **kwargs)(*args)
    n, extra = len(args), len(buffers)

    def kernel_without_buffers(*refs):
        return kernel(*refs[:n], *refs[n + extra:])

    raw = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel_without_buffers, out_shape, in_specs=[*in_specs, *[raw] * extra],
        input_output_aliases={n + i: i for i in range(extra)}, **kwargs,
    )(*args, *buffers)  # fmt: skip


def shard_batch_and_heads(fn, mesh, in_specs, out_specs, *, batch_axis=None, head_axis=None):
    """``fn`` under ``jax.shard_map`` on ``mesh``: every shard runs the kernel on its own batch
    and head slice (the kernels are independent over B and H, so no collective is needed).

    ``in_specs`` / ``out_specs``: per argument / output, a tuple naming the role of each axis
    (``"B"``, ``"H"`` or None), or None for an argument that is None or replicated, e.g.
    ``("B", None, "H", None)`` for ``[B, T, H, K]``. ``batch_axis`` and ``head_axis`` are mesh
    axis names (or tuples of them) that the B and H axes are split over (None: not split).
    The mesh's axes must be ``AxisType.Auto`` (``jax.make_mesh`` makes Explicit ones by default,
    with which shard_map requires inputs already sharded as the specs say).
    """
    roles = {"B": batch_axis, "H": head_axis}

    def spec(layout):
        if layout is None:
            return PartitionSpec()
        return PartitionSpec(*(roles.get(r) if r else None for r in layout))

    to_specs = lambda layouts: tuple(spec(l) for l in layouts)
    return jax.shard_map(fn, mesh=mesh, in_specs=to_specs(in_specs),
                         out_specs=to_specs(out_specs), check_vma=False)


# The custom call Pallas' Triton lowering emits; it has no export compatibility guarantee.
TRITON_CALL = "__gpu$xla.gpu.triton"
# The Triton lowering reads the target's compute capability from the device: an abstract H100.
_ABSTRACT_GPU = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100", num_cores=None, platform="cuda"))


def export_without_hardware(fn, args, platform: str):
    """``jax.export`` of ``jax.jit(fn)`` at ``args`` (``jax.ShapeDtypeStruct``s) for ``platform``
    ("tpu" or "cuda") on a machine without that hardware; returns the ``Exported``.

    This runs Pallas' lowering to Mosaic or Triton IR and its checks, not the Mosaic or Triton
    compilers (XLA runs those on the device). For "cuda" the lowering targets an abstract H100
    (without one it stops with "No supported GPU devices found") and the Triton custom call is
    allowed explicitly (``DisabledSafetyCheck``: it has no serialisation compatibility guarantee).
    """
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    target = jax.sharding.use_abstract_mesh(_ABSTRACT_GPU) if platform == "cuda" else (
        contextlib.nullcontext())
    with target:
        return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
