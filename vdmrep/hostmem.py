"""Transparent huge pages for XLA's per-step CPU buffers (glibc's `malloc.hugetlb`).

Why: XLA's CPU runtime allocates every execution's temporaries with malloc (1.26 GiB
for a TVDM+TE train step at batch 64, 445 MiB at MVDM+TE), and glibc serves sizes that
large with a fresh mmap each time, so every step first-touches them 4 KiB page by
page: 322,000 minor page faults per TVDM+TE step. With
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 malloc asks the kernel for transparent huge
pages (madvise) and the faults fall to ~1,000-2,500 per step (2 MiB pages). On the
2-core CPU, processes alternating on / off: MVDM+TE 0.44-0.50 vs 0.54-0.55 s per step,
TVDM+TE 1.35-1.88 vs 1.76-1.77 s; same numbers out (benchmarks/README.md, "Huge pages").

glibc reads its tunables when the process starts, so entry points (`vdmrep.main`, the
benchmark scripts) call `reexec_with_huge_pages()` first: it re-executes the same
command line with the tunable added, once. Code that imports vdmrep as a library gets
the same by starting Python with the variable set. VDMREP_HUGE_PAGES=0 turns it off.
No jax import here: this runs before anything heavy is loaded.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None."""
  try:
    text = open(path).read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def huge_page_env(env: dict, thp: str | None) -> dict | None:
  """`env` with TUNABLE appended to GLIBC_TUNABLES (others kept), or None when there is
  nothing to do: opted out (VDMREP_HUGE_PAGES=0), hugetlb already set (either value),
  or the kernel gives no transparent huge pages on request (`thp` not always/madvise)."""
  if env.get("VDMREP_HUGE_PAGES") == "0" or thp not in ("always", "madvise"):
    return None
  tunables = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  return dict(env, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)


def reexec_with_huge_pages() -> None:
  """Re-executes this process (same interpreter and command line, `sys.orig_argv`) with
  TUNABLE set, if it applies (Linux with glibc, see `huge_page_env`); else returns.
  Call it first thing in a program's entry point, never from library code."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return
  env = huge_page_env(dict(os.environ), thp_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
