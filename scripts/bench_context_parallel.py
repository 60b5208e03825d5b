"""Benchmarks context (sequence) parallelism (memjax.parallel) against the single-device ops.

    python scripts/bench_context_parallel.py --T 4096 --shards 1,2,4,8 --B 1 --H 4 --K 64 --V 64 \
        --out bench_context_parallel.json

For each operator (linear attention with a per-head decay, the gated delta rule, SSD with
N = K, P = V; every call from a random initial state, so the cross-shard correction is exercised)
and each shard count n (a 1-D mesh over the first n devices, T split over it): the forward error
versus the single-device op (max abs difference and that divided by max |reference|, for the
outputs and the final state) and the median wall time of the jitted forward and forward +
backward (gradients of a random linear functional of outputs and final state w.r.t. every input),
beside the single-device op's (row ``shards = 0``). Timing: ``memjax.benchmark`` (compile first,
then the median of --repeats calls after one warm-up call).

On a CPU the script simulates 8 devices (``--xla_force_host_platform_device_count=8`` is added to
XLA_FLAGS before JAX is imported, unless already set). Simulated devices share the machine's
cores, so on CPU the times show the overhead of the scheme, not a speedup.
"""

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402  (after the flags above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memjax import ops  # noqa: E402
from memjax.benchmark import compile_fn, time_compiled  # noqa: E402
from memjax.parallel import (context_parallel_delta_rule,  # noqa: E402
                             context_parallel_linear_attention, context_parallel_ssd)

OPS = {
    "linear_attention": (ops.linear_attention, context_parallel_linear_attention,
                         ("q", "k", "v", "g")),
    "gated_delta_rule": (ops.delta_rule, context_parallel_delta_rule,
                         ("q", "k", "v", "beta", "g")),
    "ssd": (ops.ssd, context_parallel_ssd, ("x", "dt", "A", "Bm", "Cm", "Dskip")),
}


def make_inputs(op, B, T, H, K, V, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    if op == "ssd":
        x = {"x": f(B, T, H, V), "dt": r.uniform(0.01, 0.1, (B, T, H)),
             "A": -r.uniform(0.5, 2.0, H), "Bm": f(B, T, K) / K**0.5, "Cm": f(B, T, K) / K**0.5,
             "Dskip": f(H), "initial_state": f(B, H, K, V)}
    else:
        k = f(B, T, H, K)
        x = {"q": f(B, T, H, K), "k": k / np.linalg.norm(k, axis=-1, keepdims=True),
             "v": f(B, T, H, V), "g": -r.uniform(0.0, 0.1, (B, T, H)),
             "initial_state": f(B, H, K, V)}
        if op == "gated_delta_rule":
            x["beta"] = r.uniform(0.1, 1.0, (B, T, H))
    return {name: jnp.asarray(a, jnp.float32) for name, a in x.items()}


def build(op, fn, inputs, chunk_size, impl):
    names = OPS[op][2]

    def forward(x):
        return fn(*[x.get(n) for n in names], initial_state=x["initial_state"],
                  chunk_size=chunk_size, impl=impl)

    def loss(x, w):
        o, final = forward(x)
        return jnp.sum(w[0] * o) + jnp.sum(w[1] * final)

    return forward, jax.grad(loss)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--shards", default="1,2,4,8")
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--V", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    shards = [int(s) for s in args.shards.split(",")]
    devices = jax.devices()
    if max(shards) > len(devices):
        parser.error(f"--shards {args.shards}: only {len(devices)} devices")

    rows = []
    for op in args.ops.split(","):
        single, parallel, _ = OPS[op]
        inputs = make_inputs(op, args.B, args.T, args.H, args.K, args.V)
        fwd, grad = build(op, single, inputs, args.chunk, args.impl)
        o_ref, final_ref = jax.jit(fwd)(inputs)
        r = np.random.default_rng(1)
        w = tuple(jnp.asarray(r.standard_normal(a.shape), jnp.float32) for a in (o_ref, final_ref))
        for n in [0, *shards]:  # 0: the single-device op
            if n == 0:
                f, gr = fwd, grad
            else:
                mesh = Mesh(np.array(devices[:n]), ("seq",))
                f, gr = build(op, lambda *a, **kw: parallel(*a, mesh=mesh, axis="seq", **kw),
                              inputs, args.chunk, args.impl)
            row = {"op": op, "shards": n, "T": args.T, "B": args.B, "H": args.H, "K": args.K,
                   "V": args.V, "chunk": args.chunk}
            o, final = jax.jit(f)(inputs)
            for name, got, ref in (("o", o, o_ref), ("final", final, final_ref)):
                err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)))
                row[f"{name}_max_abs_err"] = err
                row[f"{name}_rel_err"] = err / float(jnp.max(jnp.abs(ref)))
            for mode, fn, fn_args in (("fwd", f, (inputs,)), ("fwd_bwd", gr, (inputs, w))):
                compiled, compile_s, temp = compile_fn(fn, *fn_args)
                times = time_compiled(compiled, *fn_args, repeats=args.repeats)
                row[f"{mode}_median_s"] = statistics.median(times)
                row[f"{mode}_compile_s"] = compile_s
                row[f"{mode}_temp_bytes"] = temp
            rows.append(row)
            print(f"{op:17s} shards={n} o_err={row['o_max_abs_err']:.2e} "
                  f"(rel {row['o_rel_err']:.1e}) final_err={row['final_max_abs_err']:.2e} "
                  f"fwd={row['fwd_median_s'] * 1e3:.1f} ms "
                  f"fwd+bwd={row['fwd_bwd_median_s'] * 1e3:.1f} ms", flush=True)

    result = {"args": vars(args), "jax": jax.__version__, "backend": jax.default_backend(),
              "devices": len(devices), "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "rows": rows,
              "note": "shards = 0 is the single-device op; simulated CPU devices share the "
                      "machine's cores, so CPU times show overhead, not speedup"}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
