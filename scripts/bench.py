"""Benchmarks the memory operators (each form, forward and forward+backward) or, with --models,
a full training step of the study models per mixer beside attention. JSON out.

    python scripts/bench.py --ops gated_delta_rule,linear_attention --T 1024,4096,16384,65536 \
        --out bench.json
    python scripts/bench.py --ops linear_scan,s4d,s5,selective_scan,ssd --T 1024,4096 \
        --out bench_ssm.json
    python scripts/bench.py --models all --d_model 128 --T 64,256,1024 --batch 64 \
        --out bench_model_step.json

--models (a comma list of mixers or presets, each optionally with options as
`name:key=value:...`, e.g. `mom:num_memories=4:top_k=2`, or `all`: the mixers of the studies;
`--models mom`: MoM at M = 1, 2, 4, 8 (top-2) beside Gated DeltaNet with 2M heads of the
same width, the single memory of the same total state) times one
jitted train step (forward, backward, AdamW update; the state donated, as in training) of the
2-layer study language model (`memjax.config.lm_config`: short convolution 4, no MLP, tied
embeddings, vocabulary --vocab) on a synthetic MQAR-like batch: random tokens, labels at T/16
positions per row (MQAR's query share), so the LM head costs what it costs in the studies. For
each (d_model, T, batch) in the product of --d_model, --T, --batch (or the triples in --shapes)
attention and every other mixer are compiled, then timed round-robin (one step of each per round,
--repeats rounds after --warmup untimed ones), so on a shared machine all run under the same load.
Each row has the median step time, compile time, tokens/s, compiled temporary memory and
`vs_attention` = its median / attention's median at the same shape (below 1: faster).

The attention-like families are shaped by --B, --H, --K, --V; the state-space scans by --B, --D
(channels; ssd splits them into --H heads) and --N (state per channel; S5's shared modes).
Every op runs each of its forms named in --impls (default: all of its XLA forms); `pallas` adds
the Pallas kernel of linear_attention(_head_decay), (gated_)delta_rule and ssd on the current
platform. On an accelerator, the kernel table of issue 16 is:

    python scripts/bench.py --ops linear_attention_head_decay,gated_delta_rule,ssd \
        --impls chunk,pallas --T 4096,16384,65536 --B 1 --H 8 --K 128 --V 128 --out bench.json

(then --B 8, --H 16, --K 64 --V 64 runs beside it).

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

import numpy as np

import kernels
from memjax import ops
from memjax.ops import dispatch
from memjax.benchmark import compile_fn, matmul_rate, time_compiled, time_interleaved


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One operator configuration: its inputs, its call, its forms and its flop count."""

    make_inputs: Callable  # (key, args, T) -> tuple of arrays
    call: Callable  # (inputs, impl, chunk_size, args) -> (o, final_state)
    flops: Callable  # (args, T) -> forward flops per token, summed over heads / channels
    flop_formula: str
    impls: tuple = ("reference", "chunk")  # the forms besides "auto"
    kernel: str | None = None  # its operator in the Pallas kernels registry (--impls pallas)


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
    return dict(flops=lambda a, T: flops(a.chunk_size, a.K, a.V) * a.H, flop_formula=f"H*({formula})")


LINEAR_FLOPS = _per_head(lambda C, K, V: 4 * C * K + 4 * K * V, "4*C*K + 4*K*V")
DELTA_FLOPS = _per_head(lambda C, K, V: 6 * C * K + 4 * C * V + 6 * K * V + C * C,
                        "6*C*K + 4*C*V + 6*K*V + C*C")
SCAN_IMPLS = ("reference", "scan", "chunk")


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


def _memory_spec(architecture, a):
    return ops.MemorySpec(architecture=architecture, memory_chunk=a.memory_chunk)


def _memory_inputs(architecture):
    """Titans-style inputs: unit q, k; learning rate, forgetting and momentum gates in (0, 1)."""
    def make(key, a, T):
        q, k, v = _qkv(key, a.B, T, a.H, a.K, a.V, normalise=True)
        gates = [jax.nn.sigmoid(_normal(jax.random.fold_in(key, i), a.B, T, a.H) + shift)
                 for i, shift in ((1, -2.0), (2, -4.0), (3, 2.0))]  # lr, decay, momentum
        params = ops.init_memory_params(jax.random.fold_in(key, 4), _memory_spec(architecture, a),
                                        a.H, a.K, a.V)
        return q, k, v, *gates, params
    return make


