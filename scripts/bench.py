"""Benchmarks the memory operators: each form, forward and forward+backward, JSON out.

    python scripts/bench.py --ops gated_delta_rule,linear_attention --T 1024,4096,16384,65536 \
        --out bench.json
    python scripts/bench.py --ops linear_scan,s4d,s5,selective_scan,ssd --T 1024,4096 \
        --out bench_ssm.json

The attention-like families are shaped by --B, --H, --K, --V; the state-space scans by --B, --D
(channels; ssd splits them into --H heads) and --N (state per channel; S5's shared modes).
Every op runs each of its forms named in --impls (default: all of them).

For each (operator, form, mode, T) it reports the median wall time after warm-up, compile time,
tokens/s, GFLOP/s counted with the chunk algorithm's flop formula (stated per operator below;
forward+backward counts 3x forward), the ratio of that rate to this machine's float32 matmul
rate measured in the same run, and the compiled temporary memory. A form whose compiled
temporary memory exceeds --memory-limit-gb is skipped (the reference form's backward keeps one
state per token, so it does not fit at long T).
"""

import argparse
import dataclasses
import json
import platform
import statistics
import sys
from typing import Callable

import jax
import jax.numpy as jnp

from memjax import ops
from memjax.benchmark import compile_fn, matmul_rate, time_compiled


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One operator configuration: its inputs, its call, its forms and its flop count."""

    make_inputs: Callable  # (key, args, T) -> tuple of arrays
    call: Callable  # (inputs, impl, chunk_size) -> (o, final_state)
    flops: Callable  # (args) -> forward flops per token, summed over heads / channels
    flop_formula: str
    impls: tuple = ("reference", "chunk")  # the forms besides "auto"


def _normal(key, *shape):
    return jax.random.normal(key, shape, jnp.float32)


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _qkv(key, B, T, H, K, V, normalise=False):
    kq, kk, kv = jax.random.split(key, 3)
    q, k = _normal(kq, B, T, H, K), _normal(kk, B, T, H, K)
    if normalise:
        q, k = _unit(q), _unit(k)
    return q, k, _normal(kv, B, T, H, V)


def _log_decay(key, *shape):
    return jax.nn.log_sigmoid(_normal(key, *shape) + 4.0)  # mostly weak decay, as trained gates are


def _heads(make):
    """Inputs of the attention-like families, shaped by --B, --H, --K, --V."""
    return lambda key, a, T: make(key, a.B, T, a.H, a.K, a.V)


def _per_head(flops, formula):
    """A per-head, per-token chunk-algorithm flop count `flops(C, K, V)`, times --H."""
    return dict(flops=lambda a: flops(a.chunk_size, a.K, a.V) * a.H, flop_formula=f"H*({formula})")


LINEAR_FLOPS = _per_head(lambda C, K, V: 4 * C * K + 4 * K * V, "4*C*K + 4*K*V")
DELTA_FLOPS = _per_head(lambda C, K, V: 6 * C * K + 4 * C * V + 6 * K * V + C * C,
                        "6*C*K + 4*C*V + 6*K*V + C*C")
SCAN_IMPLS = ("reference", "associative", "chunk")


def _rwkv7_inputs(key, B, T, H, K, V):
    q, k, v = _qkv(key, B, T, H, K, V)
    kappa = _unit(_normal(jax.random.fold_in(key, 1), B, T, H, K))
    rate = jax.nn.sigmoid(_normal(jax.random.fold_in(key, 2), B, T, H, K))
    return q, k, v, _log_decay(key, B, T, H, K), -kappa, kappa * rate


# The state-space scans are shaped by --D (channels) and --N (state per channel; S5's P modes).
def _linear_scan_inputs(key, a, T):
    k1, k2 = jax.random.split(key)
    return jnp.exp(_log_decay(k1, a.B, T, a.D, a.N)), _normal(k2, a.B, T, a.D, a.N)


def _s4d_lin(D, N):
    """S4D-Lin modes `-1/2 + i pi n`, the same for every channel: `[D, N]` complex64."""
    modes = -0.5 + 1j * jnp.pi * jnp.arange(N)
    return jnp.broadcast_to(modes, (D, N)).astype(jnp.complex64)


def _complex_normal(key, *shape):
    k1, k2 = jax.random.split(key)
    return (_normal(k1, *shape) + 1j * _normal(k2, *shape)).astype(jnp.complex64) / jnp.sqrt(2.0)


def _log_dt(key, *shape):
    return jax.random.uniform(key, shape, jnp.float32, jnp.log(1e-3), jnp.log(1e-1))


def _s4d_inputs(key, a, T):
    ks = jax.random.split(key, 3)
    return (_normal(ks[0], a.B, T, a.D), _s4d_lin(a.D, a.N), jnp.ones((a.D, a.N), jnp.complex64),
            _complex_normal(ks[1], a.D, a.N), _log_dt(ks[2], a.D))


def _s5_inputs(key, a, T):
    ks = jax.random.split(key, 4)
    return (_normal(ks[0], a.B, T, a.D), _s4d_lin(1, a.N)[0], _complex_normal(ks[1], a.N, a.D),
            _complex_normal(ks[2], a.D, a.N), _log_dt(ks[3], a.N))


def _selective_inputs(key, a, T):
    ks = jax.random.split(key, 4)
    dt = jax.nn.softplus(_normal(ks[1], a.B, T, a.D) - 3.0)
    A = -jnp.broadcast_to(jnp.arange(1.0, a.N + 1), (a.D, a.N))
    return _normal(ks[0], a.B, T, a.D), dt, A, _normal(ks[2], a.B, T, a.N), _normal(ks[3], a.B, T, a.N)


def _ssd_inputs(key, a, T):
    if a.D % a.H:
        raise SystemExit(f"ssd needs --D ({a.D}) divisible by --H ({a.H})")
    ks = jax.random.split(key, 5)
    dt = jax.nn.softplus(_normal(ks[1], a.B, T, a.H) - 3.0)
    A = -jax.random.uniform(ks[4], (a.H,), jnp.float32, 1.0, 16.0)
    return (_normal(ks[0], a.B, T, a.H, a.D // a.H), dt, A, _normal(ks[2], a.B, T, a.N),
            _normal(ks[3], a.B, T, a.N))


CASES = {
    "linear_attention": OpCase(
        _heads(_qkv),
        lambda x, impl, C: ops.linear_attention(*x, impl=impl, chunk_size=C), **LINEAR_FLOPS),
    "linear_attention_head_decay": OpCase(
        _heads(lambda key, B, T, H, K, V: (*_qkv(key, B, T, H, K, V), _log_decay(key, B, T, H))),
        lambda x, impl, C: ops.linear_attention(*x, impl=impl, chunk_size=C), **LINEAR_FLOPS),
    "linear_attention_channel_decay": OpCase(
        _heads(lambda key, B, T, H, K, V: (*_qkv(key, B, T, H, K, V), _log_decay(key, B, T, H, K))),
        lambda x, impl, C: ops.linear_attention(*x, impl=impl, chunk_size=C), **LINEAR_FLOPS),
    "delta_rule": OpCase(
        _heads(lambda key, B, T, H, K, V: (*_qkv(key, B, T, H, K, V, True),
                                           jax.nn.sigmoid(_normal(key, B, T, H)))),
        lambda x, impl, C: ops.delta_rule(*x, impl=impl, chunk_size=C), **DELTA_FLOPS),
    "gated_delta_rule": OpCase(
        _heads(lambda key, B, T, H, K, V: (*_qkv(key, B, T, H, K, V, True),
                                           jax.nn.sigmoid(_normal(key, B, T, H)),
                                           _log_decay(key, B, T, H))),
        lambda x, impl, C: ops.delta_rule(*x, impl=impl, chunk_size=C), **DELTA_FLOPS),
    "generalized_delta_rule": OpCase(
        _heads(_rwkv7_inputs),
        lambda x, impl, C: ops.generalized_delta_rule(*x, impl=impl, chunk_size=C),
        **_per_head(lambda C, K, V: 10 * C * K + 6 * C * V + 8 * K * V + C * C,
                    "10*C*K + 6*C*V + 8*K*V + C*C")),
    # State-space scans: flops of the recurrence itself (not of each form's algorithm).
    "linear_scan": OpCase(
        _linear_scan_inputs, lambda x, impl, C: ops.linear_scan(*x, impl=impl, chunk_size=C),
        lambda a: 2 * a.D * a.N, "2*D*N (h = a h + b)", SCAN_IMPLS),
    "s4d": OpCase(
        _s4d_inputs, lambda x, impl, C: ops.s4d(*x, impl=impl),
        lambda a: 16 * a.D * a.N, "16*D*N (complex update and readout)", ("reference", "scan", "conv")),
    "s5": OpCase(
        _s5_inputs, lambda x, impl, C: ops.s5(*x, impl=impl, chunk_size=C),
        lambda a: 16 * a.D * a.N + 8 * a.N, "16*D*P + 8*P (complex B u, C x, update)", SCAN_IMPLS),
    "selective_scan": OpCase(
        _selective_inputs, lambda x, impl, C: ops.selective_scan(*x, impl=impl, chunk_size=C),
        lambda a: 6 * a.D * a.N, "6*D*N (decay, update, readout)", SCAN_IMPLS),
    "ssd": OpCase(
        _ssd_inputs, lambda x, impl, C: ops.ssd(*x, impl=impl, chunk_size=C),
        lambda a: 4 * a.D * a.N, "4*D*N (state update and readout)"),
}


def _forward(case, impl, C):
    return lambda *x: case.call(x, impl, C)


def _forward_backward(case, impl, C):
    def loss(x):
        o, state = case.call(x, impl, C)
        return o.astype(jnp.float32).sum() + jnp.real(state).sum()

    return lambda *x: jax.value_and_grad(loss)(x)


def bench_one(name, impl, mode, T, args, matmul_gflops) -> dict:
    case = CASES[name]
    B, C = args.B, args.chunk_size
    inputs = case.make_inputs(jax.random.key(0), args, T)
    fn = (_forward if mode == "fwd" else _forward_backward)(case, impl, C)
    row = {"op": name, "impl": impl, "mode": mode, "T": T, "B": B, "chunk_size": C}
    row |= {dim: getattr(args, dim) for dim in ("H", "K", "V", "D", "N")}
    compiled, compile_s, temp = compile_fn(fn, *inputs)
    row |= {"compile_s": compile_s, "temp_bytes": temp}
    if temp is not None and temp > args.memory_limit_gb * 2**30:
        return row | {"skipped": f"needs {temp / 2**30:.1f} GiB of temporaries"}
    repeats = args.repeats if T <= 16384 else max(3, args.repeats // 2)
    times = time_compiled(compiled, *inputs, repeats=repeats)
    median = statistics.median(times)
    flops = case.flops(args) * B * T * (1 if mode == "fwd" else 3)
    gflops = flops / median / 1e9
    return row | {"median_s": median, "times_s": times, "tokens_per_s": B * T / median,
                  "gflops": gflops, "matmul_ratio": gflops / matmul_gflops,
                  "flop_formula": case.flop_formula + (" (x3 for fwd+bwd)" if mode != "fwd" else "")}


def markdown(rows) -> str:
    lines = ["| op | impl | mode | T | median s | tokens/s | GFLOP/s | / matmul | compile s | temp MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        temp = "" if r.get("temp_bytes") is None else f"{r['temp_bytes'] / 2**20:.0f}"
        if "skipped" in r:
            lines.append(f"| {r['op']} | {r['impl']} | {r['mode']} | {r['T']} | skipped: {r['skipped']}"
                         f" | | | | {r['compile_s']:.1f} | {temp} |")
            continue
        lines.append(f"| {r['op']} | {r['impl']} | {r['mode']} | {r['T']} | {r['median_s']:.4f} | "
                     f"{r['tokens_per_s']:.0f} | {r['gflops']:.1f} | {r['matmul_ratio']:.2f} | "
                     f"{r['compile_s']:.1f} | {temp} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="linear_attention,gated_delta_rule",
                   help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--impls", default="all",
                   help="comma-separated forms, or all (each op runs the listed forms it has)")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--T", default="1024,4096", help="comma-separated sequence lengths")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--D", type=int, default=256, help="channels of the state-space scans")
    p.add_argument("--N", type=int, default=16, help="state per channel (S5: modes) of the scans")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-limit-gb", type=float, default=8.0)
    p.add_argument("--out", default=None, help="JSON output path (default: stdout only)")
    args = p.parse_args(argv)
    unknown = [o for o in args.ops.split(",") if o not in CASES]
    if unknown:
        p.error(f"unknown op(s) {unknown}; known: {', '.join(CASES)}")
    return args


def _forms(case, impls: str) -> tuple:
    return case.impls if impls == "all" else tuple(i for i in impls.split(",") if i in case.impls)


def main(argv=None):
    args = parse_args(argv)
    matmul = matmul_rate()
    print(f"float32 matmul rate: {matmul['gflops']:.1f} GFLOP/s ({matmul['best_shape']})", flush=True)
    rows = []
    for name in args.ops.split(","):
        for T in map(int, args.T.split(",")):
            for mode in args.modes.split(","):
                for impl in _forms(CASES[name], args.impls):
                    row = bench_one(name, impl, mode, T, args, matmul["gflops"])
                    rows.append(row)
                    print(markdown([row]).splitlines()[-1], flush=True)
    report = {"machine": {"platform": jax.devices()[0].platform, "device": str(jax.devices()[0]),
                          "device_count": jax.device_count(), "processor": platform.processor(),
                          "jax": jax.__version__, "python": sys.version.split()[0]},
              "matmul": matmul, "args": vars(args), "results": rows}
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
