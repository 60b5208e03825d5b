"""Compile time of a jitted loss + grad with and without `model.scan_layers`, and the compiled
temporary memory under each `model.remat` policy (memjax.models.lm).

    python scripts/bench_scan_layers.py compile --layers 2,4,8,16 --mixer gated_deltanet
    python scripts/bench_scan_layers.py memory --layers 4 --seq-len 256

One run per cell (compile time, not run time: `jit(...).lower(...).compile()`).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from memjax.models import build_model
from memjax.models.lm import REMAT_POLICIES


def grad_fn(model):
    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)
                        - jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0])
    return jax.jit(jax.value_and_grad(loss))


def compiled(args, num_layers, scan, remat="none"):
    model = build_model(dict(name="lm", vocab_size=args.vocab, d_model=args.d_model,
                             num_layers=num_layers, mixer={"name": args.mixer},
                             scan_layers=scan, remat=remat))
    tokens = jnp.zeros((args.batch, args.seq_len), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    start = time.perf_counter()
    lowered = grad_fn(model).lower(params, tokens)
    traced = time.perf_counter()
    executable = lowered.compile()
    done = time.perf_counter()
    return traced - start, done - traced, executable


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["compile", "memory"])
    parser.add_argument("--layers", default="2,4,8,16")
    parser.add_argument("--mixer", default="gated_deltanet")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32)
    args = parser.parse_args()
    print(f"{jax.devices()[0].platform}, mixer {args.mixer}, d_model {args.d_model}, "
          f"T {args.seq_len}, B {args.batch}")
    layers = [int(n) for n in args.layers.split(",")]
    if args.what == "compile":
        print("| layers | loop trace s | loop compile s | scan trace s | scan compile s |")
        print("|---|---|---|---|---|")
        for n in layers:
            loop = compiled(args, n, False)[:2]
            scan = compiled(args, n, True)[:2]
            print(f"| {n} | {loop[0]:.2f} | {loop[1]:.2f} | {scan[0]:.2f} | {scan[1]:.2f} |",
                  flush=True)
    else:
        print("| layers | remat | loop temp MiB | scan temp MiB |")
        print("|---|---|---|---|")
        for n in layers:
            for remat in REMAT_POLICIES:
                mib = [compiled(args, n, scan, remat)[2].memory_analysis().temp_size_in_bytes
                       / 2**20 for scan in (False, True)]
                print(f"| {n} | {remat} | {mib[0]:.2f} | {mib[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
