"""GroupNorm + swish (and the conditioning add before it), three exact forms: flax's
nn.GroupNorm with separate ops (the plain model), the folded `reference.group_norm` in
XLA and the fused kernel (the CPU backend's GroupNorm). Forward and
forward + backward (gradients for x, scale, bias, shift) timed alone.

  python -m vdmrep.backends.cpu.benchmarks.gn_forms --batch 64 --image 28 --channels 32,64

Why it exists: after the oneDNN convolutions, GroupNorm / swish / add fusions were
about half of a ResNet block's time (figures: the backend's README.md); this is the
evidence for the folded form. Alone it is what to expect inside a model only where each block's output
is materialised (`kernels.materialize`; the backend's README.md has the whole-step figures).
Each form's output is checked against flax's before it is timed.
"""
from __future__ import annotations

import argparse

import os
import sys

from benchmarks import common  # the repository's benchmarks/ (run from its root)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdmrep.backends.cpu import kernels
from vdmrep.backends.cpu.reference import group_norm
from vdmrep.models.layers import num_groups


def flax_form(x, scale, bias, shift):
  g = num_groups(x.shape[-1])
  y = nn.GroupNorm(g, epsilon=1e-6).apply({"params": {"scale": scale, "bias": bias}},
                                          x + shift[:, None, None, :])
  return nn.swish(y)


def folded_form(x, scale, bias, shift):
  return group_norm(x, scale, bias, num_groups(x.shape[-1]), 1e-6, shift=shift, swish=True)


def kernel_form(x, scale, bias, shift):
  return kernels.group_norm(x, scale, bias, num_groups(x.shape[-1]), 1e-6, shift=shift,
                           swish=True)


FORMS = {"flax GroupNorm + add + swish": flax_form,
         "folded (reference.group_norm)": folded_form, "fused kernel (kernels.group_norm)": kernel_form}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--channels", default="32,64")
  p.add_argument("--repeats", type=int, default=15)
  args = p.parse_args()
  print(f"hardware: {common.hardware()}; {common.load_note()}\n")
  print("| channels | form | fwd ms | fwd+bwd ms | MB per activation |")
  print("|---|---|---|---|---|")
  for c in map(int, args.channels.split(",")):
    ks = jax.random.split(jax.random.key(0), 5)
    x = 2.0 * jax.random.normal(ks[0], (args.batch, args.image, args.image, c)) + 0.5
    scale = 1.0 + 0.1 * jax.random.normal(ks[1], (c,))
    bias = 0.1 * jax.random.normal(ks[2], (c,))
    shift = jax.random.normal(ks[3], (args.batch, c))
    probe = jax.random.normal(ks[4], x.shape)
    ref = jax.jit(flax_form)(x, scale, bias, shift)
    for name, f in FORMS.items():
      np.testing.assert_allclose(jax.jit(f)(x, scale, bias, shift), ref, rtol=0, atol=1e-5)
      t = lambda fn, *a: common.summary(common.time_fn(jax.jit(fn), *a,
                                                       repeats=args.repeats))[0]
      fwd = t(f, x, scale, bias, shift)
      both = t(jax.grad(lambda *a: jnp.sum(f(*a) * probe), argnums=(0, 1, 2, 3)),
               x, scale, bias, shift)
      print(f"| {c} | {name} | {1e3 * fwd:.2f} | {1e3 * both:.2f} | {x.nbytes / 2**20:.1f} |",
            flush=True)


if __name__ == "__main__":
  main()
