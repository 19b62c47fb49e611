"""Orbax checkpoints of the train state plus a JSON record (step, config, model fingerprint).

Guarantees (tested in tests/test_checkpoints.py and benchmarks/chaos.py):
  * Atomic: orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it
    when complete, so a kill during a save leaves the previous checkpoints intact;
    leftover tmp directories are removed when the manager next starts.
  * Verified: the record holds a SHA-256 of every array; a latest checkpoint whose
    arrays do not match it, or that fails to decode, is reported by name, moved to
    `<workdir>/corrupt_checkpoints/`, and the previous one is used. Read errors of the
    storage (EIO, permissions, memory) are not corruption: they stop the run with one
    line and move nothing; so does a checkpoint in another program's format.
  * Read-only readers: `Checkpoints(..., read_only=True)` (eval and sample modes) never
    deletes, moves or creates anything in `checkpoints/`; a step that is unreadable or
    vanishes under it (the trainer's retention) is skipped, not moved.
  * Retention: one manager with an orbax preservation policy keeping the last
    `keep` checkpoints plus the one with the best (lowest) eval bits/dim.
  * Compatible: the stored model fingerprint and image shape are compared with the
    config and data before any array is read (or anything compiles).
  * Disk full: a save that fails with ENOSPC raises CheckpointError saying so; the
    previous checkpoint is untouched, and the failed save's leftovers print nothing
    (vdmrep/storage.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from vdmrep.storage import is_disk_full, missing, quiet_async_leftovers, read_failure

BEST_METRIC = "eval_bpd"


class _DropOrbaxInfo(logging.Filter):
  """Orbax logs dozens of INFO lines per save; keep its warnings and errors only."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    # Checkpoints between evaluations carry no metrics, by design.
    msg = record.getMessage()
    # A failed save's worker threads log their exception with a traceback each; the
    # exception itself reaches `Checkpoints.save`, which reports it in one line.
    return (record.levelno >= logging.WARNING and "did not provide metrics" not in msg
            and "read only" not in msg and "raised an exception" not in msg)


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


