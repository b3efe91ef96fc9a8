"""Meshes, shardings, multi-host start-up and moving host batches onto devices."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
#: Both mesh axes: a batch is split over all of them.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp)`` mesh over all (or the first ``num_devices``) devices.

    ``fsdp``: how many devices share (shard) each parameter and optimizer state (ZeRO-3 style,
    :func:`fsdp_sharding`); ``fsdp=1`` replicates them (plain data parallelism). The batch is split
    over both axes.
    """
    n = num_devices or jax.device_count()
    if fsdp < 1 or n % fsdp:
        fits = ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)
        raise ValueError(f"train.fsdp={fsdp} must divide the number of devices ({n}): use one of {fits}")
    return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=jax.devices()[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of what every device holds whole (scalars, the EMA class embeddings, the RNG)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: the leading axis split over every device (``data`` x ``fsdp``)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (all devices of the mesh)."""
    return mesh.shape[DATA_AXIS] * mesh.shape.get(FSDP_AXIS, 1)


def fsdp_spec(shape: tuple[int, ...], n: int, min_size: int = 2**12) -> P:
    """The ZeRO-3 rule for one array: split its largest axis divisible by ``n`` over ``fsdp``; else replicate.

    Arrays of fewer than ``min_size`` elements (biases, norms, scalars) stay whole: sharding them
    saves nothing and costs a collective each.
    """
    if n <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            return P(*([None] * axis + [FSDP_AXIS]))
    return P()


def fsdp_sharding(tree: Any, mesh: Mesh, min_size: int = 2**12) -> Any:
    """Shardings of a tree of arrays (or shapes): each leaf by :func:`fsdp_spec` over the mesh's ``fsdp`` axis."""
    n = mesh.shape.get(FSDP_AXIS, 1)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), n, min_size)), tree)


#: Fields of a train state that FSDP shards (when present): everything else is replicated.
FSDP_FIELDS = ("params", "opt_state", "teacher")


def state_sharding(abstract_state: Any, mesh: Mesh, min_size: int = 2**12) -> Any:
    """Shardings of a train state (a ``flax.struct`` dataclass of arrays or shapes), same structure.

    The fields in :data:`FSDP_FIELDS` (parameters, optimizer state, a DINO teacher) by
    :func:`fsdp_sharding`; every other field (step, rng, BN statistics, EMA embeddings, ...)
    replicated. With ``fsdp = 1`` all is replicated: plain data parallelism.
    """
    rep = replicated(mesh)
    return abstract_state.replace(**{
        f.name: (fsdp_sharding(getattr(abstract_state, f.name), mesh, min_size) if f.name in FSDP_FIELDS
                 else jax.tree_util.tree_map(lambda _: rep, getattr(abstract_state, f.name)))
        for f in dataclasses.fields(abstract_state)})


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` s of ``shapes`` carrying ``shardings`` (an abstract state to restore into)."""
    return jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)


def to_host(tree: Any) -> Any:
    """NumPy copy of a tree of ``jax.Array`` s on every process, gathering shards other processes hold (FSDP)."""
    if all(getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False)
           for x in jax.tree_util.tree_leaves(tree)):
        return jax.device_get(tree)
    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def shardings_of(tree: Any) -> Any:
    """The sharding of every ``jax.Array`` of a tree (to compile a step for the state as it is placed)."""
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def bytes_per_device(tree: Any) -> dict[str, int]:
    """Bytes each (addressable) device holds of a tree, read from the leaves' shardings: FSDP's saving.

    Leaves: ``jax.Array`` s (their shards) or ``jax.ShapeDtypeStruct`` s carrying a sharding (the
    shard shape each device would hold, so a model too big to allocate is measured all the same).
    """
    out: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            sizes = [(shard.device, int(shard.data.nbytes)) for shard in leaf.addressable_shards]
        else:
            shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
            sizes = [(d, shard) for d in leaf.sharding.addressable_devices]
        for device, n in sizes:
            out[str(device)] = out.get(str(device), 0) + n
    return out


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """A global batch must split evenly over the data axis and the processes."""
    n = data_parallel_size(mesh)
    if global_batch % n or global_batch % jax.process_count():
        raise ValueError(
            f"global batch size {global_batch} must be divisible by the {n} devices "
            f"and the {jax.process_count()} processes")


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """Assemble each process's local rows of ``keys`` into global, batch-sharded arrays."""
    sharding = batch_sharded(mesh)
    out = {}
    for k in keys:
        if k in batch:
            local = np.asarray(batch[k])
            global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
            out[k] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, local_device_count: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when asked by flags or by the environment.

    Flags win over ``LCLSC_COORDINATOR`` / ``LCLSC_NUM_PROCESSES`` / ``LCLSC_PROCESS_ID``; with
    none of them, JAX's own cluster detection (SLURM, Open MPI, TPU pods) is tried only when
    ``LCLSC_DISTRIBUTED=1``. On CPU, gloo collectives are selected. Returns whether it ran.
    """
    coordinator = coordinator or os.environ.get("LCLSC_COORDINATOR")
    env_n, env_id = os.environ.get("LCLSC_NUM_PROCESSES"), os.environ.get("LCLSC_PROCESS_ID")
    num_processes = num_processes if num_processes is not None else (int(env_n) if env_n else None)
    process_id = process_id if process_id is not None else (int(env_id) if env_id else None)
    auto = os.environ.get("LCLSC_DISTRIBUTED", "") == "1"
    if not (coordinator or auto):
        return False
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    if coordinator:
        kwargs.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    if local_device_count:
        kwargs["local_device_ids"] = list(range(local_device_count))
    jax.distributed.initialize(**kwargs)
    return True
