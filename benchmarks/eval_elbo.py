"""Test-set ELBO throughput: images/s of the jitted evaluation batch (K draws each).

  python -m benchmarks.eval_elbo --vdm tvdm --encoder te --batch 256 --samples 4 --image 28

Times `evaluators.elbo.make_eval_fn` (the function the ELBO evaluator runs per batch) after
compilation and prints a markdown row: median (min..max) seconds per batch, images/s,
model GFLOP per batch (XLA cost analysis), GFLOP/s, % of the measured f32 matmul peak,
XLA temp memory and peak RSS.
"""
from __future__ import annotations

import argparse

from benchmarks import common
from benchmarks.common import fmt_s

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import backends, config_lib, parallel
from vdmrep.backends import build_model
from vdmrep.evaluators import elbo as elbo_eval


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vdm", default="tvdm")
  p.add_argument("--encoder", default="te")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--samples", type=int, default=4, help="K draws of (w, z_0, t, eps) per image")
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--backend", default="auto", choices=config_lib.BACKENDS)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  peak = common.matmul_peak()
  config = config_lib.base_config()
  config.model.vdm, config.model.encoder = args.vdm, args.encoder
  config.model.compute_dtype = args.dtype
  config.model.backend = args.backend
  config.eval.batch_size = args.batch
  config_lib.validate(config, jax.device_count())
  model = build_model(config.model)
  mesh = parallel.make_mesh()
  shape = (args.image, args.image, 1)
  params = model.init(jax.random.key(0), shape)
  x = parallel.global_batch(mesh, np.random.default_rng(0).integers(
      0, 256, (args.batch,) + shape, dtype=np.uint8))
  key = jax.random.key(1)
  compiled = elbo_eval.make_eval_fn(model, mesh, args.samples).lower(
      params, x, key, jnp.float32(1.0)).compile()
  # Model FLOPs: one draw, attention unchunked, times K (common.lowered_flops).
  config.model.backend = "xla"  # XLA cannot count a custom call's FLOPs
  plain = elbo_eval.make_eval_fn(build_model(config.model), mesh, 1)
  flops = args.samples * common.lowered_flops(plain.lower(params, x, key, jnp.float32(1.0)))
  temp = common.memory_of(compiled).get("temp", float("nan")) / 2 ** 20
  med, lo, hi = common.summary(common.time_fn(compiled, params, x, key, jnp.float32(1.0), repeats=args.repeats))
  print(f"hardware: {common.hardware()}; {common.load_note()}")
  print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s\n")
  print("| vdm | encoder | batch x K | image | dtype, conv | s/batch median (min..max) | images/s "
        "| GFLOP/batch | GFLOP/s | % matmul peak | XLA temp MiB | peak RSS MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  print(f"| {args.vdm} | {args.encoder} | {args.batch} x {args.samples} | {args.image}x{args.image}x1 "
        f"| {args.dtype} {backends.name(model)} | {fmt_s(med)} ({fmt_s(lo)}..{fmt_s(hi)}) | {args.batch / med:.1f} | "
        f"{flops / 1e9:.1f} | {flops / med / 1e9:.1f} | {100 * flops / med / peak:.0f}% | "
        f"{temp:.0f} | {common.peak_rss_mib():.0f} |")


if __name__ == "__main__":
  main()
