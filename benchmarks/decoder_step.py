"""Seconds per train step of each decoder at one batch and image size, side by side.

  python benchmarks/decoder_step.py --batch 64 --image 28 --decoders mvdm,tvdm,unet_s,unet

Unconditional (no encoder) steps, as the recipe trains them: the full jitted step
(forward + backward + clip + AdamW + EMA) after compilation, `--repeats` times, one
markdown row per decoder with its parameter count and the median (min..max) seconds.
On a shared machine the spread says how noisy the figures are.
"""
from __future__ import annotations

import argparse

import common
from common import fmt_s

import jax

import train_step as ts


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--decoders", default="mvdm,tvdm,unet_s,unet")
  p.add_argument("--encoder", default="none")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--conv-impl", default="auto", choices=("auto", "xla", "onednn"))
  args = p.parse_args()
  print(f"batch {args.batch}, {args.image}x{args.image}x1, encoder {args.encoder}, "
        f"{jax.device_count()} device(s) on {jax.default_backend()}\n")
  print("| decoder | parameters | s/step median (min..max) | images/s |\n|---|---|---|---|")
  for name in args.decoders.split(","):
    _, compiled, state, x, key = ts.build(name, args.encoder, args.batch, args.image,
                                          conv_impl=args.conv_impl)
    params = sum(v.size for v in jax.tree.leaves(state.params["score"]))
    holder = [state]

    def run():
      holder[0], metrics = compiled(holder[0], x, key)
      return metrics
    med, lo, hi = common.summary(common.time_fn(run, repeats=args.repeats, warmup=1))
    print(f"| {name} | {params:,} | {fmt_s(med)} ({fmt_s(lo)}..{fmt_s(hi)}) | "
          f"{args.batch / med:.1f} |", flush=True)


if __name__ == "__main__":
  main()
