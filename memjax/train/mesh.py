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

Several processes (multi-host, `memjax.train.distributed`): `jax.devices()` lists every
process's devices, process 0's first, so the batch axes split the global batch into one
contiguous block of rows per process (`process_rows`). Each process generates only that block
(`memjax.tasks.data.with_rows`) and hands it to JAX as its part of the global array
(`global_batch(block, sharding, rows=B)`); nothing crosses between processes.
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


def process_rows(sharding, rows: int) -> slice:
    """The rows `[start, stop)` of a `[rows, ...]` batch that this process's devices hold under
    `sharding` (a batch sharding: only the leading axis is split).

    One process: every row. P processes with equal shares of the batch axes (`build_mesh` over
    all devices): process p gets `[p * rows / P, (p + 1) * rows / P)`; a process whose devices
    are replicas along the batch (the `tensor` axis spanning processes) gets the same block as
    its replicas. Raises ValueError if the process's rows are not one contiguous block (a
    hand-made device order), which `global_batch` could not hand over as one array.
    """
    spans = sorted({index[0].indices(rows)[:2]
                    for index in sharding.addressable_devices_indices_map((rows,)).values()})
    start, stop = spans[0]
    for lo, hi in spans[1:]:
        if lo > stop:
            raise ValueError(f"process {jax.process_index()}'s devices hold rows {spans} of the "
                             f"batch, not one contiguous block; build the mesh with build_mesh")
        stop = max(stop, hi)
    return slice(start, stop)


def global_batch(batch: dict, sharding, rows: int | None = None) -> dict[str, jax.Array]:
    """A host batch as global arrays `{name: [B, ...]}` split over the batch axes by `sharding`.

    `rows=None`: `batch` holds all B rows (the same on every process); each process hands JAX
    only the rows its devices hold (`process_rows`). `rows=B`: `batch` holds only this process's
    block `process_rows(sharding, B)` of a B-row batch (a ValueError if its row count differs).
    Either way via `jax.make_array_from_process_local_data`, so nothing crosses between
    processes; with one process and all rows this is `jax.device_put(batch, sharding)`.
    """
    held = next(iter(batch.values())).shape[0]
    block = process_rows(sharding, held if rows is None else rows)
    if rows is not None and held != block.stop - block.start:
        raise ValueError(f"process {jax.process_index()} holds rows {block.start}:{block.stop} of "
                         f"the {rows}-row batch but was given {held} rows")
    return {name: jax.make_array_from_process_local_data(
                sharding, value if rows is not None else value[block],
                value.shape if rows is None else (rows, *value.shape[1:]))
            for name, value in batch.items()}


def check_covers_processes(mesh: Mesh):
    """Every process must hold devices of the mesh: a process outside it would have no share of
    the batch and nothing to compute. Raises ValueError naming `config.mesh`'s fix."""
    inside = {device.process_index for device in mesh.devices.flat}
    missing = sorted(set(range(jax.process_count())) - inside)
    if missing:
        sizes = " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())
        raise ValueError(f"the mesh ({sizes}: {mesh.devices.size} of {jax.device_count()} "
                         f"devices) has no device of process(es) {missing} of "
                         f"{jax.process_count()}; use every device, e.g. --config.mesh.data=-1")
