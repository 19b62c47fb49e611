"""The optional CPU backend: drop-in blocks for vdmrep.models on fused C++ kernels.

Same parameters as the plain flax blocks (a checkpoint moves freely between backends),
the same mathematics to float32 round-off, a faster CPU step. Chosen by
`config.model.backend` ("cpu", or "auto" on a single-device float32 CPU program) once
the kernels are built:

  pip install -e '.[cpu]'                # oneDNN headers and library
  python -m vdmrep.backends.cpu.build    # compiles the kernels once (g++)

The library is loaded only from a cache this user owns and no one else can write, and
only if it matches the digest its build recorded (libcache.py); otherwise one line says
why and the model runs on XLA (VDMREP_REQUIRE_CPU_KERNELS=1: a ConfigError instead).

Contents: kernels.py (the custom calls), build.py (the compiler call), libcache.py (the
cache and its checks), layers.py (the drop-in blocks), reference.py (their pure-JAX
forms), hostmem.py (glibc malloc settings and a launcher), csrc/ (C++), tests/,
benchmarks/ and README.md (method and measurements).
Importing this package loads no kernel and compiles nothing.
"""
