"""How much a held-out bpd moves between eval seeds, against the standard error it reports.

A report's "+- s.e." is over test images at one eval seed (one draw of w, t, eps per image
and Monte Carlo sample). Re-evaluating the same parameters with another eval seed moves
the number too; this script measures by how much, so tables can say which spread
matters. It restores the EMA parameters of the latest checkpoint read-only (a trainer
may own the workdir) and evaluates the beta = 1 negative ELBO with every eval seed and
every K given, on the same images:

  python experiments/eval_spread.py --workdir runs/fm --seeds 0,1,2,3 --num-time-samples 1,4 \\
      --max-examples 10000 -- --config configs/fashion_mnist.py --config.model.vdm=mvdm

Everything after `--` is the training command's config flags (the same config the run was
trained with). Prints a markdown table: per K, the bpd at each seed, their mean and
standard deviation over seeds, and the mean per-seed standard error over images; and,
for each pair of seeds, the paired difference with its standard error (the per-image
scores are paired by image).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_config(flags_argv):
  from absl import flags
  from ml_collections import config_flags
  argv = ["eval_spread", *flags_argv]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  cut = argv.index("--") if "--" in argv else len(argv)
  ours, theirs = argv[:cut], argv[cut + 1:]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--seeds", default="0,1,2,3", help="eval seeds")
  p.add_argument("--num-time-samples", default="1,4", help="K values (draws per image)")
  p.add_argument("--max-examples", type=int, default=0, help="eval images (0: all)")
  p.add_argument("--batch-size", type=int, default=500)
  args = p.parse_args(ours)
  if not theirs:
    p.error("give the run's config flags after `--` (e.g. -- --config configs/digits.py)")
  seeds = [int(s) for s in args.seeds.split(",")]
  ks = [int(k) for k in args.num_time_samples.split(",")]
  if len(seeds) < 2 or min(ks) < 1:
    p.error("need at least two eval seeds and K >= 1")

  import jax
  import numpy as np
  from vdmrep import sample_mode
  from vdmrep.evaluators import elbo as elbo_lib

  config = build_config(theirs)
  ds, model, mesh, restored = sample_mode.restore_for_sampling(config, args.workdir)
  images = ds.eval_images if args.max_examples <= 0 else ds.eval_images[:args.max_examples]
  dims = int(np.prod(images.shape[1:]))
  lines = [f"Step {int(restored.step)} of {args.workdir}; {len(images)} eval images; "
           f"EMA parameters; beta = 1 negative ELBO in bits/dim.", "",
           "| K | " + " | ".join(f"seed {s}" for s in seeds) +
           " | mean | sd over seeds | mean s.e. over images | largest paired diff (s.e.) |",
           "|" + "---|" * (len(seeds) + 5)]
  for k in ks:
    fn = elbo_lib.make_eval_fn(model, mesh, k)
    per_seed, se = [], []
    for s in seeds:
      per_image = elbo_lib.per_image_terms(fn, restored.ema_params, images,
                                           jax.random.key(s), args.batch_size, mesh)
      bpd = elbo_lib.per_image_bpd(per_image, dims)
      per_seed.append(bpd)
      se.append(float(bpd.std(ddof=1) / np.sqrt(len(bpd))))
      print(f"K={k} seed={s}: {bpd.mean():.4f} +- {se[-1]:.4f}", flush=True)
    means = [float(b.mean()) for b in per_seed]
    diffs = [per_seed[i] - per_seed[j]
             for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
    worst = max(diffs, key=lambda d: abs(d.mean()))
    worst = (float(worst.mean()), float(worst.std(ddof=1) / np.sqrt(len(worst))))
    lines.append(f"| {k} | " + " | ".join(f"{m:.4f}" for m in means) +
                 f" | {statistics.mean(means):.4f} | {statistics.stdev(means):.4f} | "
                 f"{statistics.mean(se):.4f} | {worst[0]:+.4f} ({worst[1]:.4f}) |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
