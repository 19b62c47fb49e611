"""The attention core softmax(q k^T / sqrt(C)) v alone: one-shot (plain autodiff),
example-chunked (`reference.attention`'s custom VJP) and the fused CPU kernel
(`kernels.attention`, what the CPU backend runs), forward and forward + backward.

  python -m vdmrep.backends.cpu.benchmarks.attention_forms --batch 64 --positions 784 --channels 16,32 --chunks 0,1,2,4,kernel
  git show REV:vdmrep/models/layers.py > old_layers.py
  python -m vdmrep.backends.cpu.benchmarks.attention_forms --chunks 1 --against old_layers.py

`--against FILE` times another version of vdmrep/models/layers.py beside the current
one, alternating call by call in one process: on a noisy VM, differences of ~10% are
visible that way and lost between processes.

Why it exists: the two 784-position attention blocks (encoder and score net) are a
fifth of the TVDM+TE step and most of the non-convolution time at MVDM size; this
times their core without the GroupNorm and projections around it. Every chunked
form's output and gradients are checked against the one-shot form before it is timed.
GFLOP/s counts the matmuls only (forward 2, forward + backward 7 with the chunked
form's recomputed logits, 6 for the one-shot form's stored weights).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import os
import sys

from benchmarks import common  # the repository's benchmarks/ (run from its root)

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep.backends.cpu import kernels
from vdmrep.backends.cpu import reference as layers


def load_layers(path: str):
  """Another version of vdmrep/models/layers.py as a module (for --against)."""
  spec = importlib.util.spec_from_file_location("layers_against", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclass transform looks the module up
  spec.loader.exec_module(module)
  return module


def interleaved(fns, args, repeats):
  """{name: fn} -> {name: median seconds}, calling the functions in turn each round."""
  for fn in fns.values():
    common.block(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(common.time_fn(fn, *args, repeats=1, warmup=0)[0])
  return {name: common.summary(ts)[0] for name, ts in times.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--positions", type=int, default=784)
  p.add_argument("--channels", default="16,32")
  p.add_argument("--chunks", default="0,1,2,4,kernel",
                 help="examples per chunk; 0 = the whole batch at once (plain autodiff); "
                      "'kernel' = the fused oneDNN kernel")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--against", default="", help="another layers.py to time alongside")
  args = p.parse_args()
  b, n = args.batch, args.positions
  layer_versions = {"current": layers.attention}
  if args.against:
    layer_versions["--against"] = load_layers(args.against).attention
  kernel = {"onednn kernel": lambda q, k, v, g: kernels.attention(q, k, v)}
  if "kernel" in args.chunks.split(",") and kernels.unavailable_reason():
    p.error(f"--chunks kernel: {kernels.unavailable_reason()}")
  print(f"hardware: {common.hardware()}; {common.load_note()}\n")
  print("| channels | chunk | version | fwd ms | fwd+bwd ms | GFLOP/s fwd+bwd (matmuls) |")
  print("|---|---|---|---|---|---|")
  for c in map(int, args.channels.split(",")):
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (b, n, c)) for kk in ks[:3])
    probe = jax.random.normal(ks[3], (b, n, c))
    matmul = 2.0 * b * n * n * c  # one [N, N] x [N, C] product per example
    ref = None
    for chunk in args.chunks.split(","):
      g = -1 if chunk == "kernel" else int(chunk)
      versions = kernel if chunk == "kernel" else layer_versions
      fwd, both = {}, {}
      for name, attention in versions.items():
        fwd[name] = jax.jit(lambda q, k, v, f=attention, g=g: f(q, k, v, g))
        both[name] = jax.jit(jax.grad(
            lambda q, k, v, f=attention, g=g: jnp.sum(f(q, k, v, g) * probe),
            argnums=(0, 1, 2)))
        res = (fwd[name](q, k, v),) + tuple(both[name](q, k, v))
        if ref is None:
          ref = res
        for a, r in zip(res, ref):
          np.testing.assert_allclose(a, r, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(r))))
      t_fwd = interleaved(fwd, (q, k, v), args.repeats)
      t_both = interleaved(both, (q, k, v), args.repeats)
      one_shot = chunk != "kernel" and (g == 0 or g >= b or b % g)  # stored weights
      count = 6 if one_shot else 7  # chunked and kernel recompute the logits
      for name in versions:
        print(f"| {c} | {chunk} | {name} | {1e3 * t_fwd[name]:.1f} | {1e3 * t_both[name]:.1f} | "
              f"{count * matmul / t_both[name] / 1e9:.1f} |", flush=True)

if __name__ == "__main__":
  main()
