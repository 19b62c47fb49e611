"""Compiles the CPU kernels: python -m vdmrep.backends.cpu.build

Needs a C++17 compiler ($CXX, default g++) and the `cpu` extra (pip install -e '.[cpu]').
Prints the library's path; exits 1 with the reason when it cannot build.
"""
import sys

from vdmrep.backends.cpu import kernels


def main() -> int:
  try:
    path = kernels.build()
    kernels.load()
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"CPU kernels: {path} (Winograd: {'yes' if kernels.winograd_available() else 'no'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
