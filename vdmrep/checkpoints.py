"""Orbax checkpoints of the train state plus a JSON record (step, config, model fingerprint).

Orbax writes each step to a temporary directory and renames it when complete, so a
kill during a save leaves the previous checkpoints intact. Resuming checks that the
stored model fingerprint matches the config before any array is read.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp


class _DropOrbaxInfo(logging.Filter):
  """Orbax logs dozens of INFO lines per save; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


logging.getLogger("absl").addFilter(_DropOrbaxInfo())


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used with this config."""


class Checkpoints:
  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(workdir, "checkpoints")
    if "://" not in workdir:  # gs://... (TPU pods: hosts share no disk) goes to orbax as is
      self.directory = os.path.abspath(self.directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state):
    """The state saved at `step`, laid out like `abstract_state` (shapes + shardings)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]

  def restore_latest(self, abstract_state, fingerprint: dict):
    """(state, meta) of the latest checkpoint, or (None, None) if there is none."""
    step = self.latest_step()
    if step is None:
      return None, None
    meta = self.read_meta(step)
    saved = meta.get("model_fingerprint")
    if saved is not None and saved != fingerprint:
      diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
      raise CheckpointError(
          f"{self.directory} holds a checkpoint of a different model (saved vs config: "
          f"{diff}); use another --workdir or the same model config")
    return self.restore(step, abstract_state), meta

  def close(self):
    self.manager.close()


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
