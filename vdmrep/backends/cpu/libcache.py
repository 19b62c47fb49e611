"""The compiled kernels' cache: where the library lives, and what is checked before it loads.

Layout: `<root>/<tag>/vdmrep_kernels.so` with its manifest `vdmrep_kernels.json` beside
it; root = $VDMREP_KERNEL_CACHE, default ~/.cache/vdmrep/kernels; the tag names the
sources, oneDNN, jaxlib and CPU it was built for (`kernels.library_path`).

Loading a shared object runs its code (its constructors) at once, so `verified_library`
hands out nothing unless
  * the library and its manifest are regular files, and they, their directory and the
    cache root are owned by this user and not writable by group or others; every
    directory above is owned by this user or root and not writable by group or others
    unless sticky (/tmp), as ssh checks ~/.ssh;
  * the library's size and SHA-256 equal those its build recorded in the manifest
    (`install` writes it after the compiler exited 0, so an empty, truncated or foreign
    file is refused and build.py replaces it).
The bytes hashed are read through the file descriptor that is then loaded
(/proc/self/fd/N), so the file cannot be swapped between the check and the load.

A failed build leaves `build-failed.log` (command and compiler output) in the tag
directory; runs then say so in one line instead of "not built" (or instead of the
digest mismatch of the library it failed to replace), and the next successful build
removes it. Every message here is one line.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

LIBRARY = "vdmrep_kernels.so"
MANIFEST = "vdmrep_kernels.json"
FAILED = "build-failed.log"
BUILD = "python -m vdmrep.backends.cpu.build"
_UNSAFE_FIX = ("fix its owner or mode, or point VDMREP_KERNEL_CACHE at a directory only "
               f"you can write, and rerun {BUILD}")


def root() -> Path:
  """The cache root: $VDMREP_KERNEL_CACHE, else ~/.cache/vdmrep/kernels."""
  env = os.environ.get("VDMREP_KERNEL_CACHE")
  return Path(env) if env else Path.home() / ".cache" / "vdmrep" / "kernels"


def _mode(st) -> str:
  return f"{stat.S_IMODE(st.st_mode):o}"


def _problem(st, path, private: bool) -> str | None:
  """Why `path` (stat `st`) may not hold code this user runs, or None.

  private: owned by this user and writable by nobody else; otherwise (a directory above
  the cache) root may own it too, and a sticky directory may be writable by all.
  """
  uid = os.geteuid()
  if st.st_uid != uid and (private or st.st_uid != 0):
    return f"{path} is owned by uid {st.st_uid}, not this user (uid {uid})"
  if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (
      private or not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX)):
    return f"{path} is writable by group or others (mode {_mode(st)})"
  return None


def _ancestors(path: Path):
  while True:
    yield path
    if path.parent == path:
      return
    path = path.parent


def location_problem(directory: Path) -> str | None:
  """Why the tag directory `directory` (and the cache root above it) is not safe to load
  code from, or None. Checks the path as written and as resolved (symbolic links)."""
  cache = root()
  private = {Path(os.path.abspath(p)) for p in (directory, cache)}
  private |= {Path(os.path.realpath(p)) for p in (directory, cache)}
  for start in (Path(os.path.abspath(directory)), Path(os.path.realpath(directory))):
    for p in _ancestors(start):
      try:
        st = os.stat(p)
      except OSError as e:
        return f"cannot inspect {p} ({e.strerror})"
      problem = _problem(st, p, private=p in private)
      if problem:
        return problem
  return None


class _Unrecorded(OSError):
  """A library its build did not record (no manifest, another digest): rebuild it."""


def _read_manifest(path: Path) -> dict:
  """The build's record of the library; raises OSError (one line) if absent or unsafe."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  except FileNotFoundError:
    raise _Unrecorded(f"it has no build manifest ({path} is missing), so it was not built "
                      f"by {BUILD}; rebuild it with that command") from None
  except OSError as e:
    raise OSError(f"cannot open its build manifest {path} ({e.strerror})") from None
  with os.fdopen(fd, "rb") as f:
    st = os.fstat(f.fileno())
    problem = (f"{path} is not a regular file" if not stat.S_ISREG(st.st_mode)
               else _problem(st, path, private=True))
    if problem:
      raise OSError(f"{problem}; {_UNSAFE_FIX}")
    try:
      manifest = json.loads(f.read(1 << 16))
      int(manifest["size"]), str(manifest["sha256"])
    except (ValueError, KeyError, TypeError):
      raise _Unrecorded(f"its build manifest {path} is unreadable; rebuild it with "
                        f"{BUILD}") from None
  if manifest.get("uid") != os.geteuid():
    raise _Unrecorded(f"its build manifest {path} records another builder (uid "
                      f"{manifest.get('uid')}); rebuild it with {BUILD}")
  return manifest


