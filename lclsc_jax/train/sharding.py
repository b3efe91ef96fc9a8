"""Meshes, shardings, multi-host start-up and moving host batches onto devices."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(num_devices: int | None = None, model_parallel: int = 1) -> Mesh:
    """A ``(data, model)`` mesh over all (or the first ``num_devices``) devices; ``model`` is 1 for now."""
    n = num_devices or jax.device_count()
    if n % model_parallel:
        raise ValueError(f"{n} devices cannot be split into model-parallel groups of {model_parallel}")
    return jax.make_mesh((n // model_parallel, model_parallel), (DATA_AXIS, MODEL_AXIS),
                         axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=jax.devices()[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of the train state: every device holds all of it."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: the leading axis split over the ``data`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return mesh.shape[DATA_AXIS]


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """A global batch must split evenly over the data axis and the processes."""
    n = data_parallel_size(mesh)
    if global_batch % n or global_batch % jax.process_count():
        raise ValueError(
            f"global batch size {global_batch} must be divisible by the {n} data-parallel devices "
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
