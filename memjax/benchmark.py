"""Timing utilities for `scripts/bench.py`: compile separately, median of runs, memory, GFLOP/s.

Speed claims are ratios measured in one run: every result carries the ratio of its GFLOP/s to this
machine's own float32 matmul rate, measured by `matmul_rate` in the same process.
"""

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def _block(tree):
    return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def compile_fn(fn: Callable, *args):
    """Returns `(compiled, compile_seconds, temp_bytes)` for `jax.jit(fn)` on `args`.

    `temp_bytes` is the compiled executable's temporary buffer size (XLA memory analysis), the
    working memory beyond inputs and outputs; None where the backend does not report it.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    return compiled, seconds, temp


def time_compiled(compiled, *args, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` calls, each waited for."""
    for _ in range(warmup):
        _block(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(sizes=(1024, 2048), batched=((8, 512),), repeats: int = 5) -> dict:
    """This machine's float32 matmul rate: the best median GFLOP/s over square and batched shapes."""
    rates = {}
    key = jax.random.key(0)
    shapes = [((n, n), (n, n)) for n in sizes] + [((b, n, n), (b, n, n)) for b, n in batched]
    for a_shape, b_shape in shapes:
        a = jax.random.normal(key, a_shape, jnp.float32)
        b = jax.random.normal(key, b_shape, jnp.float32)
        compiled, _, _ = compile_fn(jnp.matmul, a, b)
        median = statistics.median(time_compiled(compiled, a, b, repeats=repeats))
        n = a_shape[-1]
        batch = a_shape[0] if len(a_shape) == 3 else 1
        rates["x".join(map(str, a_shape))] = 2 * batch * n**3 / median / 1e9
    best = max(rates, key=rates.get)
    return {"gflops": rates[best], "best_shape": best, "all_gflops": rates}
