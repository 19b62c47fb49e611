"""hostmem.py: the glibc tunables are composed correctly, and re-executing with them
really turns a large malloc's 4 KiB page faults into huge-page faults and lets a thread
that frees and mallocs the same size again reuse the pages (no faults the second time)."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from vdmrep.backends.cpu import hostmem


def test_tunable_env_composition():
  assert hostmem.tunable_env({}, "madvise")["GLIBC_TUNABLES"] == hostmem.TUNABLES
  # No huge pages on request: the memory-keeping tunables only.
  assert hostmem.tunable_env({}, "never")["GLIBC_TUNABLES"] == ":".join(hostmem.KEEP_MEMORY)
  assert hostmem.tunable_env({}, None)["GLIBC_TUNABLES"] == ":".join(hostmem.KEEP_MEMORY)
  # The caller's own tunables are kept, and win over ours of the same name.
  other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0",
           "PATH": "/bin"}
  env = hostmem.tunable_env(other, "always")
  assert env["GLIBC_TUNABLES"] == (
      "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1:"
      "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736")
  assert env["PATH"] == "/bin" and other["GLIBC_TUNABLES"].startswith("glibc.malloc.arena_max=2")
  # Nothing to do: all already set (any values; so a re-executed process stops), opted out.
  assert hostmem.tunable_env({"GLIBC_TUNABLES": hostmem.TUNABLES}, "madvise") is None
  assert hostmem.tunable_env({"GLIBC_TUNABLES": ":".join(hostmem.KEEP_MEMORY)}, "never") is None
  assert hostmem.tunable_env({"VDMREP_MALLOC_TUNABLES": "0"}, "madvise") is None


def test_thp_mode_parses_the_kernel_file(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hostmem.thp_mode(str(f)) == "madvise"
  assert hostmem.thp_mode(str(tmp_path / "missing")) is None


# Re-executes itself (the command line survives: it prints its argument), then, on a
# second thread (XLA's runtime allocates on its worker threads), mallocs and touches 256
# MiB, frees it, mallocs and touches it again, and prints the tunables and the minor
# page faults each time took.
_PROBE = textwrap.dedent("""
    import ctypes, os, resource, sys, threading
    from vdmrep.backends.cpu import hostmem
    hostmem.reexec_with_malloc_tunables()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 256 << 20, []
    def work():
      for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(p)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(sys.argv[1], os.environ.get("GLIBC_TUNABLES", "-"), *faults)
    """)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc"
                    or hostmem.thp_mode() not in ("always", "madvise"),
                    reason="needs Linux, glibc and transparent huge pages on request")
def test_reexec_gives_huge_pages_and_keeps_them():
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "VDMREP_MALLOC_TUNABLES")}
  runs = {}
  for name, extra in (("on", {}), ("off", {"VDMREP_MALLOC_TUNABLES": "0"})):
    out = subprocess.run([sys.executable, "-c", _PROBE, f"arg-{name}"],
                         env={**env, **extra}, capture_output=True, text=True, check=True)
    arg, tunables, first, second = out.stdout.split()
    assert arg == f"arg-{name}"
    runs[name] = (tunables, int(first), int(second))
  assert runs["on"][0] == hostmem.TUNABLES and runs["off"][0] == "-"
  # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB pages, 128 (plus a few).
  assert runs["off"][1] > 60_000 and runs["off"][2] > 60_000  # unmapped and mapped anew
  assert runs["on"][1] < 6_000, runs
  assert runs["on"][2] < 100, runs  # the same pages again
