"""Per-device parameter + optimizer-state memory of a 2-layer gated_deltanet LM under FSDP.

    python scripts/sharding_memory.py [--d_model 256] [--vocab 8192] [--mixer gated_deltanet]

Runs on the host's CPU with 8 simulated devices (set before JAX starts). For each FSDP size
(1, 2, 4, 8) the train state is initialised straight into its shardings
(`memjax.train.sharding.init_sharded`, AdamW as configured by default) and the bytes of the
parameter and optimizer-state shards each device holds are summed (the largest device is shown;
all hold about the same). The last column is the compiled train step's temporary memory per
device (`memory_analysis()`, activations included, batch 8 x T 64 split over fsdp).
"""

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from memjax.config import lm_config, to_dict, train_config  # noqa: E402
from memjax.models import build_model  # noqa: E402
from memjax.train import sharding  # noqa: E402
from memjax.train.mesh import batch_sharded, build_mesh  # noqa: E402
from memjax.train.optim import build_optimizer  # noqa: E402
from memjax.train.step import TrainState, make_train_step, supervised_batch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--mixer", default="gated_deltanet")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--no_step", action="store_true", help="skip compiling the train step")
    args = parser.parse_args()

    model = build_model(to_dict(lm_config(args.vocab, args.d_model, args.mixer, 2)))
    optimizer = build_optimizer(train_config())
    train_step = make_train_step(model, optimizer)

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        params = model.init(init_rng, jnp.zeros((1, args.seq_len), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=state_rng)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (8, args.seq_len))
    batch = supervised_batch({"inputs": tokens, "labels": tokens})

    print(f"{args.mixer} LM, 2 layers, d_model {args.d_model}, vocab {args.vocab}, AdamW "
          f"(params + mu + nu), float32")
    header = f"{'fsdp':>4} {'params MiB':>11} {'opt MiB':>9} {'total MiB':>10} {'vs fsdp 1':>9}"
    header += "" if args.no_step else f" {'step temp MiB':>13}"
    print(header)
    first = None
    for fsdp in (1, 2, 4, 8):
        mesh = build_mesh({"fsdp": fsdp})
        state, shardings = sharding.init_sharded(init, jax.random.key(0), mesh)
        params = max(sharding.bytes_per_device(state.params).values())
        opt = max(sharding.bytes_per_device(state.opt_state).values())
        first = first or params + opt
        line = (f"{fsdp:>4} {params / 2**20:>11.3f} {opt / 2**20:>9.3f} "
                f"{(params + opt) / 2**20:>10.3f} {(params + opt) / first:>9.3f}")
        if not args.no_step:
            step = sharding.jit_train_step(train_step, shardings, mesh, donate=False)
            placed = jax.device_put(batch, batch_sharded(mesh))
            analysis = step.lower(state, placed).compile().memory_analysis()
            temp = getattr(analysis, "temp_size_in_bytes", float("nan"))
            line += f" {temp / 2**20:>13.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
