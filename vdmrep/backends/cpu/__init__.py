"""The optional CPU backend: drop-in blocks for vdmrep.models on fused C++ kernels.

Same parameters as the plain flax blocks (a checkpoint moves freely between backends),
the same mathematics to float32 round-off, a faster CPU step. Chosen by
`config.model.backend` ("cpu", or "auto" on a single-device float32 CPU program) once
the kernels are built:

  pip install -e '.[cpu]'                # oneDNN headers and library
  python -m vdmrep.backends.cpu.build    # compiles the kernels once (g++)

Contents: kernels.py (the custom calls), layers.py (the drop-in blocks), reference.py
(their pure-JAX forms), hostmem.py (glibc malloc settings and a launcher), csrc/ (C++),
tests/, benchmarks/ and README.md (method and measurements).
Importing this package loads no kernel and compiles nothing.
"""
