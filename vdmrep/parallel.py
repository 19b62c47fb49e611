"""Devices, mesh and sharding: one data-parallel axis over every device of every host.

Single host: a 1-D mesh over `jax.devices()`. Several hosts: call
`maybe_initialize_distributed` first (each process then sees the global device list),
feed each process's slice of the global batch to `global_batch`, and the same jitted
step runs unchanged.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(dist_cfg) -> None:
  """jax.distributed.initialize() when the config asks (arguments from config or env)."""
  if not dist_cfg.initialize:
    return
  kwargs = {}
  if dist_cfg.coordinator_address:
    kwargs["coordinator_address"] = dist_cfg.coordinator_address
  if dist_cfg.num_processes > 0:
    kwargs["num_processes"] = dist_cfg.num_processes
  if dist_cfg.process_id >= 0:
    kwargs["process_id"] = dist_cfg.process_id
  jax.distributed.initialize(**kwargs)


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """Assembles the global batch from this process's slice (all processes call this)."""
  return jax.make_array_from_process_local_data(batch_sharded(mesh), local)


def shard_full_batch(mesh: Mesh, batch: np.ndarray) -> jax.Array:
  """The global batch when every process holds all of it (eval data): each passes its slice."""
  per = batch.shape[0] // jax.process_count()
  start = jax.process_index() * per
  return global_batch(mesh, batch[start:start + per])
