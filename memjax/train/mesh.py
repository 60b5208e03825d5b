"""The device mesh: data parallelism over a `data` axis, parameters replicated."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def build_mesh(num_data: int) -> Mesh:
    """A 1-D mesh over the first `num_data` devices (`-1`: all of them)."""
    devices = jax.devices()
    if num_data == -1:
        num_data = len(devices)
    if not 1 <= num_data <= len(devices):
        raise ValueError(f"mesh.data = {num_data} but {len(devices)} device(s) are available")
    return Mesh(np.array(devices[:num_data]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))
