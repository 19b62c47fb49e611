"""Orbax checkpoints of the train state plus a JSON record (step, config, model fingerprint).

Guarantees (tested in tests/test_checkpoints.py and benchmarks/chaos.py):
  * Atomic: orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it
    when complete, so a kill during a save leaves the previous checkpoints intact;
    leftover tmp directories are removed when the manager next starts.
  * Verified: the record holds a SHA-256 of every array; a latest checkpoint that
    cannot be read or whose arrays do not match it is reported by name, moved to
    `<workdir>/corrupt_checkpoints/`, and the previous one is used.
  * Retention: one manager with an orbax preservation policy keeping the last
    `keep` checkpoints plus the one with the best (lowest) eval bits/dim.
  * Compatible: the stored model fingerprint and image shape are compared with the
    config and data before any array is read (or anything compiles).
  * Disk full: a save that fails with ENOSPC raises CheckpointError saying so; the
    previous checkpoint is untouched.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

BEST_METRIC = "eval_bpd"


class _DropOrbaxInfo(logging.Filter):
  """Orbax logs dozens of INFO lines per save; keep its warnings and errors only."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    # Checkpoints between evaluations carry no metrics, by design.
    return record.levelno >= logging.WARNING and "did not provide metrics" not in \
        record.getMessage()


logging.getLogger("absl").addFilter(_DropOrbaxInfo())


class CheckpointError(RuntimeError):
  """A checkpoint or workdir that cannot be used with this config."""


def _best_metric(metrics) -> float:
  return float(metrics[BEST_METRIC])


def tree_digest(tree) -> str | None:
  """SHA-256 over dtype, shape and bytes of every leaf (None if not all host-addressable)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return None
    a = np.asarray(jax.device_get(leaf))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _is_disk_full(err: BaseException) -> bool:
  """True if `err` or anything it wraps is ENOSPC (tensorstore reports it as text)."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
      return True
    err = err.__cause__ or err.__context__
  return False


class Checkpoints:
  def __init__(self, workdir: str, keep: int):
    # gs://... (TPU pods: hosts share no disk) goes to orbax as is.
    self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                 keep_checkpoints_without_metrics=False)])
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True,
            best_fn=_best_metric, best_mode="min", preservation_policy=policy))
    self.quarantined = []  # where unreadable steps were moved, this session

  def latest_step(self):
    return self.manager.latest_step()

  def best_step(self):
    """The step with the lowest eval bits/dim among those saved with metrics (or None)."""
    steps = [s for s in self.manager.all_steps() if self.manager.metrics(s) is not None]
    return self.manager.best_step() if steps else None

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    """Saves `state` and `meta` (+ its digest) at `step`; `metrics` rank the best."""
    meta = dict(meta, state_sha256=tree_digest(state))
    previous = self.latest_step()
    try:
      self.manager.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)
      self.manager.wait_until_finished()
    except Exception as err:  # orbax/tensorstore wrap OS errors in many types
      kept = (f"the previous checkpoint (step {previous}) is intact" if previous is not None
              else "no earlier checkpoint exists")
      if _is_disk_full(err):
        raise CheckpointError(f"disk full while saving checkpoint step {step} in "
                              f"{self.directory}; {kept}; free space and rerun to resume"
                              ) from None
      raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed "
                            f"({type(err).__name__}: {err}); {kept}") from None

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state):
    """The state saved at `step`, laid out like `abstract_state` (shapes + shardings)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def quarantine(self, step: int, why: str) -> str:
    """Moves an unreadable step out of the manager's sight; returns where it went."""
    dest_dir = os.path.join(self.workdir, "corrupt_checkpoints")
    dest = os.path.join(dest_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      epath.Path(dest_dir).mkdir(parents=True, exist_ok=True)
      epath.Path(self.step_path(step)).rename(dest)
    if jax.process_count() > 1:  # every process must see the move before re-listing
      multihost_utils.sync_global_devices(f"quarantine_{step}")
    self.manager.reload()
    msg = (f"checkpoint {self.step_path(step)} is unreadable ({why}); moved it to {dest} and "
           "trying the previous one")
    logging.getLogger("absl").warning(msg)
    if jax.process_index() == 0:
      print(f"warning: {msg}", flush=True)
    self.quarantined.append(dest)
    return dest

  def latest_meta(self):
    """(step, meta) of the newest checkpoint whose record reads, quarantining the others."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, self.read_meta(step)
      except Exception as err:  # truncated/garbled JSON or metadata: many types
        self.quarantine(step, f"record: {type(err).__name__}: {_short(err)}")
    return None, None

  def check_compatible(self, meta: dict, fingerprint: dict, image_shape) -> None:
    """Raises CheckpointError if `meta` was saved by a different model or image size."""
    saved = meta.get("model_fingerprint")
    if saved is not None and saved != fingerprint:
      diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
      raise CheckpointError(
          f"{self.directory} holds a checkpoint of a different model (saved vs config: "
          f"{diff}); use another --workdir or the same model config")
    shape = meta.get("image_shape")
    if None not in (shape, image_shape) and tuple(shape) != tuple(image_shape):
      raise CheckpointError(
          f"{self.directory} holds a checkpoint built for images of shape {tuple(shape)} "
          f"but the data (config.data.source) has shape {tuple(image_shape)}")

  def check_latest_compatible(self, fingerprint: dict, image_shape) -> None:
    """check_compatible on the newest readable record (reads no arrays)."""
    _, meta = self.latest_meta()
    if meta is not None:
      self.check_compatible(meta, fingerprint, image_shape)

  def restore_latest(self, abstract_state, fingerprint: dict, image_shape=None):
    """(state, meta) of the newest readable compatible checkpoint, or (None, None).

    Unreadable or digest-mismatched steps are quarantined (reported by name) and the
    previous one is tried; an incompatible one raises CheckpointError.
    """
    while True:
      step, meta = self.latest_meta()
      if step is None:
        break
      self.check_compatible(meta, fingerprint, image_shape)
      try:
        state = self.restore(step, abstract_state)
        digest = meta.get("state_sha256")
        if digest is not None and tree_digest(state) not in (None, digest):
          raise ValueError("array contents do not match the SHA-256 in its record")
        return state, meta
      except CheckpointError:
        raise
      except Exception as err:  # tensorstore/zarr/ocdbt read errors: many types
        self.quarantine(step, f"{type(err).__name__}: {_short(err)}")
    if self.quarantined:
      raise CheckpointError(f"no readable checkpoint left in {self.directory} (unreadable ones "
                            f"moved to {os.path.dirname(self.quarantined[0])}); rerun to start "
                            "from scratch")
    return None, None

  def close(self):
    self.manager.close()


def _short(err: BaseException, n: int = 200) -> str:
  s = " ".join(str(err).split())
  return s if len(s) <= n else s[:n] + "..."


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
