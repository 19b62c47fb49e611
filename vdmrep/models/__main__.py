"""Prints the parameter count of every named VDM and encoder size.

  python -m vdmrep.models [--height 28 --width 28 --channels 1] [--conditioning additive]
"""
import argparse

import jax
import jax.numpy as jnp

from vdmrep.config_lib import base_config
from vdmrep.models import ENCODER_SIZES, VDM_SIZES, build_model


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--height", type=int, default=28)
  p.add_argument("--width", type=int, default=28)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--conditioning", default="additive")
  a = p.parse_args()
  shape = (a.height, a.width, a.channels)
  encoders = list(ENCODER_SIZES) + ["none"]
  print(f"Parameters on {a.height}x{a.width}x{a.channels} images "
        f"({a.conditioning} conditioning); score net counts include the latent projection.\n")
  print("| VDM \\ encoder | " + " | ".join(encoders) + " |")
  print("|---" * (len(encoders) + 1) + "|")
  enc_counts = {}
  for vdm in VDM_SIZES:
    row = []
    for enc in encoders:
      c = base_config().model
      c.vdm, c.encoder, c.conditioning = vdm, enc, a.conditioning
      shapes = jax.eval_shape(lambda k: build_model(c, shape).init(k, shape), jax.random.key(0))
      if enc != "none":
        enc_counts[enc] = count(shapes["encoder"])
      row.append(f"{count(shapes['score']):,}")
    print(f"| {vdm} score net | " + " | ".join(row) + " |")
  print("| encoder | " + " | ".join(f"{enc_counts.get(e, 0):,}" for e in encoders) + " |")


if __name__ == "__main__":
  main()
