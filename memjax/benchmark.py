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


def compile_fn(fn: Callable, *args, donate_argnums: tuple = ()):
    """Returns `(compiled, compile_seconds, temp_bytes)` for `jax.jit(fn)` on `args`.

    `temp_bytes` is the compiled executable's temporary buffer size (XLA memory analysis), the
    working memory beyond inputs and outputs; None where the backend does not report it.
    `donate_argnums` as in `jax.jit` (a train step donates its state).
    """
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    return compiled, seconds, temp


def time_compiled(compiled, *args, repeats: int = 5, warmup: int = 1,
                  carry: bool = False) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` calls, each waited for.

    `carry=True` is for a step `(state, *rest) -> (state, ...)` that donates its state: each call
    gets the state the previous call returned (the first argument is consumed).
    """
    return time_interleaved([(compiled, args, carry)], repeats=repeats, warmup=warmup)[0]


def time_interleaved(calls, repeats: int = 5, warmup: int = 1) -> list[list[float]]:
    """`time_compiled` for several functions at once, round-robin: one list of times per call.

    `calls`: `(compiled, args, carry)` triples. Each round times one call of every function, the
    order rotating by one each round, so on a machine shared with other jobs every function runs
    under the same background load and their ratios hold even while absolute times drift.
    """
    args = [a for _, a, _ in calls]

    def call(i):
        compiled, _, carry = calls[i]
        out = _block(compiled(*args[i]))
        if carry:
            args[i] = (out[0], *args[i][1:])

    for _ in range(warmup):
        for i in range(len(calls)):
            call(i)
    times = [[] for _ in calls]
    for r in range(repeats):
        for j in range(len(calls)):
            i = (r + j) % len(calls)
            start = time.perf_counter()
            call(i)
            times[i].append(time.perf_counter() - start)
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
