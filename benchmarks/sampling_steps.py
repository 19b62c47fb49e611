"""Sample quality vs number of ancestral steps, for a trained run.

  python -m benchmarks.sampling_steps --workdir RUN --steps 10,25,50,100,250,1000 --num 500

RUN is a finished `vdmrep.main` work directory: its config is read back from
`report.json` and its latest checkpoint's EMA parameters are sampled. The VDM update
(`sampling.ancestral_step`) is exact for any grid of times, so fewer steps is the same
model with a coarser discretisation of the reverse process, not a different sampler.

For each step count: the wall-clock of generating `--num` unconditional samples (one
compiled loop per batch; compile excluded by a warm-up call), images/s, and the
Frechet distance of the samples to the training split in the feature space of the
run's data classifier (the `quality` section's FD), with the real-vs-real floor. All
step counts start from the same z_1 and w draws (same key). The classifier is trained
(or loaded) under `--out`, never in RUN, so the run's directory is left untouched.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks import common

import jax
import ml_collections

from vdmrep import checkpoints, quality, sample_mode, sampling
from vdmrep import classifier as classifier_lib


def load_run(workdir: str):
  """(config, dataset, model, EMA params, step) of the latest checkpoint in `workdir`."""
  path = os.path.join(workdir, "report.json")
  if not os.path.exists(path):
    raise SystemExit(f"{path} not found: --workdir must be a finished vdmrep.main run")
  with open(path) as fh:
    config = ml_collections.ConfigDict(json.load(fh)["config"])
  try:
    ds, model, mesh, restored = sample_mode.restore_for_sampling(config, workdir)
  except checkpoints.CheckpointError as e:
    raise SystemExit(str(e))
  return config, ds, model, mesh, restored.ema_params, int(restored.step)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", default="10,25,50,100,250,1000")
  p.add_argument("--num", type=int, default=500, help="unconditional samples per step count")
  p.add_argument("--batch", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="/tmp/vdmrep_sampling_steps",
                 help="where the feature classifier is trained/cached")
  args = p.parse_args()
  steps = [int(s) for s in args.steps.split(",")]
  config, ds, model, mesh, params, step = load_run(args.workdir)
  s = config.sample
  if ds.train_labels is None:
    raise SystemExit(f"{ds.name} has no labels: no classifier to measure FD with")
  k_clf, k_floor, k_sample = jax.random.split(jax.random.key(args.seed), 3)
  clf = classifier_lib.get_classifier(
      ds, k_clf, workdir=args.out, steps=s.classifier_steps, batch_size=s.classifier_batch_size,
      lr=s.classifier_lr, features=s.classifier_features, log=lambda *a: None)
  _, f_train = clf.apply(ds.train_images)
  floor = quality.real_floor(f_train, k_floor)

  def generate(n_steps, num):
    return sampling.generate(model, params, k_sample, mode="unconditional", num=num,
                             image_shape=ds.image_shape, batch_size=min(args.batch, num),
                             num_steps=n_steps, decode_method=s.decode, mesh=mesh)["images"]

  rows = []
  for n in steps:
    generate(n, min(args.batch, args.num))  # compile (the loop's trip count is static)
    t0 = time.perf_counter()
    images = generate(n, args.num)
    secs = time.perf_counter() - t0
    logits, feats = clf.apply(images)
    score, _ = quality.inception_score(logits)
    rows.append((n, secs, quality.fd_from_features(feats, f_train), score))
    print(f"  {n} steps: {secs:.1f} s, FD {rows[-1][2]:.3f}", flush=True)

  print(f"\nhardware: {common.hardware()}; {common.load_note()}")
  print(f"run: {args.workdir} (step {step}; {config.model.vdm} + {config.model.encoder}, "
        f"{ds.name} {'x'.join(map(str, ds.image_shape))}); {args.num} unconditional samples, "
        f"decode={s.decode}; classifier test accuracy {clf.meta['test_accuracy']:.3f}; "
        f"FD floor (two halves of the {len(ds.train_images)} training images) {floor:.3f}\n")
  print("| steps | s | images/s | s per step | FD to train | classifier score |")
  print("|---|---|---|---|---|---|")
  for n, secs, fd, score in rows:
    print(f"| {n} | {secs:.1f} | {args.num / secs:.1f} | {secs / n:.3f} | {fd:.3f} | "
          f"{score:.2f} |")


if __name__ == "__main__":
  main()
