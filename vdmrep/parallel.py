"""Devices, mesh and sharding: one data-parallel axis over every device of every host.

Single host: a 1-D mesh over `jax.devices()`. Several hosts (one process per host, or
per GPU): `maybe_initialize_distributed` runs first, after which every process sees the
global device list; each process feeds its own slice of the global batch to
`global_batch`, and the same jitted step runs unchanged. See docs/distributed.md.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vdmrep.errors import ConfigError

DATA_AXIS = "data"
# Names jax.distributed accepts for `cluster_detection_method` (jax 0.10.2); "" lets JAX
# try every non-opt-in detector (SLURM, Open MPI, Cloud TPU VM / GKE TPU, Kubernetes).
CLUSTER_DETECTION = ("", "slurm", "ompi", "mpi4py", "gcetpu", "gketpu", "deactivate")
# Read by vdmrep when the config leaves them unset (JAX itself reads only the address).
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def validate(config) -> None:
  """Checks `config.distributed`; raises ConfigError naming the key."""
  validate_distributed(config.distributed)


def validate_distributed(d) -> None:
  if d.cluster_detection_method not in CLUSTER_DETECTION:
    raise ConfigError(f"config.distributed.cluster_detection_method="
                      f"{d.cluster_detection_method!r} is not valid; choose one of "
                      f"{list(CLUSTER_DETECTION)}")
  if d.initialization_timeout <= 0:
    raise ConfigError(f"config.distributed.initialization_timeout={d.initialization_timeout}"
                      " must be > 0 (seconds)")
  if d.num_processes < 0:
    raise ConfigError(f"config.distributed.num_processes={d.num_processes} must be >= 0 "
                      "(0 = from the environment)")
  if d.process_id < -1:
    raise ConfigError(f"config.distributed.process_id={d.process_id} must be >= 0 "
                      "(-1 = from the environment)")
  if d.num_processes and d.process_id >= d.num_processes:
    raise ConfigError(f"config.distributed.process_id={d.process_id} must be < "
                      f"config.distributed.num_processes={d.num_processes}")
  addr = d.coordinator_address
  if addr and not (":" in addr and addr.rsplit(":", 1)[1].isdigit()):
    raise ConfigError(f"config.distributed.coordinator_address={addr!r} must be host:port")
  set_keys = [k for k, unset in (("coordinator_address", ""), ("num_processes", 0),
                                 ("process_id", -1)) if d[k] != unset]
  if set_keys and not d.initialize:
    raise ConfigError(f"config.distributed.{set_keys[0]}={d[set_keys[0]]!r} is set but "
                      "config.distributed.initialize=False; set it to True for a "
                      "multi-process run")


def _env_int(environ: Mapping[str, str], name: str):
  raw = environ.get(name, "")
  if raw == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise ConfigError(f"environment variable {name}={raw!r} must be an integer") from None


def initialize_kwargs(dist_cfg, environ: Mapping[str, str]) -> dict:
  """Arguments for jax.distributed.initialize: config first, then environment.

  Whatever stays unset is left to JAX: it reads JAX_COORDINATOR_ADDRESS itself and
  auto-detects the rest on SLURM, Open MPI and Cloud TPU VMs.
  """
  kwargs = {"initialization_timeout": int(dist_cfg.initialization_timeout)}
  if dist_cfg.cluster_detection_method:
    kwargs["cluster_detection_method"] = dist_cfg.cluster_detection_method
  if dist_cfg.coordinator_address:
    kwargs["coordinator_address"] = dist_cfg.coordinator_address
  num = dist_cfg.num_processes if dist_cfg.num_processes > 0 else _env_int(
      environ, ENV_NUM_PROCESSES)
  pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else _env_int(environ, ENV_PROCESS_ID)
  if num is not None:
    kwargs["num_processes"] = num
  if pid is not None:
    kwargs["process_id"] = pid
  if num is not None and pid is not None and not 0 <= pid < num:
    raise ConfigError(f"process id {pid} is not in [0, {num}) (config.distributed.process_id"
                      f" / {ENV_PROCESS_ID} vs config.distributed.num_processes / "
                      f"{ENV_NUM_PROCESSES})")
  return kwargs


def maybe_initialize_distributed(dist_cfg) -> None:
  """jax.distributed.initialize() when `dist_cfg.initialize` (before any other JAX call)."""
  validate_distributed(dist_cfg)
  if not dist_cfg.initialize or jax.distributed.is_initialized():
    return
  kwargs = initialize_kwargs(dist_cfg, os.environ)
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as err:  # JAX's own message when nothing was given or detected
    raise ConfigError(
        f"jax.distributed.initialize({kwargs}) failed: {str(err).rstrip('.')}. Outside "
        "SLURM / Open MPI / Cloud TPU set config.distributed.coordinator_address, "
        f"num_processes and process_id (or JAX_COORDINATOR_ADDRESS, {ENV_NUM_PROCESSES}, "
        f"{ENV_PROCESS_ID})") from None


def check_process_layout(devices) -> None:
  """Every process must hold the same number of devices: the batch is split evenly."""
  counts = {}
  for d in devices:
    counts[d.process_index] = counts.get(d.process_index, 0) + 1
  if len(set(counts.values())) > 1:
    raise ConfigError(f"processes hold different numbers of devices {counts}; launch one "
                      "process per host (or per GPU) with equal device counts")


def process_major(devices) -> list:
  """Devices ordered by (process, id), so each process owns one contiguous batch block.

  With this order, rows [p * B / P, (p + 1) * B / P) of the global batch live on the
  devices of process p, which is exactly the slice `data.train_batch` gives it.
  """
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def make_mesh() -> Mesh:
  check_process_layout(jax.devices())
  return Mesh(np.asarray(process_major(jax.devices())), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """Assembles the global batch from this process's slice (all processes call this)."""
  return jax.make_array_from_process_local_data(batch_sharded(mesh), local)


def is_main_process() -> bool:
  """Process 0 alone writes files and prints; the others only log."""
  return jax.process_index() == 0


def main_print(*args) -> None:
  """print(..., flush=True) on process 0 only (every process computes the same numbers)."""
  if is_main_process():
    print(*args, flush=True)


def shard_full_batch(mesh: Mesh, batch: np.ndarray) -> jax.Array:
  """The global batch when every process holds all of it (eval data): each passes its slice."""
  per = batch.shape[0] // jax.process_count()
  start = jax.process_index() * per
  return global_batch(mesh, batch[start:start + per])
