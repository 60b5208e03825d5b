"""One-off profile behind docs/results/bench_model_step.md: each mixer layer's forward+backward
(grad of sum(mixer(x)) in params and x) at one shape, timed round-robin with
memjax.benchmark.time_interleaved, the first entry as the reference. Mixer options after a colon.

    .venv/bin/python docs/results/bench_model_step_profile/mixer_share.py 128x1024x64 \
        "attention;gla;gla:chunk_size=16;mamba2:head_dim=64" 2     # d x T x B, mixers, rounds
"""
import sys, statistics, json
import jax, jax.numpy as jnp
from memjax.benchmark import compile_fn, time_interleaved
from memjax.config import mixer_config, to_dict
from memjax.layers import build_mixer

d, T, B = map(int, sys.argv[1].split("x"))
specs = sys.argv[2].split(";")  # name[:opt=val,opt=val]
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
x = jax.random.normal(jax.random.key(0), (B, T, d), jnp.float32)
calls, names = [], []
for spec in specs:
    name, _, opts = spec.partition(":")
    options = to_dict(mixer_config(name))
    for kv in filter(None, opts.split(",")):
        k, v = kv.split("=")
        options[k] = type(options[k])(v) if not isinstance(options[k], bool) else v == "True"
    layer = build_mixer(d, options)
    params = jax.jit(lambda r: layer.init(r, x[:1])["params"])(jax.random.key(1))
    def fwdbwd(p, x, layer=layer):
        return jax.grad(lambda p, x: layer.apply({"params": p}, x).sum(), argnums=(0, 1))(p, x)
    compiled, cs, temp = compile_fn(fwdbwd, params, x)
    calls.append((compiled, (params, x), False)); names.append(spec)
    print(f"compiled {spec}: {cs:.1f} s, temp {temp/2**20:.0f} MiB", flush=True)
times = time_interleaved(calls, repeats=repeats, warmup=1)
base = statistics.median(times[0])
for n, t in zip(names, times):
    m = statistics.median(t)
    print(f"{n:>45} d{d} T{T} B{B}: layer fwd+bwd {m*1e3:8.1f} ms  ({m/base:.2f}x first)", flush=True)
