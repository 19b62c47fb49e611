"""Sample quality of finished runs, re-scored in one stronger classifier's feature space.

  python experiments/rescore_samples.py --out runs/study_c --classifier-steps 5000

A run's own FD and guided class match use the feature classifier its evaluation trained
(`config.sample.classifier_steps`, 500 by default: on Fashion-MNIST that classifier is less
accurate than a logistic regression on the pixels). This script trains one classifier with
more steps per data source (cached in OUT/rescore_s<steps>/), reads every
OUT/runs/*/samples.npz, and scores all runs in that one feature space:

  FD        Frechet distance of the run's N unconditional samples to the training split.
  floor     the same distance for N held-out real images drawn from the eval split, the
            mean +- sd over --floor-draws draws: the same N, so the same small-sample bias
            (an FD from 1,000 samples is not comparable with a floor from 10,000 images).
  guided    how often the classifier gives a guided sample (decoded from its input's w)
            its input's class; shuffled: the same against another input's class (chance).

Writes OUT/runs/<run>/rescored_s<steps>.json and OUT/rescore_s<steps>.md (also printed).
Trains nothing but the classifier; runs without samples.npz are listed as such.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from vdmrep import classifier as classifier_lib  # noqa: E402
from vdmrep import data as data_lib  # noqa: E402
from vdmrep import quality  # noqa: E402


def floor_draws(f_eval, f_train, n: int, draws: int, key) -> list:
  """FD of `draws` random n-subsets of the eval features against the training features."""
  out = []
  for k in jax.random.split(key, draws):
    idx = np.asarray(jax.random.choice(k, len(f_eval), (min(n, len(f_eval)),), replace=False))
    out.append(quality.fd_from_features(f_eval[idx], f_train))
  return out


def score_run(clf, samples: dict, f_train, f_eval, *, draws: int, key) -> dict:
  """The numbers of one run's samples.npz in `clf`'s feature space (see the module doc)."""
  k_floor, k_shuf = jax.random.split(key)
  gen = samples["unconditional"]
  _, f_gen = clf.apply(gen)
  floors = floor_draws(f_eval, f_train, len(gen), draws, k_floor)
  res = {"num_samples": int(len(gen)), "fd": quality.fd_from_features(f_gen, f_train),
         "floor_mean": float(np.mean(floors)),
         "floor_sd": float(np.std(floors, ddof=1)) if len(floors) > 1 else float("nan"),
         "floor_draws": len(floors)}
  if "guided" in samples and "inputs" in samples:
    pred_in = clf.predict(samples["inputs"])
    pred_out = clf.predict(samples["guided"])
    perm = np.asarray(jax.random.permutation(k_shuf, len(pred_in)))
    res["guided_match"] = float(np.mean(pred_out == pred_in))
    res["guided_match_shuffled"] = float(np.mean(pred_out == pred_in[perm]))
    res["num_guided"] = int(len(pred_in))
  return res


def run_dirs(out: str) -> list:
  return sorted(d for d in glob.glob(os.path.join(out, "runs", "*")) if os.path.isdir(d))


def data_config(run_dir: str):
  """The run's config.data (from its report.json), or None when it has no report."""
  path = os.path.join(run_dir, "report.json")
  if not os.path.exists(path):
    return None
  with open(path) as fh:
    return ml_collections.ConfigDict(json.load(fh)["config"]["data"])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True, help="a study's output directory (with runs/)")
  p.add_argument("--classifier-steps", type=int, default=5000)
  p.add_argument("--classifier-batch", type=int, default=128)
  p.add_argument("--classifier-lr", type=float, default=1e-3)
  p.add_argument("--floor-draws", type=int, default=5)
  p.add_argument("--seed", type=int, default=0, help="classifier initialisation and draws")
  args = p.parse_args(argv)
  if args.classifier_steps < 1 or args.floor_draws < 1:
    raise SystemExit("error: --classifier-steps and --floor-draws must be >= 1")
  dirs = run_dirs(args.out)
  if not dirs:
    raise SystemExit(f"error: {args.out}/runs/ holds no run directories")

  tag = f"s{args.classifier_steps}"
  cache, lines, source_acc = {}, [], {}
  key = jax.random.key(args.seed)
  for d in dirs:
    name = os.path.basename(d)
    samples_path = os.path.join(d, "samples.npz")
    dcfg = data_config(d)
    if dcfg is None or not os.path.exists(samples_path):
      lines.append([name, "no report.json" if dcfg is None else "no samples.npz"] + [""] * 3)
      continue
    src = json.dumps(dcfg.to_dict(), sort_keys=True)
    if src not in cache:
      ds = data_lib.load(dcfg)
      clf = classifier_lib.get_classifier(
          ds, jax.random.fold_in(key, 1), workdir=os.path.join(args.out, f"rescore_{tag}",
                                                              f"source{len(cache)}"),
          steps=args.classifier_steps, batch_size=args.classifier_batch, lr=args.classifier_lr,
          features=64)
      cache[src] = (clf, clf.apply(ds.train_images)[1], clf.apply(ds.eval_images)[1])
      source_acc[dcfg.source] = clf.meta["test_accuracy"]
    clf, f_train, f_eval = cache[src]
    with np.load(samples_path) as z:
      samples = {k: z[k] for k in z.files}
    res = score_run(clf, samples, f_train, f_eval, draws=args.floor_draws,
                    key=jax.random.fold_in(key, 2))
    res.update(classifier_test_accuracy=clf.meta["test_accuracy"],
               classifier_steps=args.classifier_steps, source=dcfg.source)
    with open(os.path.join(d, f"rescored_{tag}.json"), "w") as fh:
      json.dump(res, fh, indent=1)
    guided = ("-" if "guided_match" not in res else
              f"{res['guided_match']:.3f} ({res['guided_match_shuffled']:.3f})")
    lines.append([name, f"{res['classifier_test_accuracy']:.4f}", f"{res['fd']:.2f}",
                  f"{res['floor_mean']:.2f} ± {res['floor_sd']:.2f}", guided])

  header = ["run", "classifier test accuracy", "FD: N samples vs train",
            "floor: N eval images vs train (mean ± sd)", "guided class match (shuffled)"]
  text = "\n".join([
      f"## Sample quality re-scored ({args.classifier_steps}-step classifier)", "",
      "Command: `python experiments/rescore_samples.py " + " ".join(
          argv if argv is not None else sys.argv[1:]) + "`", "",
      harness.markdown_table(header, lines), "",
      f"One feature classifier per data source ({args.classifier_steps} Adam steps, batch "
      f"{args.classifier_batch}, lr {args.classifier_lr:g}; test accuracy "
      + ", ".join(f"{s}: {a:.4f}" for s, a in source_acc.items()) + "). FD in its 64 "
      f"penultimate features; the floor uses as many real eval images as the run has "
      f"samples, {args.floor_draws} random draws. Guided: the classifier's class of each "
      "guided sample against that of its input; shuffled pairs give the chance level.", ""])
  with open(os.path.join(args.out, f"rescore_{tag}.md"), "w") as fh:
    fh.write(text)
  print(text)


if __name__ == "__main__":
  main()