class Checkpoints:
  """The checkpoints of one workdir. `read_only=True` (eval, sample) never changes them."""

  def __init__(self, workdir: str, keep: int, read_only: bool = False):
    # gs://... (TPU pods: hosts share no disk) goes to orbax as is.
    self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.read_only = read_only
    self.quarantined = []  # where unreadable steps were moved, this session
    self.skipped = []  # unreadable steps a read-only reader passed over
    self.vanished = []  # steps deleted (by the trainer's retention) while being read
    if "://" not in self.directory and os.path.lexists(self.directory) and \
        not os.path.isdir(self.directory):
      raise CheckpointError(f"{self.directory} exists but is not a directory; move it away or "
                            "use another --workdir")
    if read_only:
      self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False, save_interval_steps=0,
          enable_async_checkpointing=False))
      return
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                 keep_checkpoints_without_metrics=False)])
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True,
            best_fn=_best_metric, best_mode="min", preservation_policy=policy))

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
      quiet_async_leftovers()
      if is_disk_full(err):
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

  def quarantine(self, step: int, why: str) -> str | None:
    """Moves a corrupt step out of the manager's sight; returns where it went.

    A read-only reader moves nothing: it reports the step and passes over it (None).
    """
    if self.read_only:
      msg = (f"checkpoint {self.step_path(step)} is unreadable ({why}); left in place (this "
             "run only reads checkpoints) and trying the previous one")
      self.skipped.append(step)
      dest = None
    else:
      dest_dir = os.path.join(self.workdir, "corrupt_checkpoints")
      dest = os.path.join(dest_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      if jax.process_index() == 0:
        epath.Path(dest_dir).mkdir(parents=True, exist_ok=True)
        epath.Path(self.step_path(step)).rename(dest)
      if jax.process_count() > 1:  # every process must see the move before re-listing
        multihost_utils.sync_global_devices(f"quarantine_{step}")
      self.manager.reload()
      msg = (f"checkpoint {self.step_path(step)} is unreadable ({why}); moved it to {dest} "
             "and trying the previous one")
      self.quarantined.append(dest)
    logging.getLogger("absl").warning(msg)
    if jax.process_index() == 0:
      print(f"warning: {msg}", flush=True)
    return dest

  def _steps(self):
    """Steps newest first, without those passed over (unreadable to a read-only reader,
    or vanished)."""
    return [s for s in sorted(self.manager.all_steps(), reverse=True)
            if s not in self.skipped and s not in self.vanished]

  def _reload(self) -> None:
    """Re-lists the steps on disk: a trainer may have saved or deleted some since the
    manager listed them (retried while a step vanishes during the listing)."""
    for attempt in range(10):
      try:
        self.manager.reload()
        return
      except Exception as err:  # a step deleted while orbax read its metadata
        if attempt == 9 or not missing(err):
          raise
        time.sleep(0.2)

  def _vanished(self, step: int, err: BaseException | None = None) -> bool:
    """True (and the step list reloaded) if `step` is gone: the trainer's retention
    deleted it, which is not an error. A read-only reader that met a missing file
    waits a moment for a deletion in progress to finish."""
    if "://" in self.directory:
      return False
    waits = 20 if self.read_only and err is not None and missing(err) else 0
    for _ in range(waits):
      if not os.path.isdir(self.step_path(step)):
        break
      time.sleep(0.1)
    if os.path.isdir(self.step_path(step)):
      return False
    self.vanished.append(step)
    self._reload()
    return True

  def _failed(self, step: int, what: str, err: BaseException) -> None:
    """Handles an exception of reading `what` of `step`: re-raises storage errors as one
    line, passes over a vanished step, quarantines a corrupt one."""
    if isinstance(err, CheckpointError):
      raise err
    if self._vanished(step, err):
      return
    io = read_failure(err)
    if io is not None:
      raise CheckpointError(
          f"reading checkpoint {self.step_path(step)} failed ({io}); it is a storage or memory "
          "error, not corruption, so nothing was moved: fix the cause and rerun") from None
    self._check_own_format(step)
    self.quarantine(step, f"{what}: {type(err).__name__}: {_short(err)}")

  def _check_own_format(self, step: int) -> None:
    """Raises CheckpointError if `step` is a valid checkpoint of another program (its
    orbax metadata lists items other than this package's 'state' and 'meta')."""
    path = os.path.join(self.step_path(step), "_CHECKPOINT_METADATA")
    try:
      with open(path) as f:
        items = set(json.load(f).get("item_handlers") or {})
    except (OSError, ValueError, AttributeError):
      return  # no readable orbax metadata: judged by its contents
    if items and items != {"state", "meta"}:
      raise CheckpointError(
          f"{self.step_path(step)} is a checkpoint in another format (items {sorted(items)}, "
          "expected ['meta', 'state']); it was left in place: move it out of "
          f"{self.directory} or use another --workdir")

  def latest_meta(self):
    """(step, meta) of the newest checkpoint whose record reads, quarantining the others."""
    while True:
      steps = self._steps()
      if not steps:
        return None, None
      step = steps[0]
      try:
        meta = self.read_meta(step)
      except Exception as err:  # truncated/garbled JSON or metadata: many types
        self._failed(step, "record", err)
        continue
      if not isinstance(meta, dict) or "model_fingerprint" not in meta:
        raise CheckpointError(
            f"{self.step_path(step)} was not written by vdmrep (its record has no model "
            f"fingerprint); it was left in place: move it out of {self.directory} or use "
            "another --workdir")
      return step, meta

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

  def check_latest_compatible(self, fingerprint: dict, image_shape):
    """check_compatible on the newest readable record (reads no arrays); returns it."""
    _, meta = self.latest_meta()
    if meta is not None:
      self.check_compatible(meta, fingerprint, image_shape)
    return meta

  def _check_structure(self, step: int, abstract_state) -> None:
    """Raises CheckpointError if the saved state's tree differs from `abstract_state`
    (an older vdmrep's state): that is a version mismatch, not corruption."""
    try:  # orbax's tree record of the saved state: {"tree_metadata": {path: {...}}}
      with open(os.path.join(self.step_path(step), "state", "_METADATA")) as f:
        entries = json.load(f)["tree_metadata"].values()
      saved = {tuple(str(k["key"]) for k in e["key_metadata"]) for e in entries
               if not e["value_metadata"].get("skip_deserialize")}  # empty nodes: no leaf
    except Exception:  # no readable record: the restore judges the arrays
      return
    want = _leaf_paths(abstract_state)
    if saved and saved != want:
      missing = sorted(".".join(p) for p in want - saved)
      extra = sorted(".".join(p) for p in saved - want)
      raise CheckpointError(
          f"{self.step_path(step)} holds a train state of another vdmrep version (missing "
          f"{_short(str(missing), 80)}, extra {_short(str(extra), 80)}); it was left in place: "
          f"move it out of {self.directory} or use another --workdir")

  def restore_latest(self, abstract_state, fingerprint: dict, image_shape=None):
    """(state, meta) of the newest readable compatible checkpoint, or (None, None).

    Corrupt steps (decode errors, digest mismatch) are quarantined (reported by name)
    and the previous one is tried; storage errors and incompatible or foreign
    checkpoints raise CheckpointError and move nothing.
    """
    while True:
      step, meta = self.latest_meta()
      if step is None:
        break
      self.check_compatible(meta, fingerprint, image_shape)
      self._check_structure(step, abstract_state)
      try:
        state = self.restore(step, abstract_state)
      except Exception as err:  # tensorstore/zarr/ocdbt read errors: many types
        self._failed(step, "arrays", err)
        continue
      digest = meta.get("state_sha256")
      if digest is not None and tree_digest(state) not in (None, digest):
        self.quarantine(step, "array contents do not match the SHA-256 in its record")
        continue
      return state, meta
    if self.quarantined:
      raise CheckpointError(
          f"no readable checkpoint left in {self.directory}: the unreadable ones were moved to "
          f"{os.path.dirname(self.quarantined[0])} (move a step directory back into "
          f"{self.directory} to retry it); rerunning now starts from step 0")
    if self.skipped and self.read_only:
      raise CheckpointError(f"no readable checkpoint in {self.directory} (unreadable: steps "
                            f"{sorted(set(self.skipped))}, left in place)")
    return None, None

  def close(self):
    self.manager.close()


def _leaf_paths(tree) -> set:
  """Leaf paths as tuples of names (a dataclass field and a dict key alike)."""
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {tuple(name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _short(err: BaseException, n: int = 200) -> str:
  s = " ".join(str(err).split())
  return s if len(s) <= n else s[:n] + "..."


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