def _memory_call(architecture):
    def call(x, impl, C, a):
        *arrays, params = x
        o, state = ops.neural_memory(*arrays, spec=_memory_spec(architecture, a), params=params,
                                     impl=impl)
        return o, sum(w.sum() for w in state.weights.values())
    return call


def _memory_flops(architecture):
    """Per token and head: about 10 flops per memory weight (gradient at the base point, read,
    momentum and weight update), whatever the form."""
    def flops(a, T):
        spec = _memory_spec(architecture, a)
        return 10 * a.H * sum(o * i for o, i in ops.memory_weight_shapes(spec, a.K, a.V).values())
    return dict(flops=flops, flop_formula="10*H*(memory weights per head)")


CASES = {
    "linear_attention": OpCase(
        _heads(_qkv),
        lambda x, impl, C, a: ops.linear_attention(*x, impl=impl, chunk_size=C), **LINEAR_FLOPS,
        kernel="linear_attention"),
    "linear_attention_head_decay": OpCase(
        _heads(lambda key, B, T, H, K, V: (*_qkv(key, B, T, H, K, V), _log_decay(key, B, T, H))),
        lambda x, impl, C, a: ops.linear_attention(*x, impl=impl, chunk_size=C), **LINEAR_FLOPS,
        kernel="linear_attention"),
    "linear_attention_channel_decay": OpCase(
        _heads(lambda key, B, T, H, K, V: (*_qkv(key, B, T, H, K, V), _log_decay(key, B, T, H, K))),
        lambda x, impl, C, a: ops.linear_attention(*x, impl=impl, chunk_size=C), **LINEAR_FLOPS),
    "delta_rule": OpCase(
        _heads(lambda key, B, T, H, K, V: (*_qkv(key, B, T, H, K, V, True),
                                           jax.nn.sigmoid(_normal(key, B, T, H)))),
        lambda x, impl, C, a: ops.delta_rule(*x, impl=impl, chunk_size=C), **DELTA_FLOPS,
        kernel="delta_rule"),
    "gated_delta_rule": OpCase(
        _heads(lambda key, B, T, H, K, V: (*_qkv(key, B, T, H, K, V, True),
                                           jax.nn.sigmoid(_normal(key, B, T, H)),
                                           _log_decay(key, B, T, H))),
        lambda x, impl, C, a: ops.delta_rule(*x, impl=impl, chunk_size=C), **DELTA_FLOPS,
        kernel="delta_rule"),
    "generalized_delta_rule": OpCase(
        _heads(_rwkv7_inputs),
        lambda x, impl, C, a: ops.generalized_delta_rule(*x, impl=impl, chunk_size=C),
        **_per_head(lambda C, K, V: 10 * C * K + 6 * C * V + 8 * K * V + C * C,
                    "10*C*K + 6*C*V + 8*K*V + C*C")),
    # State-space scans: flops of the recurrence itself (not of each form's algorithm).
    "linear_scan": OpCase(
        _linear_scan_inputs, lambda x, impl, C, a: ops.linear_scan(*x, impl=impl, chunk_size=C),
        lambda a, T: 2 * a.D * a.N, "2*D*N (h = a h + b)", SCAN_IMPLS),
    "s4d": OpCase(
        _s4d_inputs, lambda x, impl, C, a: ops.s4d(*x, impl=impl),
        lambda a, T: 16 * a.D * a.N, "16*D*N (complex update and readout)", ("reference", "scan", "conv")),
    "s5": OpCase(
        _s5_inputs, lambda x, impl, C, a: ops.s5(*x, impl=impl, chunk_size=C),
        lambda a, T: 16 * a.D * a.N + 8 * a.N, "16*D*P + 8*P (complex B u, C x, update)", SCAN_IMPLS),
    "selective_scan": OpCase(
        _selective_inputs, lambda x, impl, C, a: ops.selective_scan(*x, impl=impl, chunk_size=C),
        lambda a, T: 6 * a.D * a.N, "6*D*N (decay, update, readout)", SCAN_IMPLS),
    "ssd": OpCase(
        _ssd_inputs, lambda x, impl, C, a: ops.ssd(*x, impl=impl, chunk_size=C),
        lambda a, T: 4 * a.D * a.N, "4*D*N (state update and readout)", kernel="ssd"),
    # Softmax attention: flops of the visible logits and weighted values (causal: (T + 1) / 2
    # keys per query on average; a window: at most --window).
    "softmax_attention": OpCase(
        _heads(_qkv), lambda x, impl, C, a: (ops.softmax_attention(*x, impl=impl, chunk_size=C), 0.0),
        lambda a, T: a.H * (a.K + a.V) * (T + 1), "H*(K + V)*(T + 1)"),
    "sliding_window_attention": OpCase(
        _heads(_qkv),
        lambda x, impl, C, a: (ops.softmax_attention(*x, window=a.window, impl=impl, chunk_size=C),
                               0.0),
        lambda a, T: 2 * a.H * (a.K + a.V) * min(a.window, T), "2*H*(K + V)*min(window, T)"),
    # Test-time memory (Titans defaults: gd with momentum and decay, window 1), --memory-chunk.
    "neural_memory_linear": OpCase(_memory_inputs("linear"), _memory_call("linear"),
                                   **_memory_flops("linear")),
    "neural_memory_mlp": OpCase(_memory_inputs("mlp"), _memory_call("mlp"), **_memory_flops("mlp")),
}


