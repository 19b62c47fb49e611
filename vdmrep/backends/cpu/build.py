"""Compiles the CPU kernels: python -m vdmrep.backends.cpu.build [--force]

Needs a C++17 compiler ($CXX, a command line, default g++) and the `cpu` extra
(pip install -e '.[cpu]'). Builds only when the cache holds no verified library for
these sources (--force: always), records the library's digest for libcache.py's check,
and prints its path; exits 1 with the reason (first line) and the compiler's output
when it cannot build.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from vdmrep.backends.cpu import kernels, libcache


def _compiler() -> list[str]:
  """$CXX as a command line ("ccache g++" is two words), default g++."""
  cxx = os.environ.get("CXX") or "g++"
  try:
    words = shlex.split(cxx)
  except ValueError as e:
    raise OSError(f"CXX={cxx!r} is not a valid command line ({e})") from None
  if not words:
    raise OSError(f"CXX={cxx!r} names no compiler")
  return words


def build(force: bool = False) -> Path:
  """Compiles the library unless a verified one is there; returns its path.

  A library that fails `libcache.verified_library` (empty, corrupt, no manifest) is
  rebuilt; `force` rebuilds regardless. Raises OSError: the first line says why, the
  compiler's output follows; the failure is also recorded in the cache (build-failed.log)
  so that later runs report it in one line.
  """
  prefix = kernels.onednn_prefix()
  lib_path = kernels.library_path()
  with libcache.build_lock(lib_path.parent):
    if not force and libcache.is_verified(lib_path):
      return lib_path
    # -fopenmp: the kernels' threads and `omp simd` loops (the same libgomp oneDNN uses);
    # -march=native: their vectorised loops (the cache tag includes the CPU).
    cmd = [*_compiler(), "-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared",
           "-fPIC", *map(str, kernels.SOURCES), "-I", jax.ffi.include_dir(),
           "-I", str(prefix / "include"), "-L", str(prefix / "lib"), "-ldnnl",
           f"-Wl,-rpath,{prefix / 'lib'}", "-o"]
    # Build to a private name, then rename: no process ever loads a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
    os.close(fd)
    try:
      try:
        proc = subprocess.run(cmd + [tmp], capture_output=True, text=True)
      except OSError as e:  # no such compiler, not executable
        summary = f"cannot run the C++ compiler {cmd[0]!r} ({e.strerror})"
        libcache.record_failure(lib_path, summary, cmd, "")
        raise OSError(f"{summary}; install one or set CXX") from None
      if proc.returncode != 0:
        errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
        summary = (f"{cmd[0]} exited {proc.returncode}: "
                   f"{(errors or proc.stderr.splitlines() or ['no output'])[0][:200]}")
        libcache.record_failure(lib_path, summary, cmd, proc.stderr)
        raise OSError(f"building the CPU kernels failed ({summary})\n" + " ".join(cmd)
                      + f" {tmp}\n" + proc.stderr[-3000:])
      libcache.install(tmp, lib_path, cmd)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  return lib_path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m vdmrep.backends.cpu.build",
                              description=__doc__.splitlines()[0])
  p.add_argument("--force", action="store_true",
                 help="rebuild even if a verified library exists")
  args = p.parse_args(argv)
  try:
    path = build(force=args.force)
    kernels.load()
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"CPU kernels: {path} (Winograd: {'yes' if kernels.winograd_available() else 'no'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
