"""Seconds per train step of each decoder at one batch and image size, side by side, and
(--sample-steps) seconds per generated image.

  python -m benchmarks.decoder_step --batch 64 --image 28 --decoders mvdm,tvdm,unet_s,unet
  python -m benchmarks.decoder_step --decoders mvdm,unet_s,conv_vae --sample-steps 100,1000

Unconditional (no encoder) steps, as the recipe trains them: the full jitted step
(forward + backward + clip + AdamW + EMA) after compilation, `--repeats` times, one
markdown row per decoder with its parameter count and the median (min..max) seconds.
`conv_vae` is the classic VAE (TE encoder + conv decoder; its step includes the encoder).
With --sample-steps, also unconditional generation (`sampling.run_mode`, compiled) of a
batch: a VDM at each step count, the VAE once (one decoder pass). On a shared machine the
spread says how noisy the figures are.
"""
from __future__ import annotations

import argparse

from benchmarks import common
from benchmarks.common import fmt_s

import jax
import jax.numpy as jnp

from benchmarks import train_step as ts
from vdmrep import config_lib, sampling
from vdmrep.backends import build_model


def sample_seconds(name, image, batch, num_steps, repeats):
  """(median, min, max) seconds for one batch of unconditional samples (random params)."""
  c = config_lib.base_config()
  if name == "conv_vae":
    c.model.decoder = "conv_vae"
  else:
    c.model.vdm, c.model.encoder = name, "none"
  model = build_model(c.model)
  params = model.init(jax.random.key(0), (image, image, 1))
  x = jnp.zeros((batch, image, image, 1), jnp.int32)
  run = lambda: sampling._run_mode_jit(model, params, jax.random.key(1), x,
                                       mode="unconditional", num_steps=num_steps)[0]
  return common.summary(common.time_fn(run, repeats=repeats, warmup=1))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--decoders", default="mvdm,tvdm,unet_s,unet")
  p.add_argument("--encoder", default="none")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--backend", default="auto", choices=("auto", "xla", "cpu"))
  p.add_argument("--sample-steps", default="",
                 help="comma-separated sampler step counts: also time generation")
  p.add_argument("--sample-batch", type=int, default=64)
  args = p.parse_args()
  print(f"batch {args.batch}, {args.image}x{args.image}x1, encoder {args.encoder}, "
        f"{jax.device_count()} device(s) on {jax.default_backend()}\n")
  print("| decoder | parameters | s/step median (min..max) | images/s |\n|---|---|---|---|")
  for name in args.decoders.split(","):
    if name == "conv_vae":
      _, compiled, state, x, key = _build_vae(args)
      params = sum(v.size for v in jax.tree.leaves(state.params["decoder"]))
    else:
      _, compiled, state, x, key = ts.build(name, args.encoder, args.batch, args.image,
                                            backend=args.backend)
      params = sum(v.size for v in jax.tree.leaves(state.params["score"]))
    holder = [state]

    def run():
      holder[0], metrics = compiled(holder[0], x, key)
      return metrics
    med, lo, hi = common.summary(common.time_fn(run, repeats=args.repeats, warmup=1))
    print(f"| {name} | {params:,} | {fmt_s(med)} ({fmt_s(lo)}..{fmt_s(hi)}) | "
          f"{args.batch / med:.1f} |", flush=True)
  if not args.sample_steps:
    return
  print(f"\nunconditional generation, batch {args.sample_batch}\n\n"
        "| decoder | sampler steps | s/batch median (min..max) | ms/image |\n|---|---|---|---|")
  for name in args.decoders.split(","):
    for n in ([1] if name == "conv_vae" else [int(s) for s in args.sample_steps.split(",")]):
      med, lo, hi = sample_seconds(name, args.image, args.sample_batch, n, args.repeats)
      print(f"| {name} | {n if name != 'conv_vae' else '- (one pass)'} | {fmt_s(med)} "
            f"({fmt_s(lo)}..{fmt_s(hi)}) | {1000 * med / args.sample_batch:.2f} |", flush=True)


def _build_vae(args):
  """ts.build's (model, compiled step, state, batch, key) for the classic VAE."""
  import numpy as np
  from vdmrep import parallel
  from vdmrep import train as train_lib
  c = ts.make_config("mvdm", "te", args.batch, backend=args.backend)
  c.model.decoder = "conv_vae"
  model = build_model(c.model)
  tx = train_lib.make_optimizer(c.optim)
  mesh = parallel.make_mesh()
  shape = (args.image, args.image, 1)
  state = train_lib.initial_state(model, tx, c, shape, mesh)
  x = parallel.global_batch(mesh, np.random.default_rng(0).integers(
      0, 256, (args.batch,) + shape, dtype=np.uint8))
  key = jax.random.key(0)
  step = train_lib.make_train_step(model, tx, c, mesh)
  return model, step.lower(state, x, key).compile(), state, x, key


if __name__ == "__main__":
  main()
