"""Where arrays live: one device, data parallel, or fully sharded (FSDP), via jax.sharding.

All modes use one mesh axis, "data", over every device of every process. The batch is split
along it. In FSDP mode each parameter (and so its optimizer state) is also split along it, on
its largest dimension that divides evenly; XLA inserts the gathers and reductions.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2cli.errors import ParameterError

MODES = ("single", "data-parallel", "fsdp")
AXIS = "data"


def make_mesh(mode: str) -> Mesh:
    devices = jax.devices()[:1] if mode == "single" else jax.devices()
    return Mesh(np.asarray(devices), (AXIS,))


def check_batch(mesh: Mesh, rows: int) -> None:
    n = mesh.devices.size
    if rows % n:
        raise ParameterError(
            "batch_size", f"{rows} does not split over {n} devices; use a multiple of {n}"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[accum, rows, seq] batches: rows split over the devices."""
    return NamedSharding(mesh, PartitionSpec(None, AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_spec(shape: tuple[int, ...], n_devices: int, fsdp: bool) -> PartitionSpec:
    """Shard the largest evenly divisible dimension in FSDP mode; replicate otherwise."""
    if not fsdp or n_devices == 1:
        return PartitionSpec()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % n_devices == 0 and shape[d] >= n_devices:
            spec = [None] * len(shape)
            spec[d] = AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()  # small or odd-sized (a scalar, a 50257-row table): replicate


def tree_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """A NamedSharding for every array leaf of `tree` (params or optimizer state)."""
    n = mesh.devices.size
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, n, fsdp)), tree)


def put(tree: Any, shardings: Any) -> Any:
    """Place host values (identical in every process) onto the mesh."""

    def place(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree, shardings)


def put_batch(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows of the global batch -> one global array."""
    return jax.make_array_from_process_local_data(sharding, local_rows)


def to_host(tree: Any) -> Any:
    """Full numpy values of (possibly sharded, possibly multi-process) arrays.

    Every process must call this together when arrays span processes.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def any_process(flag: bool) -> bool:
    """True in every process when `flag` is true in any of them (a collective)."""
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def init_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process run; must come before any JAX computation.

    On CPU the processes exchange data through gloo (TCP).
    """
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ParameterError(
            "process_id", f"must be in [0, num_processes), got {process_id} of {num_processes}"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ParameterError("coordinator", f"must be HOST:PORT, got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
