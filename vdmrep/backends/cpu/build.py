"""Compiles the CPU kernels: python -m vdmrep.backends.cpu.build [--force]

Needs a C++17 compiler ($CXX, a command line, default g++) and the `cpu` extra
(pip install -e '.[cpu]'). Builds only when the cache holds no verified library for
these sources (--force: always). Prints the library's path; exits 1 with the reason
(first line) and the compiler's output when it cannot build.
"""
import argparse
import sys

from vdmrep.backends.cpu import kernels


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m vdmrep.backends.cpu.build",
                              description=__doc__.splitlines()[0])
  p.add_argument("--force", action="store_true", help="rebuild even if a verified library exists")
  args = p.parse_args(argv)
  try:
    path = kernels.build(force=args.force)
    kernels.load()
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"CPU kernels: {path} (Winograd: {'yes' if kernels.winograd_available() else 'no'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
