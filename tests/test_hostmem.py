"""vdmrep.hostmem: the glibc tunable is composed correctly, and re-executing with it
really turns a large malloc's 4 KiB page faults into huge-page faults."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from vdmrep import hostmem


def test_huge_page_env_composition():
  assert hostmem.huge_page_env({}, "madvise")["GLIBC_TUNABLES"] == hostmem.TUNABLE
  other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"}
  env = hostmem.huge_page_env(other, "always")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hostmem.TUNABLE
  assert env["PATH"] == "/bin" and other["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
  # Nothing to do: already set (any value), opted out, or no THP on request.
  assert hostmem.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise") is None
  assert hostmem.huge_page_env({"VDMREP_HUGE_PAGES": "0"}, "madvise") is None
  assert hostmem.huge_page_env({}, "never") is None
  assert hostmem.huge_page_env({}, None) is None


def test_thp_mode_parses_the_kernel_file(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hostmem.thp_mode(str(f)) == "madvise"
  assert hostmem.thp_mode(str(tmp_path / "missing")) is None


# Re-executes itself (the command line survives: it prints its argument), then
# mallocs and touches 256 MiB and prints the tunable and the minor page faults taken.
_PROBE = textwrap.dedent("""
    import ctypes, os, resource, sys
    from vdmrep import hostmem
    hostmem.reexec_with_huge_pages()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    size = 256 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(libc.malloc(size), 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(sys.argv[1], os.environ.get("GLIBC_TUNABLES", ""), faults)
    """)


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc"
                    or hostmem.thp_mode() not in ("always", "madvise"),
                    reason="needs Linux, glibc and transparent huge pages on request")
def test_reexec_gives_huge_pages_to_large_mallocs():
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "VDMREP_HUGE_PAGES")}
  runs = {}
  for name, extra in (("on", {}), ("off", {"VDMREP_HUGE_PAGES": "0"})):
    out = subprocess.run([sys.executable, "-c", _PROBE, f"arg-{name}"],
                         env={**env, **extra}, capture_output=True, text=True, check=True)
    arg, *rest = out.stdout.split()
    assert arg == f"arg-{name}"
    runs[name] = (rest[0] if len(rest) == 2 else "", int(rest[-1]))
  assert runs["on"][0] == hostmem.TUNABLE and runs["off"][0] == ""
  # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB pages, 128 (plus a few).
  assert runs["off"][1] > 60_000
  assert runs["on"][1] < 6_000, runs
