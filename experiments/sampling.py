"""Steering a trained class-conditional VAE-VDM: the tables and pictures of docs/sampling.md.

Given a workdir trained with a class-conditional config (e.g. configs/digits.py:classes=true):

  python experiments/sampling.py --config configs/digits.py:classes=true --workdir runs/cls \
      --out experiments/out/sampling

writes OUT/results.md (+ results.json) and OUT/*.png:
  1. the negative ELBO with labels (a bound on -log p(x|y)) and without (the unconditional
     path, a bound on -log p(x)) on the eval split;
  2. guidance weight vs class agreement (samples for class k classified as k by the
     feature classifier) and FD, plus the unconditional path;
  3. sampler (ancestral, DDIM-style) x number of steps vs FD, class agreement and wall
     time per image (sampling alone, compiled beforehand); a picture of the same seeds
     across step counts;
  4. latent arithmetic: samples decoded from class means of w (with the "no label"
     token, so only w can carry the class), attribute walks w + a (m_k - m) and
     slerp/lerp between class means.
The feature classifier is trained once and cached in OUT/classifier/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vdmrep import classifier as classifier_lib  # noqa: E402
from vdmrep import data as data_lib  # noqa: E402
from vdmrep import plots, quality, sample_mode, steering  # noqa: E402


def load_config(path, overrides):
  """configs/NAME.py[:ARG] (as --config of vdmrep.main) plus `a.b=json` overrides."""
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg or None)
  for item in overrides:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    c[section][name] = type(c[section][name])(json.loads(value))
  return c


def table(rows, cols):
  head = "| " + " | ".join(c for c, _ in cols) + " |"
  lines = [head, "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r) for _, fmt in cols) + " |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--set", action="append", default=[], help="config override a.b=json")
  ap.add_argument("--num", type=int, default=500, help="samples per table row")
  ap.add_argument("--batch", type=int, default=250)
  ap.add_argument("--weights", default="0,0.5,1,2,4", help="guidance weights")
  ap.add_argument("--guidance-steps", type=int, default=100)
  ap.add_argument("--ddim-steps", default="10,25,50,100,250,1000")
  ap.add_argument("--ancestral-steps", default="10,25,50,100,250,1000")
  ap.add_argument("--steps-guidance", type=float, default=1.0,
                  help="guidance weight of the steps table")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  config = load_config(args.config, args.set)
  ds, model, _, restored = sample_mode.restore_for_sampling(config, args.workdir)
  if not model.num_classes:
    sys.exit(f"error: {args.config} is not class-conditional (config.model.num_classes = 0)")
  params, k = restored.ema_params, model.num_classes
  key = jax.random.key(args.seed)
  k_clf, k_elbo, k_guid, k_steps, k_lat = jax.random.split(key, 5)
  s = config.sample
  clf = classifier_lib.get_classifier(
      ds, k_clf, workdir=args.out, steps=s.classifier_steps, batch_size=s.classifier_batch_size,
      lr=s.classifier_lr, features=s.classifier_features)
  _, f_train = clf.apply(ds.train_images)
  res = {"step": int(restored.step), "config": args.config, "num": args.num,
         "classifier_test_accuracy": clf.meta["test_accuracy"],
         "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
                    f"({jax.default_backend()})"}
  _, f_eval = clf.apply(ds.eval_images)
  res["fd_eval_vs_train"] = quality.fd_from_features(f_eval, f_train)
  md = [f"Model: {args.config}, step {res['step']}; feature classifier test accuracy "
        f"{res['classifier_test_accuracy']:.3f}; FD of the eval split vs train "
        f"{res['fd_eval_vs_train']:.2f}; {args.num} samples per row; {res['machine']}.", ""]

  # 1. ELBO with and without labels.
  res["elbo_conditional"] = steering.elbo_bpd(model, params, ds.eval_images, ds.eval_labels,
                                              k_elbo, batch_size=args.batch)
  res["elbo_unconditional_path"] = steering.elbo_bpd(model, params, ds.eval_images, None,
                                                     k_elbo, batch_size=args.batch)
  e_c, e_u = res["elbo_conditional"], res["elbo_unconditional_path"]
  md += ["### Negative ELBO on the eval split (bits/dim, beta = 1, 4 times per image)", "",
         "| labels | bound on | bpd |", "|---|---|---|",
         f"| y given | -log p(x \\| y) | {e_c['bpd']:.4f} +- {e_c['bpd_se']:.4f} |",
         f"| none (null token) | -log p(x) | {e_u['bpd']:.4f} +- {e_u['bpd_se']:.4f} |", ""]
  print("\n".join(md[-6:]), flush=True)

  labels = steering.balanced_labels(args.num, k)
  common = dict(num=args.num, image_shape=ds.image_shape, batch_size=args.batch,
                decode_method=s.decode)

  # 2. Guidance weight.
  rows = []
  imgs, sec = steering.timed_samples(model, params, k_guid, num_steps=args.guidance_steps,
                                     **common)
  rows.append(dict(steering.sample_row(clf, f_train, imgs, labels), weight="none",
                   sec=sec))  # unconditional path: agreement is chance
  guided_grid = []
  for wgt in [float(x) for x in args.weights.split(",")]:
    imgs, sec = steering.timed_samples(model, params, k_guid, num_steps=args.guidance_steps,
                                       labels=labels, guidance=wgt, **common)
    rows.append(dict(steering.sample_row(clf, f_train, imgs, labels), weight=wgt, sec=sec))
    guided_grid.append(imgs[:k])  # labels 0..K-1
    print(rows[-1], flush=True)
  res["guidance"] = rows
  md += [f"### Guidance weight ({args.guidance_steps} ancestral steps)", "",
         "'none' is the unconditional path (null label); class agreement there is the "
         "rate at which samples happen to match the label they were not given (chance).", "",
         table(rows, [("guidance s", lambda r: str(r["weight"])),
                      ("class agreement", lambda r: f"{r['class_agreement']:.3f}"),
                      ("FD (classifier features)", lambda r: f"{r['fd']:.2f}"),
                      ("s / image", lambda r: f"{r['sec']:.4f}")]), ""]
  plots.labelled_rows(np.stack(guided_grid),
                      [f"s={w}" for w in args.weights.split(",")], list(range(k)),
                      os.path.join(args.out, "guidance.png"),
                      "one sample per class (columns) at each guidance weight (rows)")

  # 3. Sampler x steps.
  rows, seeds = [], []
  for sampler, steps in (("ddim", args.ddim_steps), ("ancestral", args.ancestral_steps)):
    for n in [int(x) for x in steps.split(",") if x]:
      imgs, sec = steering.timed_samples(model, params, k_steps, num_steps=n, sampler=sampler,
                                         labels=labels, guidance=args.steps_guidance, **common)
      rows.append(dict(steering.sample_row(clf, f_train, imgs, labels), sampler=sampler,
                       steps=n, sec=sec))
      seeds.append(imgs[:k])
      print(rows[-1], flush=True)
  res["steps"] = rows
  md += [f"### Sampler x number of steps (guidance s = {args.steps_guidance:g})", "",
         "Wall time: sampling alone (compiled beforehand), batches of "
         f"{args.batch}, doubled inside by guidance.", "",
         table(rows, [("sampler", lambda r: r["sampler"]), ("steps", lambda r: str(r["steps"])),
                      ("class agreement", lambda r: f"{r['class_agreement']:.3f}"),
                      ("FD", lambda r: f"{r['fd']:.2f}"),
                      ("ms / image", lambda r: f"{1000 * r['sec']:.2f}")]), ""]
  plots.labelled_rows(np.stack(seeds), [f"{r['sampler']} {r['steps']}" for r in rows],
                      list(range(k)), os.path.join(args.out, "steps_same_seeds.png"),
                      "same seeds (z_1, labels, noise) across samplers and step counts")

  # 4. Latent arithmetic in w.
  if model.conditional:
    encode = jax.jit(model.encode)
    mean = np.concatenate([np.asarray(encode(params, b)[0])[m > 0]
                           for b, m in data_lib.eval_batches(ds.eval_images, args.batch)])
    means, overall, dirs = steering.class_means(mean, ds.eval_labels, k)
    active = int(np.sum(np.var(mean, axis=0) > config.eval.active_threshold))
    n_lat = dict(num_steps=args.guidance_steps, sampler="ddim")
    from_means = steering.samples_for_latents(model, params, k_lat, means, None,
                                              ds.image_shape, **n_lat)
    walk_scales = [0.0, 1.0, 2.0, 4.0]
    base = np.repeat(overall[None], k, 0)
    walk = np.stack([steering.attribute_walk(base[i:i + 1], dirs[i], walk_scales)[0]
                     for i in range(k)])  # [K, S, D]
    walk_imgs = steering.samples_for_latents(
        model, params, k_lat, walk.reshape(-1, walk.shape[-1]), None, ds.image_shape,
        **n_lat).reshape(k, len(walk_scales), *ds.image_shape)
    alphas = np.linspace(0, 1, 6)
    pairs = [(i, (i + 1) % k) for i in range(0, k, 2)]
    paths = {}
    for method in ("slerp", "linear"):
      w = np.asarray(steering.interpolate_in_prior(
          model, params, means[[a for a, _ in pairs]], means[[b for _, b in pairs]], alphas,
          method, rng=jax.random.fold_in(k_lat, 1)))
      paths[method] = steering.samples_for_latents(
          model, params, k_lat, w.reshape(-1, w.shape[-1]), None, ds.image_shape,
          **n_lat).reshape(len(pairs), len(alphas), *ds.image_shape)
    agree_means = steering.class_agreement(clf, from_means, np.arange(k))
    res["latent"] = {"active_units": active, "latent_dim": int(mean.shape[1]),
                     "class_mean_agreement": agree_means,
                     "direction_norms": np.linalg.norm(dirs, axis=1).tolist()}
    md += ["### Latent arithmetic in w (null label, DDIM, shared noise)", "",
           f"Active units {active}/{mean.shape[1]}; samples decoded from the 10 class means "
           f"of w classified as their class: {agree_means:.2f} (chance 0.10); norms of the "
           f"attribute directions m_k - m: "
           + ", ".join(f"{x:.2f}" for x in res["latent"]["direction_norms"]), ""]
    plots.labelled_rows(walk_imgs, [f"to {i}" for i in range(k)],
                        [f"a={a:g}" for a in walk_scales],
                        os.path.join(args.out, "attribute_walk.png"),
                        "w = m + a (m_k - m), null label, shared noise")
    plots.labelled_rows(np.concatenate([paths["slerp"], paths["linear"]]),
                        [f"{m} {a}->{b}" for m in ("slerp", "lerp") for a, b in pairs],
                        [f"{a:.1f}" for a in alphas],
                        os.path.join(args.out, "class_mean_interpolation.png"),
                        "between class means of w (null label, shared noise)")

  res["wall_seconds"] = time.perf_counter() - start
  with open(os.path.join(args.out, "results.json"), "w") as fh:
    json.dump(res, fh, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as fh:
    fh.write("\n".join(md) + "\n")
  print("\n".join(md), flush=True)


if __name__ == "__main__":
  main()
