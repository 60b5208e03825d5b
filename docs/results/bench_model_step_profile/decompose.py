"""One-off profile behind docs/results/bench_model_step.md: a mixer layer's forward+backward
beside its operator's alone at the layer's shapes (d_model 128, T 1024, batch 64), and one
ShortConv(4), timed round-robin (3 rounds after one warm-up) with memjax.benchmark.

    .venv/bin/python docs/results/bench_model_step_profile/decompose.py
"""
import statistics, jax, jax.numpy as jnp
from memjax.benchmark import compile_fn, time_interleaved
from memjax.config import mixer_config, to_dict
from memjax.layers import build_mixer, ShortConv
from memjax import ops
from memjax.ops.attention import softmax_attention

B, T, d = 64, 1024, 128
key = jax.random.key(0)
x = jax.random.normal(key, (B, T, d))
def n(*s): return jax.random.normal(jax.random.fold_in(key, len(s) + sum(s)), s)
def unit(a): return a / jnp.linalg.norm(a, axis=-1, keepdims=True)
entries = {}
def layer(name):
    m = build_mixer(d, to_dict(mixer_config(name)))
    p = jax.jit(lambda r: m.init(r, x[:1])["params"])(key)
    entries[f"{name} layer"] = (lambda p, x, m=m: jax.grad(lambda p, x: m.apply({"params": p}, x).sum(), (0, 1))(p, x), (p, x))
def op(label, f, *inputs):
    entries[label] = (lambda *a, f=f: jax.grad(lambda a: jnp.sum(f(*a)), 0)(a), inputs)
layer("attention"); op("softmax_attention op H1 K128", lambda q, k, v: softmax_attention(q, k, v), n(B, T, 1, 128), n(B, T, 1, 128), n(B, T, 1, 128))
layer("linear_attention"); op("linear_attention op H2 K64", lambda q, k, v: ops.linear_attention(q, k, v)[0], n(B, T, 2, 64), n(B, T, 2, 64), n(B, T, 2, 64))
layer("deltanet"); op("delta_rule op H2 K64", lambda q, k, v, b: ops.delta_rule(q, k, v, b)[0], unit(n(B, T, 2, 64)), unit(n(B, T, 2, 64)), n(B, T, 2, 64), jax.nn.sigmoid(n(B, T, 2)))
conv = ShortConv(4); cp = conv.init(key, x[:1])["params"]
entries["ShortConv(4) d128"] = (lambda p, x: jax.grad(lambda p, x: conv.apply({"params": p}, x).sum(), (0, 1))(p, x), (cp, x))
calls, names = [], []
for name, (f, a) in entries.items():
    c, s, temp = compile_fn(f, *a); calls.append((c, a, False)); names.append(name)
times = time_interleaved(calls, repeats=3, warmup=1)
for name, t in zip(names, times):
    print(f"{name:>32}: {statistics.median(t)*1e3:8.1f} ms  rounds " + " ".join(f"{v*1e3:.0f}" for v in t), flush=True)
