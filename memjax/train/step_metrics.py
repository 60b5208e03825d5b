"""Per-step train metrics kept on the device between log steps, copied to the host in one read.

The train loop never waits for a step's metrics: each jitted step writes its metrics into row
`count` of a device buffer and the host reads the whole buffer only when it logs, evaluates,
saves or stops (`read`). The buffer also tracks the first step whose loss is not finite, so
divergence is found on the device and reported with the step where it began.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class StepMetrics:
    values: dict  # metric name -> float32[capacity]: row i = the i-th step since the last read
    count: jax.Array  # int32 scalar: steps recorded since the last read
    first_bad: jax.Array  # int32 scalar: first step (1-based) with a non-finite loss; 0 = none

    @classmethod
    def empty(cls, names, capacity: int) -> "StepMetrics":
        return cls(values={name: jnp.zeros((capacity,), jnp.float32) for name in names},
                   count=jnp.zeros((), jnp.int32), first_bad=jnp.zeros((), jnp.int32))

    def record(self, metrics: dict, step) -> "StepMetrics":
        """Appends one step's scalar `metrics` (traced); `step` is that step's 1-based number."""
        values = {k: v.at[self.count].set(metrics[k].astype(jnp.float32))
                  for k, v in self.values.items()}
        bad = (self.first_bad == 0) & ~jnp.isfinite(metrics["loss"])
        return StepMetrics(values=values, count=self.count + 1,
                           first_bad=jnp.where(bad, step, self.first_bad))


def recording(train_step):
    """`(state, buffer, batch) -> (state, buffer)`: `train_step`, its metrics appended to buffer."""

    def step(state, buffer: StepMetrics, batch):
        state, metrics = train_step(state, batch)
        return state, buffer.record(metrics, state.step)

    return step


def read(buffer: StepMetrics) -> tuple[list[dict[str, float]], int]:
    """Host side: `(rows, first_bad)`: one dict of Python floats per recorded step, in order."""
    host = jax.device_get(buffer)
    count = int(host.count)
    if count > next(iter(host.values.values()), np.zeros(0)).shape[0]:
        raise RuntimeError(f"{count} steps recorded in a buffer of fewer rows")
    rows = [{k: float(v[i]) for k, v in host.values.items()} for i in range(count)]
    return rows, int(host.first_bad)
