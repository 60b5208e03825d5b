"""Pallas kernels for memjax operators, found by (operator, platform).

A kernel is registered for one operator of ``memjax.ops`` and one platform (``"cpu"``,
``"gpu"`` or ``"tpu"``)::

    @kernels.register("linear_attention", platform="tpu")
    def linear_attention_tpu(q, k, v, g=None, *, scale, initial_state, normalize, chunk_size):
        ...
        return o, final_state

``memjax.ops.<op>(..., impl="pallas")`` then calls it with the operator's own arguments (the
public signature without ``impl``, after validation, with ``scale`` resolved to its default) and
returns what it returns. ``impl="auto"`` only picks a kernel where the auto table in
``memjax/ops/dispatch.py`` says so, after a benchmark on that hardware
(see docs/design.md, Kernel slot).

Kernel modules register themselves when imported; ``lookup`` and ``registered`` import them on
first use (``KERNEL_MODULES``), so importing memjax does not import Pallas. This package never
imports memjax layers; ``memjax.ops.dispatch`` imports it.
"""

from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["PLATFORMS", "lookup", "register", "registered", "unregister"]

PLATFORMS = ("cpu", "gpu", "tpu")

# The modules that register kernels, imported on the first lookup.
KERNEL_MODULES = ("kernels.linear_attention", "kernels.delta_rule", "kernels.ssd")

_KERNELS: dict[tuple[str, str], Callable] = {}


def _check_platform(platform: str) -> None:
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")


def register(op: str, *, platform: str):
    """Decorator: make ``fn`` the ``impl="pallas"`` form of ``op`` on ``platform``.

    Registering a second kernel for the same (op, platform) is an error (unregister first).
    """
    _check_platform(platform)

    def decorate(fn: Callable) -> Callable:
        if (op, platform) in _KERNELS:
            raise ValueError(f"a kernel for {op!r} on {platform!r} is already registered")
        _KERNELS[(op, platform)] = fn
        return fn

    return decorate


def unregister(op: str, *, platform: str) -> None:
    """Remove the kernel of ``op`` on ``platform`` (KeyError if there is none)."""
    del _KERNELS[(op, platform)]


def _load_kernel_modules() -> None:
    for module in KERNEL_MODULES:
        importlib.import_module(module)  # cached after the first call


def lookup(op: str, platform: str) -> Callable | None:
    """The kernel registered for ``op`` on ``platform``, or None."""
    _load_kernel_modules()
    return _KERNELS.get((op, platform))


def registered() -> list[tuple[str, str]]:
    """Every registered (op, platform), sorted."""
    _load_kernel_modules()
    return sorted(_KERNELS)
