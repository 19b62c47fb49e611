"""Fault handling for training: non-finite steps, preemption signals, unwritable workdirs.

Numerical faults are detected inside the jitted step, so the loop needs no extra
host sync: `guard_step` replaces the update of a bad step by the old state and
records the step and the offending terms in `TrainState.health` (int32 scalars,
checkpointed with the state). The host reads `health` when it already syncs (log,
eval and checkpoint boundaries) and `check_health` raises `NumericalError` naming
the *first* bad step, because under `nan_policy='stop'` the state freezes at that
step (no later step changes it, not even the step counter).

Policies (`config.training.nan_policy`):
  stop  the first non-finite step halts training; the state before it is kept and
        never saved, so the last checkpoint on disk is the last good one.
  skip  a non-finite step leaves params, EMA and optimiser state unchanged but
        consumes its batch (the step counter advances); more than
        `config.training.max_consecutive_skips` bad steps in a row halt as `stop`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile

import jax
import jax.numpy as jnp

NAN_POLICIES = ("stop", "skip")
# Bit k of a health mask marks FAULT_TERMS[k] non-finite.
FAULT_TERMS = ("recon", "prior", "diffusion", "kl", "loss", "grad")


class NumericalError(RuntimeError):
  """Training met a non-finite loss term or gradient (the message names step and term)."""


class Interrupted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint at `step` was saved before raising."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                     f"checkpoint saved, rerun the same command to resume")


def validate(config) -> None:
  from vdmrep.config_lib import ConfigError
  t = config.training
  if t.nan_policy not in NAN_POLICIES:
    raise ConfigError(f"config.training.nan_policy={t.nan_policy!r} is not valid; choose one "
                      f"of {list(NAN_POLICIES)}")
  if t.max_consecutive_skips < 0:
    raise ConfigError(f"config.training.max_consecutive_skips={t.max_consecutive_skips} "
                      "must be >= 0")


# -- numerical faults (inside jit) ----------------------------------------------------


def init_health() -> dict:
  """The fault record of a fresh run: dict of int32 scalars (-1 = never)."""
  h = dict(halted_at=-1, halted_terms=0, skipped=0, consecutive=0, last_bad_step=-1,
           last_bad_terms=0)
  return {k: jnp.asarray(v, jnp.int32) for k, v in h.items()}


def fault_mask(values: dict) -> jax.Array:
  """int32 bitmask over FAULT_TERMS of the scalars in `values` that are not finite."""
  bits = [jnp.where(jnp.all(jnp.isfinite(values[k])), 0, 1 << i)
          for i, k in enumerate(FAULT_TERMS) if k in values]
  return sum(bits).astype(jnp.int32)


def guard_step(old, new, checked: dict, metrics: dict, *, policy: str, max_skips: int):
  """Accepts or rejects the proposed `new` state (a TrainState) of one step.

  Args:
    old: the state the step started from (its `health` is the running record).
    new: the state the step produced (params, ema_params, opt_state, step + 1).
    checked: scalars to test, keyed by FAULT_TERMS names (term means, loss, grad norm).
    metrics: the step's metrics; zeroed on a rejected step so log averages stay finite.
    policy, max_skips: `config.training.nan_policy` and `max_consecutive_skips`.
  Returns:
    (state, metrics) with metrics["good_steps"] = 1.0 if the update was applied else 0.0.
  """
  h = old.health
  mask = fault_mask(checked)
  bad = mask != 0
  halted = h["halted_at"] >= 0
  consecutive = jnp.where(bad, h["consecutive"] + 1, 0)
  halt_now = ~halted & (bad if policy == "stop" else bad & (consecutive > max_skips))
  apply = ~halted & ~bad
  keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(apply, x, y), a, b)
  health = dict(
      halted_at=jnp.where(halt_now, old.step, h["halted_at"]),
      halted_terms=jnp.where(halt_now, mask, h["halted_terms"]),
      skipped=h["skipped"] + (~halted & bad & ~halt_now).astype(jnp.int32),
      consecutive=jnp.where(halted, h["consecutive"], consecutive),
      last_bad_step=jnp.where(~halted & bad, old.step, h["last_bad_step"]),
      last_bad_terms=jnp.where(~halted & bad, mask, h["last_bad_terms"]))
  state = new.replace(
      step=jnp.where(halted | halt_now, old.step, new.step),
      params=keep(new.params, old.params), ema_params=keep(new.ema_params, old.ema_params),
      opt_state=keep(new.opt_state, old.opt_state), health=health)
  metrics = {k: jnp.where(apply, v, jnp.zeros_like(v)) for k, v in metrics.items()}
  metrics["good_steps"] = apply.astype(jnp.float32)
  return state, metrics


# -- numerical faults (host side) -----------------------------------------------------


def term_names(mask: int) -> str:
  return ", ".join(k for i, k in enumerate(FAULT_TERMS) if int(mask) >> i & 1) or "none"


def check_health(health: dict, config, last_checkpoint) -> None:
  """Raises NumericalError if training halted; `health` is host values (ints)."""
  at = int(health["halted_at"])
  if at < 0:
    return
  t = config.training
  kept = (f"the last good checkpoint (step {last_checkpoint}) is kept" if last_checkpoint
          is not None else "no checkpoint was saved")
  if t.nan_policy == "stop":
    why = f"non-finite {term_names(health['halted_terms'])} at step {at}"
  else:
    why = (f"{int(health['consecutive'])} consecutive non-finite steps ending at step {at} "
           f"(last: {term_names(health['halted_terms'])}), more than "
           f"config.training.max_consecutive_skips={t.max_consecutive_skips}")
  raise NumericalError(f"training stopped: {why} (nan_policy={t.nan_policy!r}); {kept}; "
                       "lower config.optim.lr or set config.training.nan_policy='skip'")


def skip_note(health: dict) -> str:
  n = int(health["skipped"])
  if not n:
    return ""
  return (f"skipped {n} non-finite step(s) so far (last: step {int(health['last_bad_step'])}, "
          f"{term_names(health['last_bad_terms'])})")


# -- preemption ---------------------------------------------------------------------


class StopFlag:
  """Set by SIGTERM/SIGINT; the training loop saves at the next step boundary and exits.

  A second signal of the same kind restores the default action and re-sends it, so a
  user who presses Ctrl-C twice gets the usual immediate exit.
  """

  def __init__(self):
    self.signum = None

  def __bool__(self):
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
    self.signum = signum


@contextlib.contextmanager
def stop_on_signals(signums=(signal.SIGTERM, signal.SIGINT)):
  """Installs StopFlag handlers for `signums` (main thread only), restoring them after."""
  flag = StopFlag()
  old = {}
  try:
    for s in signums:
      old[s] = signal.signal(s, flag._handle)
  except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
    pass
  try:
    yield flag
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def exit_code(err: Interrupted) -> int:
  """128 + signal number, what a shell reports for a process killed by that signal, so
  schedulers see the job as interrupted (not finished) and requeue it."""
  return 128 + err.signum


# -- workdir ------------------------------------------------------------------------


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable, before anything compiles."""
  from vdmrep.checkpoints import CheckpointError
  if "://" in workdir:  # remote storage (gs://...): orbax creates and writes it
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as err:
    raise CheckpointError(f"workdir {workdir!r} is not writable: "
                          f"{err.strerror or err}") from None
