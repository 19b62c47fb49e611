"""Effect of bf16 compute on the loss: the same parameters and batch, f32 vs bf16.

  python -m benchmarks.precision --vdm tvdm --encoder te --batch 64 --image 28

Parameters are the initialisation plus N(0, 0.02^2) noise (so the zero-initialised
output layers do something), the batch is MNIST (idx source) if present, else
uniform noise; the same PRNG key draws (w, z_0, t, eps). Prints each ELBO term
(bits/dim, batch mean) in f32 and bf16 and the relative difference of the gradient.
"""
from __future__ import annotations

import argparse
import math

from benchmarks import common

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import config_lib
from vdmrep import data as data_lib
from data_pipeline import _source_default
from vdmrep.models import build_model


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vdm", default="tvdm")
  p.add_argument("--encoder", default="te")
  p.add_argument("--batch", type=int, default=64)
  args = p.parse_args()
  config = config_lib.base_config()
  config.model.vdm, config.model.encoder = args.vdm, args.encoder
  config.data.source = _source_default()
  x = jnp.asarray(data_lib.load(config.data).train_images[:args.batch])
  num_dims = int(np.prod(x.shape[1:]))
  out = {}
  params = None
  for dtype in ("float32", "bfloat16"):
    config.model.compute_dtype = dtype
    model = build_model(config.model)
    if params is None:
      params = model.init(jax.random.key(0), x.shape[1:])
      leaves, tree = jax.tree.flatten(params)
      keys = jax.random.split(jax.random.key(1), len(leaves))
      params = jax.tree.unflatten(tree, [l + 0.02 * jax.random.normal(k, l.shape)
                                         for l, k in zip(leaves, keys)])

    def loss(p):
      t = model.elbo_terms(p, x, jax.random.key(2))
      means = {k: jnp.mean(v) / (num_dims * math.log(2)) for k, v in t.bound_terms().items()}
      return sum(means.values()), means
    (total, means), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    out[dtype] = (float(total), {k: float(v) for k, v in means.items()}, grads)
  g32, g16 = out["float32"][2], out["bfloat16"][2]
  num = math.sqrt(sum(float(jnp.sum(jnp.square(a - b))) for a, b in
                      zip(jax.tree.leaves(g32), jax.tree.leaves(g16))))
  den = math.sqrt(sum(float(jnp.sum(jnp.square(a))) for a in jax.tree.leaves(g32)))
  print(f"{args.vdm}+{args.encoder}, batch {args.batch} of {config.data.source}\n")
  print("| compute | total bpd | recon | prior | diffusion | kl |\n|---|---|---|---|---|---|")
  for dtype in ("float32", "bfloat16"):
    total, m, _ = out[dtype]
    print(f"| {dtype} | {total:.5f} | " + " | ".join(f"{v:.5f}" for v in m.values()) + " |")
  print(f"\n|loss_bf16 - loss_f32| / loss_f32 = "
        f"{abs(out['bfloat16'][0] - out['float32'][0]) / abs(out['float32'][0]):.2e}; "
        f"||grad_bf16 - grad_f32|| / ||grad_f32|| = {num / den:.2e}")


if __name__ == "__main__":
  main()
