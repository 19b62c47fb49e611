"""Whole train step with one fused CPU kernel vs the XLA form it replaced, A/B.

  python -m vdmrep.backends.cpu.benchmarks.kernel_ab --kernel attention --vdm mvdm --encoder te --repeats 11
  python -m vdmrep.backends.cpu.benchmarks.kernel_ab --kernel group_norm --vdm tvdm --encoder te
  python -m vdmrep.backends.cpu.benchmarks.kernel_ab --kernel parts --vdm tvdm --encoder te
  python -m vdmrep.backends.cpu.benchmarks.kernel_ab --kernel winograd --vdm tvdm --encoder te
  python -m vdmrep.backends.cpu.benchmarks.kernel_ab --kernel dense --vdm tvdm --encoder te
  python -m vdmrep.backends.cpu.benchmarks.kernel_ab --kernel winograd4 --vdm tvdm --encoder te
  python -m vdmrep.backends.cpu.benchmarks.kernel_ab --kernel conv_adds --vdm tvdm --encoder te

Both programs use the CPU backend (model.backend='cpu'); the second is built with
the kernel replaced while it is traced: `kernels.attention` by `reference.attention(q,
k, v, 1)` (one example per chunk, what the attention blocks ran before the kernel), or
`kernels.group_norm` by `reference.group_norm` (the folded norm in XLA); with `parts`,
the up blocks normalise and project a concatenated [h, skip] instead of the two parts;
with `winograd`, the 3x3 convolutions run oneDNN's direct convolution throughout; with
`winograd4`, Winograd's F(2x2, 3x3) instead of the default F(4x4, 3x3); with
`conv_adds`, the ResNet blocks' 3x3 convolutions leave their bias, the shortcut (its
parts' sum and bias) and the bias-gradient sums to XLA instead of the kernel; with `dense`, the per-position linear maps (the up blocks' 1x1 shortcuts, the attention
blocks' q, k, v and output projections) are XLA's dots instead of oneDNN's 1x1
convolutions.
Steps alternate
A, B, A, B, ... in one process: on this noisy VM a 10% difference survives that and is
lost between processes. The first step's metrics of both are printed side by side (same
parameters, batch and key: they must agree to float32 round-off).
"""
from __future__ import annotations

import functools
import time

import os
import sys

from benchmarks import common  # the repository's benchmarks/ (run from its root)
from benchmarks import train_step

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdmrep.backends.cpu import kernels, reference
from vdmrep.backends.cpu import layers as cpu_layers


def _joined(x):
  """A tuple of channel parts as one tensor (the U-Net's [h, skip] concatenation)."""
  return jnp.concatenate(x, axis=-1) if isinstance(x, (tuple, list)) else x


class _DenseOnConcatenation(cpu_layers.Dense):
  """Dense (same parameters) as the nn.Dense on the concatenation it replaced."""

  @nn.compact
  def __call__(self, parts, unsummed=False):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (sum(p.shape[-1] for p in parts), self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return nn.Dense(self.features, dtype=self.dtype).apply(
        {"params": {"kernel": kernel, "bias": bias}}, _joined(parts))


class _DenseInXla(cpu_layers.Dense):
  """Dense (same parameters) as XLA's dot on each part."""

  @nn.compact
  def __call__(self, parts, unsummed=False):
    parts = tuple(parts) if isinstance(parts, (tuple, list)) else (parts,)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (sum(p.shape[-1] for p in parts), self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    products, start = [], 0
    for p in parts:
      products.append(p @ kernel[start:start + p.shape[-1]])
      start += p.shape[-1]
    if unsummed:
      return tuple(products), bias
    return functools.reduce(jnp.add, products) + bias


class _ConvAddsInXla(cpu_layers.Conv3x3):
  """Conv3x3 (same parameters) with its bias and residual added by XLA after the kernel,
  as the ResNet blocks did before the kernel took them in."""

  @nn.compact
  def __call__(self, x, residual=None, extra_bias=None):
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = kernels.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1))) + bias
    if residual is None:
      return y
    parts = tuple(residual) if isinstance(residual, (tuple, list)) else (residual,)
    shortcut = functools.reduce(jnp.add, parts)
    return (shortcut if extra_bias is None else shortcut + extra_bias) + y


# --kernel -> (the baseline's name, {(owner, attribute): the form it replaced}).
BASELINES = {
    "attention": ("xla chunked",
                  {(kernels, "attention"): lambda q, k, v: reference.attention(q, k, v, 1)}),
    "group_norm": ("xla folded", {(kernels, "group_norm"):
                                  lambda x, *a, **k: reference.group_norm(_joined(x), *a, **k)}),
    # The up blocks' [h, skip] as parts (norm kernel and 1x1 shortcut read them) vs one
    # concatenated tensor (XLA merges the two identical concatenations into one).
    "parts": ("concatenated", {
        (kernels, "group_norm"): lambda x, *a, _f=kernels.group_norm, **k: _f(_joined(x), *a, **k),
        (cpu_layers, "Dense"): _DenseOnConcatenation}),
    "winograd": ("onednn direct", {(kernels, "_winograd_ok"): lambda *a: False}),
    "winograd4": ("winograd F(2x2)", {(kernels, "WINOGRAD_DEFAULT_TILE"): 2}),
    "conv_adds": ("adds in xla", {(cpu_layers, "Conv3x3"): _ConvAddsInXla}),
    "dense": ("xla dot", {(cpu_layers, "Dense"): _DenseInXla}),
}


def main():
  p = common.step_parser(__doc__)
  p.add_argument("--kernel", choices=sorted(BASELINES), default="attention")
  p.add_argument("--repeats", type=int, default=9)
  args = p.parse_args()
  if kernels.unavailable_reason():
    p.error(f"the kernels cannot run here: {kernels.unavailable_reason()}")
  baseline_name, patches = BASELINES[args.kernel]
  built = {}
  for name in ("kernel", baseline_name):
    saved = {key: getattr(*key) for key in patches}
    if name != "kernel":
      for (owner, attr), fn in patches.items():  # read when the model is traced (build())
        setattr(owner, attr, fn)
    try:
      _, compiled, state, x, key = train_step.build(args.vdm, args.encoder, args.batch,
                                                    args.image, backend="cpu")
    finally:
      for (owner, attr), fn in saved.items():
        setattr(owner, attr, fn)
    built[name] = [compiled, state, x, key]
  print(f"hardware: {common.hardware()}; {common.load_note()}")
  times, first = {n: [] for n in built}, {}
  for r in range(args.repeats + 1):
    for name, b in built.items():
      t = time.perf_counter()
      b[1], metrics = b[0](b[1], b[2], b[3])  # the state is donated: thread it through
      jax.block_until_ready(metrics)
      if r:
        times[name].append(time.perf_counter() - t)
      else:
        first[name] = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
  print(f"\n{args.vdm} + {args.encoder}, batch {args.batch}, {args.image}x{args.image}, "
        f"float32, CPU backend, {args.repeats} steps each, alternating:")
  for name, ts in times.items():
    med, lo, hi = common.summary(ts)
    fmt = common.fmt_s
    print(f"  {args.kernel} {name}: {fmt(med)} s/step ({fmt(lo)}..{fmt(hi)})")
  a, b = first["kernel"], first[baseline_name]
  for k in ("loss_bpd", "diffusion_bpd", "kl_nats", "grad_norm"):
    if k in a and k in b:
      print(f"  first step {k}: {a[k]:.7g} vs {b[k]:.7g}")
  print(f"after: {common.load_note()}")


if __name__ == "__main__":
  main()
