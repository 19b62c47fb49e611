"""One 3x3 SAME convolution, seven exact forms: XLA's convolution, oneDNN's direct one
(a custom call of kernels.py), the Winograd kernels of kernels.py, F(4x4, 3x3)
(1/4 of the multiply-adds; the model's choice on CPU where it applies) and F(2x2, 3x3)
(4/9), im2col + one matmul, 9 shifted matmuls, and Winograd F(2x2, 3x3) written in XLA. Forward, input
gradient and filter gradient timed alone; GFLOP/s counts the direct form's FLOPs.

  python -m vdmrep.backends.cpu.benchmarks.conv_forms --batch 64 --image 28 --channels 16:16,32:32,64:32

Why it exists: the score network is almost only such convolutions, and this is the
evidence for which form the model uses (the Winograd kernel or oneDNN's on CPU, else
XLA's; see the backend's README.md). Each form's output is checked against XLA's before it
is timed. The kernel rows are left out (with a note) where they cannot be built.
"""
from __future__ import annotations

import argparse

import os
import sys

from benchmarks import common  # the repository's benchmarks/ (run from its root)

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vdmrep.backends.cpu import kernels


def conv_xla(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x, k):
  """Concatenate the 9 shifted views on the channel axis, then one [BHW, 9C] x [9C, O]."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
  return cols @ k.reshape(-1, k.shape[-1])


def conv_shifted(x, k):
  """Sum over the 9 taps of (shifted view) @ k[i, j]."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(xp[:, i:i + h, j:j + w] @ k[i, j] for i in range(3) for j in range(3))


def conv_onednn(x, k):
  return kernels.conv2d(x, k, (1, 1), ((1, 1), (1, 1)), winograd=False)


def conv_winograd_kernel(x, k, tile=4):
  return kernels.conv2d(x, k, (1, 1), ((1, 1), (1, 1)), winograd=tile)


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): out = A^T [(G k G^T) * (B^T d B)] A per
# 4x4 input tile d and 2x2 output tile; 16 matmuls of [tiles, C] x [C, O] do 4/9 of the
# direct form's multiply-adds. Exact in real arithmetic (float error ~3e-7 here).
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(rows, xs):
  """[sum_c rows[r][c] * xs[c] for r]: the 0/+-1 transforms as adds, not matmuls."""
  out = []
  for row in rows:
    terms = [v if c == 1 else -v for c, v in zip(row, xs) if c != 0]
    out.append(sum(terms[1:], terms[0]))
  return out


def conv_winograd(x, k):
  """Winograd F(2x2, 3x3), SAME padding; needs even height and width."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  d = [[xp[:, i:i + h:2, j:j + w:2] for j in range(4)] for i in range(4)]  # [B,h/2,w/2,C]
  cols = [_combine(_BT, [d[i][j] for i in range(4)]) for j in range(4)]   # (B^T d)[i][j]
  v = jnp.stack([jnp.stack(_combine(_BT, [cols[j][i] for j in range(4)])) for i in range(4)])
  u = jnp.einsum("ia,abco,jb->ijco", _G, k, _G).reshape(16, c, -1)
  # 16 plain [tiles, C] x [C, O] matmuls (a 6-d einsum here is slower in fwd+bwd).
  m = jnp.matmul(v.reshape(16, -1, c), u).reshape(4, 4, b, h // 2, w // 2, -1)
  rows = [_combine(_AT, [m[i, j] for i in range(4)]) for j in range(4)]   # (A^T m)[p][j]
  y = [jnp.stack(_combine(_AT, [rows[j][p] for j in range(4)]), -2) for p in range(2)]
  return jnp.stack(y, 2).reshape(b, h, w, k.shape[-1])  # [B, h/2, 2, w/2, 2, O]


WINOGRAD_KERNELS = ("winograd kernel F(4x4)", "winograd kernel F(2x2)")
FORMS = {"xla": conv_xla, "onednn": conv_onednn, WINOGRAD_KERNELS[0]: conv_winograd_kernel,
         WINOGRAD_KERNELS[1]: lambda x, k: conv_winograd_kernel(x, k, 2),
         "im2col": conv_im2col, "9 shifted matmuls": conv_shifted,
         "winograd F(2x2,3x3) in XLA": conv_winograd}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--channels", default="16:16,32:32,64:32", help="in:out pairs")
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args()
  peak = common.matmul_peak()
  print(f"hardware: {common.hardware()}; {common.load_note()}")
  print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s\n")
  forms = dict(FORMS)
  if (reason := kernels.unavailable_reason()) is not None:
    print(f"(no oneDNN row: {reason.splitlines()[0]})\n")
    for name in ("onednn",) + WINOGRAD_KERNELS:
      del forms[name]
  elif not kernels.winograd_available():
    print("(no Winograd kernel rows: they need AVX-512)\n")
    for name in WINOGRAD_KERNELS:
      del forms[name]
  print("| in -> out ch | form | fwd ms | d input ms | d filter ms | fwd+bwd ms | GFLOP/s fwd+bwd |")
  print("|---|---|---|---|---|---|---|")
  for pair in args.channels.split(","):
    cin, cout = map(int, pair.split(":"))
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch, args.image, args.image, cin))
    k = jax.random.normal(kk, (3, 3, cin, cout)) * (9 * cin) ** -0.5
    g = jax.random.normal(kg, (args.batch, args.image, args.image, cout))
    flops = 2.0 * x.size // cin * 9 * cin * cout  # one pass; fwd + bwd = 3 passes
    ref = conv_xla(x, k)
    for name, f in forms.items():
      np.testing.assert_allclose(jax.jit(f)(x, k), ref, rtol=1e-4, atol=1e-4)
      t = lambda fn, *a: common.summary(common.time_fn(jax.jit(fn), *a,
                                                       repeats=args.repeats))[0]
      fwd = t(f, x, k)
      dx = t(lambda g: jax.vjp(lambda x: f(x, k), x)[1](g), g)
      dk = t(lambda g: jax.vjp(lambda k: f(x, k), k)[1](g), g)
      # The squared loss needs the forward output, so all three passes run.
      both = t(jax.grad(lambda x, k: jnp.sum(jnp.square(f(x, k))), argnums=(0, 1)), x, k)
      print(f"| {cin} -> {cout} | {name} | {1e3 * fwd:.1f} | {1e3 * dx:.1f} | {1e3 * dk:.1f} "
            f"| {1e3 * both:.1f} | {3 * flops / both / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
  main()