def _forward(case, impl, args):
    return lambda *x: case.call(x, impl, args.chunk_size, args)


def _forward_backward(case, impl, args):
    def loss(x):
        o, state = case.call(x, impl, args.chunk_size, args)
        return o.astype(jnp.float32).sum() + jnp.real(state).sum()

    return lambda *x: jax.value_and_grad(loss)(x)


def bench_one(name, impl, mode, T, args, matmul_gflops) -> dict:
    case = CASES[name]
    B, C = args.B, args.chunk_size
    inputs = case.make_inputs(jax.random.key(0), args, T)
    fn = (_forward if mode == "fwd" else _forward_backward)(case, impl, args)
    row = {"op": name, "impl": impl, "mode": mode, "T": T, "B": B, "chunk_size": C}
    if name == "sliding_window_attention":
        row["window"] = args.window
    if name.startswith("neural_memory"):
        row["memory_chunk"] = args.memory_chunk
    row |= {dim: getattr(args, dim) for dim in ("H", "K", "V", "D", "N")}
    compiled, compile_s, temp = compile_fn(fn, *inputs)
    row |= {"compile_s": compile_s, "temp_bytes": temp}
    if temp is not None and temp > args.memory_limit_gb * 2**30:
        return row | {"skipped": f"needs {temp / 2**30:.1f} GiB of temporaries"}
    repeats = args.repeats if T <= 16384 else max(3, args.repeats // 2)
    times = time_compiled(compiled, *inputs, repeats=repeats)
    median = statistics.median(times)
    flops = case.flops(args, T) * B * T * (1 if mode == "fwd" else 3)
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


# --- Model-level benchmark: one train step per mixer, beside attention -----------------------

# The mixers of the studies (experiments/zoology_mqar.py, experiments/ssm_recall.py).
STUDY_MIXERS = ("attention", "based", "deltanet", "gated_deltanet", "gla", "retnet",
                "linear_attention", "rwkv7", "mamba", "mamba2", "s4d", "s5")
BASELINE = "attention"
# Mixture of memories against the single Gated DeltaNet of the same total state (M memories of
# 2 heads: one memory of 2M heads of the same width, every token written to each), and against
# its plain self (the state of one memory). MoM's routed memories are heads of one delta-rule
# call, so MoM(M) does the recurrence work of gated_deltanet(2M heads); the difference is routing.
def mom_mixers(d_model: int) -> tuple[str, ...]:
    return ("gated_deltanet",) + tuple(
        spec for M in (1, 2, 4, 8) for spec in (
            f"mom:num_memories={M}:top_k={min(M, 2)}",
            f"gated_deltanet:num_heads={2 * M}:head_size={d_model // 2}"))


def init_params(model, rng, sample):
    """Parameters of `model` for inputs like `sample`: the one place the benchmark initialises."""
    return model.init(rng, sample)["params"]


def synthetic_batch(vocab: int, T: int, batch: int, seed: int = 0) -> dict:
    """A supervised batch shaped like MQAR's: random tokens, labels at max(1, T // 16) random
    positions per row (the query share), IGNORE_INDEX elsewhere; after `supervised_batch`."""
    from memjax.tasks.data import IGNORE_INDEX
    from memjax.train.step import supervised_batch

    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab, (batch, T))
    labels = np.full((batch, T), IGNORE_INDEX)
    count = max(1, T // 16)
    positions = np.argsort(rng.random((batch, T)), axis=1)[:, :count]
    np.put_along_axis(labels, positions, rng.integers(0, vocab, (batch, count)), axis=1)
    return supervised_batch({"inputs": inputs, "labels": labels})


def parse_mixer_spec(spec: str) -> tuple[str, dict]:
    """`"mom:num_memories=4:top_k=2"` -> `("mom", {"num_memories": 4, "top_k": 2})`; values are
    read as Python literals where they parse (ints, floats, True/False), else kept as text."""
    import ast

    name, *items = spec.split(":")
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"mixer spec {spec!r}: {item!r} is not key=value")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return name, options


