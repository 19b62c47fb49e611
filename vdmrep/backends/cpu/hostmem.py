"""glibc malloc settings for XLA's per-step CPU buffers: huge pages, kept between steps.

Why: XLA's CPU runtime allocates every execution's temporaries with malloc (hundreds of
MiB for a train step), and glibc serves sizes that large with a fresh mmap each time and
unmaps them after: every step the kernel hands out and zeroes new pages. Two changes,
as GLIBC_TUNABLES (read when the process starts):
  * glibc.malloc.hugetlb=1: malloc asks for transparent huge pages (madvise), so the
    first touch takes 2 MiB per fault instead of 4 KiB: far fewer minor page faults
    per step.
  * glibc.malloc.arena_max=1, mmap_max=0, trim_threshold=64 GiB: every thread allocates
    from the main heap (a thread's own arena maps any block over 64 MiB afresh whatever
    mmap_max says), large blocks come from it rather than from mmap, and freed memory
    is never given back, so the next step reuses the same pages: no page faults and no
    zeroing at all after the first step. The price: the process keeps its peak heap
    until it exits.
Measurements (page faults and step times, on and off): the backend's README.md.
Use them by starting the process with them (the library never re-executes anything):

  python -m vdmrep.backends.cpu.hostmem python -m vdmrep.main --config ... --workdir ...
  GLIBC_TUNABLES=$(python -m vdmrep.backends.cpu.hostmem --print) python ...

The benchmark scripts call `reexec_with_malloc_tunables()` first (it re-executes the same
command line with the tunables added, once). VDMREP_MALLOC_TUNABLES=0 turns both off.
No jax import here: this runs before anything heavy is loaded.
"""
from __future__ import annotations

import os
import platform
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"
KEEP_MEMORY = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
               "glibc.malloc.trim_threshold=68719476736")
TUNABLES = ":".join((HUGE_PAGES,) + KEEP_MEMORY)  # GLIBC_TUNABLES's syntax
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None."""
  try:
    text = open(path).read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def tunable_env(env: dict, thp: str | None) -> dict | None:
  """`env` with our tunables appended to GLIBC_TUNABLES, or None when there is nothing to
  do. A tunable the caller already set (any value) is left as it is; huge pages only
  where the kernel gives them on request (`thp` always/madvise); nothing at all when
  opted out (VDMREP_MALLOC_TUNABLES=0)."""
  if env.get("VDMREP_MALLOC_TUNABLES") == "0":
    return None
  have = env.get("GLIBC_TUNABLES", "")
  names = {t.split("=")[0] for t in have.split(":") if t}
  ours = ((HUGE_PAGES,) if thp in ("always", "madvise") else ()) + KEEP_MEMORY
  add = [t for t in ours if t.split("=")[0] not in names]
  if not add:
    return None
  return dict(env, GLIBC_TUNABLES=":".join(([have] if have else []) + add))


def reexec_with_malloc_tunables() -> None:
  """Re-executes this process (same interpreter and command line, `sys.orig_argv`) with
  the tunables set, if any applies (Linux with glibc, see `tunable_env`); else returns.
  Call it first thing in a program's entry point, never from library code."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return
  env = tunable_env(dict(os.environ), thp_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main(argv: list[str]) -> int:
  """`--print`: the tunables for this machine; else runs argv with them (exec)."""
  if argv == ["--print"]:
    env = tunable_env({}, thp_mode())
    print((env or {}).get("GLIBC_TUNABLES", ""))
    return 0
  if not argv or argv[0].startswith("-"):
    print(__doc__, file=sys.stderr)
    return 2
  env = dict(os.environ)
  if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
    env = tunable_env(env, thp_mode()) or env
  sys.stdout.flush()
  os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
