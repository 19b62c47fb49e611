"""Out-of-distribution detection: AUROC of the per-image bound (bits/dim) as the score.

The OOD sets are the held-out class (`config.eval.ood_holdout_class`) and a second data
source (`config.eval.ood_source`); each is scored with the same estimator as the eval
images (the elbo evaluator's `score_fn`).
"""
from __future__ import annotations

import math

import jax
import numpy as np

from vdmrep import data as data_lib
from vdmrep.evaluators.base import OOD, Section


def auroc(in_scores, out_scores) -> float:
  """Area under the ROC curve for "out-of-distribution" = positive, higher score = more OOD."""
  from sklearn.metrics import roc_auc_score
  y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
  return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def _with_source(data_cfg, source):
  cfg = data_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.source = source
  return cfg


def ood_sets(ds, config) -> dict:
  """name -> uint8 images scored as out-of-distribution (held-out class, second source)."""
  e, out = config.eval, {}
  if e.ood_holdout_class >= 0:
    out[f"class_{e.ood_holdout_class}"] = ds.held_out_images
  if e.ood_source:
    other = data_lib.load(_with_source(config.data, e.ood_source))
    if other.eval_images.shape[1:] != ds.eval_images.shape[1:]:
      raise data_lib.DataError(
          f"config.eval.ood_source={e.ood_source!r}: images {other.eval_images.shape[1:]} differ "
          f"in shape from the model's {ds.eval_images.shape[1:]}")
    out[e.ood_source] = other.eval_images
  if e.max_examples:
    out = {k: v[:e.max_examples] for k, v in out.items()}
  return out


def run(ctx) -> Section:
  in_bpd, score = ctx.shared["per_image_bpd"], ctx.shared["score_fn"]
  key, out, metrics = jax.random.fold_in(ctx.key, OOD), {}, {}
  for i, (name, imgs) in enumerate(sorted(ood_sets(ctx.ds, ctx.config).items())):
    bpd = score(imgs, jax.random.fold_in(key, i))
    out[name] = {"auroc": auroc(in_bpd, bpd), "num_ood": len(bpd), "num_in": len(in_bpd),
                 "ood_bpd": float(bpd.mean()), "in_bpd": float(in_bpd.mean()),
                 "ood_bpd_se": float(bpd.std(ddof=1) / math.sqrt(len(bpd)))
                 if len(bpd) > 1 else float("nan")}
    metrics[f"ood_auroc/{name}"] = out[name]["auroc"]
  return Section(metrics=metrics, report={"ood": out})