def model_step(mixer: str, d_model: int, T: int, batch: int, args):
    """`(train_step, state, batch, num_params)` of the study LM with `mixer` (a mixer spec,
    `parse_mixer_spec`) at this shape."""
    from memjax.config import lm_config, to_dict, train_config
    from memjax.models import build_model
    from memjax.train.optim import build_optimizer
    from memjax.train.step import TrainState, make_train_step

    name, options = parse_mixer_spec(mixer)
    config = lm_config(args.vocab, d_model, name, num_layers=args.num_layers)
    unknown = sorted(set(options) - set(config.mixer or {}))
    if unknown:
        raise SystemExit(f"mixer spec {mixer!r}: unknown option(s) {unknown} of {name}")
    config.mixer.update(options)
    model = build_model(to_dict(config))
    optimizer = build_optimizer(train_config())
    data = jax.device_put(synthetic_batch(args.vocab, T, batch))
    init_rng, state_rng = jax.random.split(jax.random.key(0))
    params = jax.jit(lambda r: init_params(model, r, data["inputs"][:1]))(init_rng)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       rng=state_rng)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    return make_train_step(model, optimizer), state, data, num_params


def compile_model(mixer: str, d_model: int, T: int, batch: int, args):
    """`(row, call)`: the row's shape and compile fields, and `(compiled, args, carry)` to time
    (None where the compiled step needs more than --memory-limit-gb of temporaries)."""
    step, state, data, num_params = model_step(mixer, d_model, T, batch, args)
    row = {"mixer": mixer, "d_model": d_model, "T": T, "batch": batch, "vocab": args.vocab,
           "num_layers": args.num_layers, "num_params": num_params,
           "supervised_per_row": data["positions"].shape[1]}
    compiled, compile_s, temp = compile_fn(step, state, data, donate_argnums=(0,))
    row |= {"compile_s": compile_s, "temp_bytes": temp}
    if temp is not None and temp > args.memory_limit_gb * 2**30:
        return row | {"skipped": f"needs {temp / 2**30:.1f} GiB of temporaries"}, None
    return row, (compiled, (state, data), True)


def bench_shape(mixers, shape, args) -> list[dict]:
    """Every mixer's train step at one (d_model, T, batch), timed round-robin (`time_interleaved`)
    so that all of them, attention included, share the same background load."""
    compiled = [compile_model(mixer, *shape, args) for mixer in mixers]
    timed = [(row, call) for row, call in compiled if call is not None]
    times = time_interleaved([call for _, call in timed], repeats=args.repeats, warmup=args.warmup)
    for (row, _), row_times in zip(timed, times):
        median = statistics.median(row_times)
        row |= {"median_s": median, "times_s": row_times, "tokens_per_s": shape[1] * shape[2] / median}
    rows = [row for row, _ in compiled]
    baseline = rows[0].get("median_s")  # attention runs first
    for row in rows:
        if baseline and "median_s" in row:
            row["vs_attention"] = row["median_s"] / baseline
    return rows


