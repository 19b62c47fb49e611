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
import errno
import fcntl
import os
import signal
import tempfile
import time

import jax
import jax.numpy as jnp

NAN_POLICIES = ("stop", "skip")
# Bit k of a health mask marks FAULT_TERMS[k] non-finite.
FAULT_TERMS = ("recon", "prior", "diffusion", "kl", "loss", "grad")


class NumericalError(RuntimeError):
  """Training met a non-finite loss term or gradient (the message names step and term)."""


class Interrupted(BaseException):
  """SIGTERM/SIGINT arrived and the run stopped cleanly.

  A BaseException (like KeyboardInterrupt), so no `except Exception` on the way up
  mistakes it for a failed read or save. Three cases, by what is on disk:
    training: a checkpoint at `step` was saved at the step boundary (exit 128 + signum);
    finished: training had finished and its checkpoint `step` was saved; the signal
      came during the final evaluation (exit 0: the job is done, do not requeue it);
    `phase` (start-up, evaluation, sampling): nothing was changed (exit 128 + signum).
  """

  def __init__(self, signum: int, step: int | None = None, *, finished: bool = False,
               phase: str = "training"):
    self.signum, self.step, self.finished, self.phase = signum, step, finished, phase
    name = signal.Signals(signum).name
    if finished:
      msg = (f"interrupted by {name} during {phase}; training had finished and checkpoint "
             f"step {step} is saved; run --mode eval to evaluate it")
    elif step is not None:
      msg = (f"interrupted by {name} at step {step}; checkpoint saved, rerun the same command "
             "to resume")
    else:
      msg = (f"interrupted by {name} during {phase}; no checkpoint was changed, rerun the same "
             "command")
    super().__init__(msg)


def validate(config) -> None:
  from vdmrep.errors import ConfigError
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


@contextlib.contextmanager
def raise_on_signals(phase: str, step: int | None = None, finished: bool = False,
                     signums=(signal.SIGTERM, signal.SIGINT)):
  """SIGTERM/SIGINT raise Interrupted(phase, step, finished) at once (main thread only).

  For phases that write no checkpoint (start-up, restore, evaluation, sampling), where
  stopping at once loses nothing; the training loop defers with `stop_on_signals`.
  """
  def handle(signum, frame):
    del frame
    raise Interrupted(signum, step, finished=finished, phase=phase)
  old = {}
  try:
    for s in signums:
      old[s] = signal.signal(s, handle)
  except ValueError:  # not the main thread
    pass
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def exit_code(err: Interrupted) -> int:
  """0 if training had finished (the job is done); otherwise 128 + signal number, what a
  shell reports for a process killed by that signal, so schedulers see the job as
  interrupted and requeue it."""
  return 0 if err.finished else 128 + err.signum


# -- workdir ------------------------------------------------------------------------


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable, before anything compiles."""
  from vdmrep.checkpoints import CheckpointError
  if "://" in workdir:  # remote storage (gs://...): orbax creates and writes it
    return
  for path in (workdir, os.path.join(workdir, "checkpoints")):
    if os.path.lexists(path) and not os.path.isdir(path):
      raise CheckpointError(f"{path} exists but is not a directory; move it away or use "
                            "another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as err:
    raise CheckpointError(f"workdir {workdir!r} is not writable: "
                          f"{err.strerror or err}") from None


LOCK_NAME = "train.lock"


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on `<workdir>/train.lock` while training.

  An OS file lock (flock), so the kernel releases it when the process dies however it
  dies; a stale lock file left by a killed run is no obstacle. A second trainer on the
  same workdir raises CheckpointError naming the holder's PID (written in the file).
  Only process 0 locks; remote workdirs (gs://) are not locked.
  """
  from vdmrep.checkpoints import CheckpointError
  if "://" in workdir or jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    # An evaluator's probe (training_pid) holds a shared lock for an instant: retry
    # briefly before calling the workdir taken.
    for attempt in range(20):
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as err:
        if attempt == 19 or err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
          raise
        time.sleep(0.05)
  except OSError as err:
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise CheckpointError(f"workdir {workdir} is in use by another training process (PID "
                            f"{holder}, lock {path}); wait for it to finish, stop it, or use "
                            "another --workdir") from None
    raise CheckpointError(f"cannot lock {path} ({err.strerror}); the filesystem does not "
                          "support file locks: use a local --workdir") from None
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock; the file stays (removing it would race a new owner)


def training_pid(workdir: str) -> str | None:
  """The PID of a trainer holding `workdir`'s lock now, or None (creates nothing)."""
  if "://" in workdir:
    return None
  path = os.path.join(workdir, LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return None  # closing the descriptor drops the probe's lock at once
  except OSError as err:
    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
      return None
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
  finally:
    os.close(fd)
