"""Storage errors told apart from corruption, and the remains of a failed save silenced.

`read_failure` says whether an exception of a checkpoint read is the storage's or the
machine's (EIO, permissions, memory: leave the checkpoint where it is) rather than the
checkpoint's bytes. `install_quiet_hooks` (run on import) keeps a failed orbax save's
leftovers (futures nobody awaited, tasks pending on a closed event loop, tensorstore's
callbacks into that loop) from printing tracebacks after the one line that reports it.
"""
from __future__ import annotations

import errno
import logging
import os
import sys


def _short(err, n: int = 200) -> str:
  s = " ".join(str(err).split())
  return s if len(s) <= n else s[:n] + "..."


# Errors of the storage or the machine, not of the checkpoint's bytes: a checkpoint that
# meets one is left where it is (the next attempt may read it fine).
_IO_ERRNOS = {errno.EIO, errno.EACCES, errno.EPERM, errno.ENOMEM, errno.ESTALE, errno.EAGAIN,
              errno.EBUSY, errno.ETIMEDOUT, errno.ENXIO, errno.ENODEV, errno.EMFILE,
              errno.ENFILE, errno.ECONNRESET, errno.EHOSTUNREACH}
# tensorstore reports OS errors as text inside its own exception types
_IO_TEXT = ("Input/output error", "Permission denied", "Cannot allocate memory",
            "Operation not permitted", "Stale file handle", "Too many open files",
            "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def chain(err: BaseException):
  """`err`, then what it was raised from or during, and so on."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    yield err
    err = err.__cause__ or err.__context__


def read_failure(err: BaseException) -> str | None:
  """A short reason if `err` is a storage or memory error (not corruption), else None."""
  for e in chain(err):
    if isinstance(e, MemoryError):
      return "out of memory"
    if isinstance(e, OSError) and e.errno in _IO_ERRNOS:
      return f"{type(e).__name__}: [Errno {e.errno}] {e.strerror or os.strerror(e.errno)}"
    text = str(e)
    for t in _IO_TEXT:
      if t in text:
        return f"{type(e).__name__}: {_short(text)}"
  return None


def missing(err: BaseException) -> bool:
  """True if `err` or anything it wraps says a file does not exist."""
  return any(isinstance(e, FileNotFoundError) or getattr(e, "errno", None) == errno.ENOENT
             or "No such file or directory" in str(e) or "NOT_FOUND" in str(e)
             for e in chain(err))


def is_disk_full(err: BaseException) -> bool:
  """True if `err` or anything it wraps is ENOSPC (tensorstore reports it as text)."""
  return any(getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
             for e in chain(err))


def storage_error(err: BaseException) -> bool:
  return any(isinstance(e, OSError) for e in chain(err)) or is_disk_full(err) or (
      read_failure(err) is not None)


def _closed_loop(err: BaseException) -> bool:
  """The error of a write finishing after orbax closed the event loop of a failed save."""
  return isinstance(err, RuntimeError) and str(err) == "Event loop is closed"


class _QuietFailedSave(logging.Filter):
  """Drops asyncio's reports about the remains of a failed save (the failure itself is
  reported by `Checkpoints.save` in one line): futures holding its storage error that
  nobody awaited, and orbax's tasks left pending when its event loop closed."""

  def filter(self, record):
    msg = record.getMessage()
    if "exception was never retrieved" in msg:
      exc = record.exc_info[1] if record.exc_info else None
      return exc is None or not (storage_error(exc) or _closed_loop(exc))
    if "Task was destroyed but it is pending" in msg:
      return "orbax" not in msg and "tensorstore" not in msg
    return True


def _quiet_unraisable(previous):
  """sys.unraisablehook without the closed-loop errors: tensorstore reports the callback
  of each write still in flight when a failed save's loop closed (from its own threads,
  at any moment after the failure), burying the line that says what happened."""

  def hook(unraisable):
    if not _closed_loop(unraisable.exc_value):
      previous(unraisable)

  hook.vdmrep_quiet = True
  return hook


def install_quiet_hooks() -> None:
  """Silences the remains of a failed save (see _QuietFailedSave, _quiet_unraisable).

  Installed when this module is imported (by vdmrep.checkpoints): the reports start in
  other threads as soon as the save fails, before its exception reaches
  `Checkpoints.save`. Idempotent.
  """
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _QuietFailedSave) for f in asyncio_log.filters):
    asyncio_log.addFilter(_QuietFailedSave())
  if not getattr(sys.unraisablehook, "vdmrep_quiet", False):
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


install_quiet_hooks()


def quiet_async_leftovers() -> None:
  """Silences every asyncio report from here on (a save failed and the run is ending).

  A save that fails (disk full) leaves tensorstore's other write futures failed too;
  asyncio logs each as a traceback when it is garbage-collected, burying the one line
  that says what happened.
  """
  install_quiet_hooks()
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