def model_shapes(args) -> list[tuple[int, int, int]]:
    """(d_model, T, batch) triples: --shapes if given, else the product of the three lists."""
    if args.shapes:
        return [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    return [(d, T, b) for d in ints(args.d_model) for T in ints(args.T or "64,256,1024")
            for b in ints(args.batch)]


def shape_name(d_model, T, batch) -> str:
    return f"d{d_model} T{T} B{batch}"


def model_table(rows) -> str:
    """Mixers by shape: median step time in ms and its ratio to attention's at that shape."""
    shapes = list(dict.fromkeys((r["d_model"], r["T"], r["batch"]) for r in rows))
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    cells = {(r["mixer"], (r["d_model"], r["T"], r["batch"])): r for r in rows}
    lines = ["| mixer | " + " | ".join(shape_name(*s) for s in shapes) + " |",
             "|---|" + "---|" * len(shapes)]
    for mixer in mixers:
        out = []
        for shape in shapes:
            r = cells.get((mixer, shape))
            if r is None:
                out.append("")
            elif "skipped" in r:
                out.append("skipped")
            else:
                ratio = r.get("vs_attention")
                out.append(f"{r['median_s'] * 1e3:.1f} ms" + ("" if ratio is None else f" ({ratio:.2f}x)"))
        lines.append(f"| {mixer} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def run_models(args) -> list[dict]:
    from memjax.config import MIXER_PRESETS
    from memjax.layers import MIXERS

    def mixers_at(d_model):
        if args.models == "mom":
            mixers = mom_mixers(d_model)
        else:
            mixers = STUDY_MIXERS if args.models == "all" else tuple(args.models.split(","))
        return (BASELINE,) + tuple(m for m in mixers if m != BASELINE)

    names = {parse_mixer_spec(m)[0] for shape in model_shapes(args) for m in mixers_at(shape[0])}
    unknown = sorted(n for n in names if n not in MIXERS and n not in MIXER_PRESETS)
    if unknown:
        raise SystemExit(f"unknown mixer(s) {unknown}; known: {', '.join([*MIXERS.names(), *MIXER_PRESETS])}")
    rows = []
    for shape in model_shapes(args):
        mixers = mixers_at(shape[0])
        for row in bench_shape(mixers, shape, args):
            rows.append(row)
            ratio = f" ({row['vs_attention']:.2f}x attention)" if "vs_attention" in row else ""
            result = row.get("skipped") or f"{row['median_s'] * 1e3:.1f} ms{ratio}"
            print(f"{row['mixer']:>18} {shape_name(*shape):>16}: {result}, compile {row['compile_s']:.1f} s",
                  flush=True)
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="linear_attention,gated_delta_rule",
                   help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--impls", default="all",
                   help="comma-separated forms, or all (each op runs the listed forms it has)")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--T", default=None,
                   help="comma-separated sequence lengths (default: 1024,4096; --models: 64,256,1024)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--D", type=int, default=256, help="channels of the state-space scans")
    p.add_argument("--N", type=int, default=16, help="state per channel (S5: modes) of the scans")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--window", type=int, default=128, help="sliding_window_attention's window")
    p.add_argument("--memory-chunk", type=int, default=16,
                   help="the test-time memories' inner mini-batch (a model property: both forms)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-limit-gb", type=float, default=8.0)
    p.add_argument("--out", default=None, help="JSON output path (default: stdout only)")
    m = p.add_argument_group("model train step (--models)")
    m.add_argument("--models", default=None,
                   help=f"comma-separated mixers or presets, or all ({', '.join(STUDY_MIXERS)}); "
                        f"{BASELINE} always runs first as the baseline")
    m.add_argument("--d_model", default="64,128,256", help="comma-separated model widths")
    m.add_argument("--batch", default="64", help="comma-separated batch sizes")
    m.add_argument("--shapes", default=None,
                   help="comma-separated d_modelxTxbatch triples (e.g. 128x256x64), instead of the "
                        "product of --d_model, --T, --batch")
    m.add_argument("--vocab", type=int, default=8192)
    m.add_argument("--num_layers", type=int, default=2, help="blocks of the model (the studies: 2)")
    m.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    args = p.parse_args(argv)
    if args.models:
        return args
    unknown = [o for o in args.ops.split(",") if o not in CASES]
    if unknown:
        p.error(f"unknown op(s) {unknown}; known: {', '.join(CASES)}")
    return args


def _forms(case, impls: str) -> tuple:
    """The forms of ``case`` named in ``impls`` ("all": its XLA forms); "pallas" where the op
    has a kernel registered for this platform (on CPU: interpret mode, slow, for checks)."""
    if impls == "all":
        return case.impls
    named = impls.split(",")
    forms = tuple(i for i in named if i in case.impls)
    if "pallas" in named and case.kernel and kernels.lookup(case.kernel, dispatch.platform()):
        forms += ("pallas",)
    return forms


def main(argv=None):
    args = parse_args(argv)
    matmul = matmul_rate()
    print(f"float32 matmul rate: {matmul['gflops']:.1f} GFLOP/s ({matmul['best_shape']})", flush=True)
    if args.models:
        rows = run_models(args)
        table = model_table(rows)
    else:
        rows = run_ops(args, matmul)
        table = markdown(rows)
    report = {"machine": {"platform": jax.devices()[0].platform, "device": str(jax.devices()[0]),
                          "device_count": jax.device_count(), "processor": platform.processor(),
                          "jax": jax.__version__, "python": sys.version.split()[0]},
              "matmul": matmul, "args": vars(args), "results": rows}
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


def run_ops(args, matmul) -> list[dict]:
    rows = []
    for name in args.ops.split(","):
        for T in map(int, (args.T or "1024,4096").split(",")):
            for mode in args.modes.split(","):
                for impl in _forms(CASES[name], args.impls):
                    row = bench_one(name, impl, mode, T, args, matmul["gflops"])
                    rows.append(row)
                    print(markdown([row]).splitlines()[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
