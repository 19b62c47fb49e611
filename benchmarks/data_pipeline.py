"""The data pipeline alone: global training batches per second, with and without prefetch.

  python -m benchmarks.data_pipeline --source idx:../shared/data/mnist --batch 64

Times `data.train_batch` (index permutation + gather, a pure function of (seed, step))
plus `parallel.global_batch` (host -> device array) for `--steps` consecutive steps,
and the same through `data.prefetch` (a background thread), after loading. Prints a
markdown table: microseconds per batch (median (min..max) over repeats), batches/s,
images/s. No FLOPs: there is no arithmetic to speak of.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

from benchmarks import common

import jax
import ml_collections

from vdmrep import data, parallel


def _source_default():
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for d in (os.path.join(here, "..", "shared", "data", "mnist"), "/work/shared/data/mnist"):
    if os.path.isdir(d):
      return "idx:" + os.path.abspath(d)
  return "digits"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--source", default=_source_default())
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  cfg = ml_collections.ConfigDict(dict(source=args.source, eval_fraction=0.15, split_seed=0,
                                       tfds_data_dir="", max_train_examples=0))
  t0 = time.perf_counter()
  ds = data.load(cfg)
  load_s = time.perf_counter() - t0
  mesh = parallel.make_mesh()
  make = functools.partial(data.train_batch, ds, batch_size=args.batch, seed=0)

  def plain():
    for s in range(args.steps):
      x = parallel.global_batch(mesh, make(s))
    return x

  def prefetched():
    for _, local in data.prefetch(make, range(args.steps)):
      x = parallel.global_batch(mesh, local)
    return x

  print(f"hardware: {common.hardware()}; {common.load_note()}")
  print(f"source {args.source}: {len(ds.train_images)} train images {ds.image_shape}, "
        f"loaded in {load_s:.2f} s\n")
  print("| pipeline | batch | us/batch median (min..max) | batches/s | images/s |\n|---|---|---|---|---|")
  for name, fn in (("train_batch + global_batch", plain), ("same, prefetch thread", prefetched)):
    med, lo, hi = common.summary(common.time_fn(fn, repeats=args.repeats))
    per = 1e6 / args.steps
    print(f"| {name} | {args.batch} | {med * per:.0f} ({lo * per:.0f}..{hi * per:.0f}) | "
          f"{args.steps / med:.0f} | {args.steps * args.batch / med:.0f} |")


if __name__ == "__main__":
  main()
