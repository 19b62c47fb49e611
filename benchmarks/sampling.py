"""Sampling speed: N-step ancestral sampling as one compiled loop vs N separate forwards.

  python -m benchmarks.sampling --vdm tvdm --encoder te --num 64 --steps 1000 --image 28

Times `sampling.run_mode` (unconditional: w from the prior, z_1 ~ N(0, I), N updates in
one `fori_loop`, then the discretised decoder) after compilation, and, for reference,
N calls of the jitted score network alone dispatched one by one from Python (how a
PyTorch-style loop runs the same N forward passes; `--ref-steps` of them are timed and
scaled to N). Prints a markdown row: seconds median (min..max), images/s, model GFLOP
(N x one score-net forward, XLA cost analysis), GFLOP/s, % of the f32 matmul peak.

`--decoder conv_vae` times the classic VAE of the same encoder instead (w from the prior,
one decoder pass, categorical pixels): the generation time a diffusion decoder's N steps
are weighed against.
"""
from __future__ import annotations

import argparse
import time

from benchmarks import common
from benchmarks.common import fmt_s

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import config_lib, sampling
from vdmrep import backends
from vdmrep.backends import build_model


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vdm", default="tvdm")
  p.add_argument("--decoder", default="vdm", choices=("vdm", "conv_vae"))
  p.add_argument("--encoder", default="te")
  p.add_argument("--num", type=int, default=64)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--ref-steps", type=int, default=20)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--backend", default="auto", choices=config_lib.BACKENDS)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--count-flops", action="store_true",
                 help="print flops=N of the N forwards and exit (timing skipped)")
  args = p.parse_args()
  config = config_lib.base_config()
  config.model.vdm, config.model.encoder = args.vdm, args.encoder
  config.model.compute_dtype = args.dtype
  config.model.backend = args.backend
  config.model.decoder = args.decoder
  model = build_model(config.model)
  shape = (args.num, args.image, args.image, 1)
  if args.decoder == "conv_vae":
    return time_vae(args, model, shape)
  params = model.init(jax.random.key(0), shape[1:])
  w = jnp.zeros((args.num, model.encoder.latent)) if model.conditional else None
  z, g = jnp.zeros(shape), jnp.full((args.num,), -1.0)
  plain_config = config.copy_and_resolve_references()
  plain_config.model.backend = "xla"  # XLA cannot count a custom call's FLOPs
  plain = build_model(plain_config.model)
  flops = args.steps * common.lowered_flops(
      jax.jit(lambda p, z, g: plain.eps_hat(p, z, g, w)).lower(params, z, g))
  if args.count_flops:
    print(f"flops={flops!r}")
    return
  if np.isnan(flops) and jax.default_backend() != "cpu":
    flops = common.flops_on_cpu("benchmarks.sampling", [
        "--count-flops", f"--vdm={args.vdm}", f"--encoder={args.encoder}",
        f"--num={args.num}", f"--steps={args.steps}", f"--image={args.image}",
        f"--dtype={args.dtype}"])

  peak = common.matmul_peak()
  x = jnp.zeros(shape, jnp.uint8)
  key = jax.random.key(1)
  run = jax.jit(lambda p, k, x: sampling.run_mode(model, p, k, x, mode="unconditional",
                                                  num_steps=args.steps)[0])
  compiled = run.lower(params, key, x).compile()
  med, lo, hi = common.summary(common.time_fn(compiled, params, key, x, repeats=args.repeats))

  # Reference: one jitted forward per step, dispatched from Python.
  fwd = jax.jit(lambda p, z, g: model.eps_hat(p, z, g, w))
  jax.block_until_ready(fwd(params, z, g))
  t0 = time.perf_counter()
  for _ in range(args.ref_steps):
    z = fwd(params, z, g) * 0.5
  jax.block_until_ready(z)
  ref = (time.perf_counter() - t0) / args.ref_steps * args.steps
  print(f"hardware: {common.hardware()}; {common.load_note()}")
  print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s\n")
  print("| vdm | encoder | images | steps | dtype, conv | s median (min..max) | images/s | GFLOP "
        "| GFLOP/s | % matmul peak | N separate forwards, s | ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  print(f"| {args.vdm} | {args.encoder} | {args.num} | {args.steps} | {args.dtype} {backends.name(model)} | "
        f"{fmt_s(med)} ({fmt_s(lo)}..{fmt_s(hi)}) | {args.num / med:.2f} | {flops / 1e9:.0f} | "
        f"{flops / med / 1e9:.1f} | {100 * flops / med / peak:.0f}% | {fmt_s(ref)} | "
        f"{med / ref:.2f} |")


def time_vae(args, model, shape):
  """The classic VAE's unconditional generation: one compiled call per batch."""
  params = model.init(jax.random.key(0), shape[1:])
  x, key = jnp.zeros(shape, jnp.uint8), jax.random.key(1)
  run = jax.jit(lambda p, k, x: sampling.run_mode(model, p, k, x, mode="unconditional",
                                                  num_steps=1)[0])
  compiled = run.lower(params, key, x).compile()
  med, lo, hi = common.summary(common.time_fn(compiled, params, key, x, repeats=args.repeats))
  print(f"hardware: {common.hardware()}; {common.load_note()}\n")
  print("| decoder | encoder | images | s median (min..max) | images/s | ms per image |")
  print("|---|---|---|---|---|---|")
  print(f"| conv_vae | {args.encoder} | {args.num} | {fmt_s(med)} ({fmt_s(lo)}..{fmt_s(hi)}) | "
        f"{args.num / med:.1f} | {1e3 * med / args.num:.3f} |")


if __name__ == "__main__":
  main()
