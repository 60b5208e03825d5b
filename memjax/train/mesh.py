"""The device mesh: named axes `data`, `fsdp` and `tensor`, sized by `config.mesh`.

    mesh = build_mesh(config.mesh)          # or build_mesh({"data": 2, "fsdp": 4})

- `data`: data parallelism; the batch is split over it, the parameters are not.
- `fsdp`: fully sharded data parallelism; the batch is split over it too, and the large weights
  (and their optimizer state) are split over it as well (`memjax.train.sharding`).
- `tensor`: tensor parallelism; the batch is replicated over it and the heads of the mixers'
  projections are split over it (`memjax.train.sharding`).

`config.mesh.<axis>` is the size of each axis (default 1, so an old config with only `data`
keeps its meaning); exactly one may be -1: it takes the devices the others leave
(`jax.device_count()` divided by their product). The mesh uses the first `data * fsdp * tensor`
devices (in `jax.devices()` order); their product must not exceed the device count, and with a
-1 it must divide it. Anything else is a `ValueError` naming the sizes.
"""

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
# The batch (leading) axis of every batch and activation is split over these axes.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def mesh_shape(sizes, num_devices: int) -> dict[str, int]:
    """`{"data": d, "fsdp": f, "tensor": t}` from `config.mesh` (or an int: the `data` size).

    Missing axes are 1; one -1 fills the devices the others leave. Raises ValueError for an
    unknown axis, a size below 1 (other than one -1), two -1s, or a product the devices cannot
    hold (more than `num_devices`, or, with a -1, not dividing it).
    """
    if not isinstance(sizes, Mapping) and not hasattr(sizes, "items"):
        sizes = {DATA_AXIS: sizes}
    sizes = dict(sizes.items())
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown} in config.mesh; "
                         f"known: {', '.join(MESH_AXES)}")
    shape = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    described = ", ".join(f"mesh.{a} = {s}" for a, s in shape.items())
    for axis, size in shape.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{axis} = {size!r}: each mesh axis is an int >= 1, or -1 "
                             "(the devices the other axes leave)")
    fill = [axis for axis, size in shape.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"{described}: at most one mesh axis may be -1, got {len(fill)} "
                         f"({', '.join('mesh.' + a for a in fill)})")
    fixed = math.prod(size for size in shape.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"{described}: the other axes' product {fixed} does not divide the "
                             f"{num_devices} device(s), so mesh.{fill[0]} = -1 cannot fill them")
        shape[fill[0]] = num_devices // fixed
    elif fixed > num_devices:
        raise ValueError(f"{described}: the mesh needs {fixed} devices (their product) but "
                         f"{num_devices} device(s) are available")
    return shape


def build_mesh(sizes, devices=None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over the first `data * fsdp * tensor` of `devices`
    (default `jax.devices()`); `sizes` as for `mesh_shape` (an int means `{"data": sizes}`)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    used = math.prod(shape.values())
    grid = np.array(devices[:used], dtype=object).reshape(tuple(shape.values()))
    return Mesh(grid, MESH_AXES)


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the `BATCH_AXES` sizes."""
    return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh) -> P:
    """Leading (batch) axis split over the batch axes of `mesh` that it has, the rest replicated."""
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.shape)
    return P(axes if axes else None)


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data` and `fsdp`, the rest replicated."""
    return NamedSharding(mesh, batch_spec(mesh))