def _digest(fd: int) -> tuple[int, str]:
  h, size = hashlib.sha256(), 0
  os.lseek(fd, 0, os.SEEK_SET)
  while chunk := os.read(fd, 1 << 20):
    h.update(chunk)
    size += len(chunk)
  return size, h.hexdigest()


def failed_build(lib: Path) -> str | None:
  """One line about a recorded failed build of `lib`, or None."""
  log = lib.parent / FAILED
  if not log.is_file() or location_problem(lib.parent):
    return None
  try:
    first = log.read_text(errors="replace").splitlines()[0]
  except (OSError, IndexError):
    first = "no details"
  return (f"the last build of the CPU kernels failed ({' '.join(first.split())[:200]}; "
          f"log: {log}); fix the cause and rerun {BUILD}")


@contextlib.contextmanager
def verified_library(lib: Path):
  """Yields a path to dlopen that is exactly the verified `lib`; raises OSError (one line)
  if it is not built, unsafe, or differs from what its build recorded."""
  if not os.path.lexists(lib):
    raise OSError(failed_build(lib) or f"CPU kernels not built ({BUILD})")
  refuse = f"refusing to load the CPU kernels {lib}"
  problem = location_problem(lib.parent)
  if problem:
    raise OSError(f"{refuse}: {problem}; {_UNSAFE_FIX}")
  try:
    manifest = _read_manifest(lib.parent / MANIFEST)
  except _Unrecorded as e:
    raise OSError(failed_build(lib) or f"{refuse}: {e}") from None
  except OSError as e:
    raise OSError(f"{refuse}: {e}") from None
  try:
    fd = os.open(lib, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  except OSError as e:
    raise OSError(f"{refuse}: cannot open it ({e.strerror})") from None
  try:
    st = os.fstat(fd)
    problem = (f"{lib} is not a regular file" if not stat.S_ISREG(st.st_mode)
               else _problem(st, lib, private=True))
    if problem:
      raise OSError(f"{refuse}: {problem}; {_UNSAFE_FIX}")
    size, digest = _digest(fd)
    if (size, digest) != (int(manifest["size"]), manifest["sha256"]):
      raise OSError(failed_build(lib) or (
          f"{refuse}: its contents ({size} bytes, SHA-256 {digest[:12]}...) differ from "
          f"what its build recorded ({manifest['size']} bytes, "
          f"{str(manifest['sha256'])[:12]}...): corrupt, empty or replaced; rebuild it with "
          f"{BUILD}"))
    proc_fd = f"/proc/self/fd/{fd}"
    yield proc_fd if os.path.exists(proc_fd) else str(lib)
  finally:
    os.close(fd)


def is_verified(lib: Path) -> bool:
  try:
    with verified_library(lib):
      return True
  except OSError:
    return False


@contextlib.contextmanager
def build_lock(directory: Path):
  """Creates the tag directory (private) if needed, checks it, and holds an exclusive
  lock on it: concurrent builds of one tag run one after the other."""
  try:
    os.makedirs(directory, mode=0o700, exist_ok=True)
  except OSError as e:
    raise OSError(f"cannot create the kernel cache {directory} ({e.strerror}); point "
                  "VDMREP_KERNEL_CACHE at a writable directory") from None
  problem = location_problem(directory)
  if problem:
    raise OSError(f"not building into {directory}: {problem}; {_UNSAFE_FIX}")
  fd = os.open(directory / ".build.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def install(built: str, lib: Path, command: list[str]) -> None:
  """Records `built`'s size and digest in the manifest, then renames it to `lib`
  (under build_lock: the manifest and library change together)."""
  fd = os.open(built, os.O_RDONLY | os.O_CLOEXEC)
  try:
    size, digest = _digest(fd)
  finally:
    os.close(fd)
  os.chmod(built, 0o700)
  manifest = {"library": LIBRARY, "size": size, "sha256": digest, "uid": os.geteuid(),
              "command": command}
  fd, tmp = tempfile.mkstemp(suffix=".json", dir=lib.parent)
  with os.fdopen(fd, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, lib.parent / MANIFEST)
  os.replace(built, lib)
  with contextlib.suppress(FileNotFoundError):
    os.unlink(lib.parent / FAILED)


def record_failure(lib: Path, summary: str, command: list[str], output: str) -> None:
  """Writes build-failed.log (first line: `summary`); best effort."""
  with contextlib.suppress(OSError):
    (lib.parent / FAILED).write_text(f"{summary}\n$ {' '.join(command)}\n{output}")
