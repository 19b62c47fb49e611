"""Trivial baselines of the eval images, printed beside every model's bpd.

  * Per-pixel histogram: an independent categorical per pixel position (and channel),
    fitted on the training split with add-k smoothing, p_d(v) = (n_d(v) + k) /
    (N + k V) over the V = vocab_size levels; scored on the same eval images as the
    model, in bits/dim. A model that cannot beat it has learned less than pixel marginals.
  * Uniform over the levels the data uses: log2(L) bits/dim, L = distinct values in the
    train and eval images. scikit-learn's digits have 17 grey levels (0..16) placed in
    256 bins: their bpd is not comparable with 8-bit image bpd (a uniform model of the
    17 levels already scores log2 17 = 4.09 bits/dim, against 8 for 256 levels).

`histogram_bpd` and `uniform_bpd` are pure numpy functions other code can call.
"""
from __future__ import annotations

import math

import numpy as np

from vdmrep.evaluators.base import Section


def _flat(images) -> np.ndarray:
  x = np.asarray(images)
  return x.reshape(len(x), -1).astype(np.int64)


def histogram_log_probs(train_images, vocab_size: int = 256, k: float = 0.5) -> np.ndarray:
  """log2 p_d(v) of the per-pixel categorical fitted on `train_images`: float64 [D, V].

  train_images: integer [N, H, W, C] in [0, vocab_size); k: add-k smoothing count (> 0).
  """
  x = _flat(train_images)
  n, d = x.shape
  counts = np.bincount((np.arange(d)[None, :] * vocab_size + x).ravel(),
                       minlength=d * vocab_size).reshape(d, vocab_size)
  return np.log2((counts + k) / (n + k * vocab_size))


def histogram_bits_per_image(train_images, eval_images, vocab_size: int = 256,
                             k: float = 0.5) -> np.ndarray:
  """-log2 p(x) of each eval image under the per-pixel histogram: float64 [M] bits."""
  logp = histogram_log_probs(train_images, vocab_size, k)
  x = _flat(eval_images)
  return -logp[np.arange(x.shape[1])[None, :], x].sum(axis=1)


def histogram_bpd(train_images, eval_images, vocab_size: int = 256, k: float = 0.5) -> dict:
  """Per-pixel-histogram bpd of `eval_images`, fitted on `train_images` (add-k smoothing).

  Returns {"bpd", "bpd_se" (over images), "per_image_bpd" [M], "k", "num_train", "num_eval"}.
  """
  d = int(np.prod(np.shape(eval_images)[1:]))
  per = histogram_bits_per_image(train_images, eval_images, vocab_size, k) / d
  m = len(per)
  return {"bpd": float(per.mean()),
          "bpd_se": float(per.std(ddof=1) / math.sqrt(m)) if m > 1 else float("nan"),
          "per_image_bpd": per, "k": float(k), "num_train": len(train_images), "num_eval": m}


def levels_used(*image_sets) -> int:
  """Number of distinct pixel values over all the given image sets."""
  return int(np.unique(np.concatenate([np.unique(np.asarray(x)) for x in image_sets])).size)


def uniform_bpd(*image_sets) -> float:
  """log2 of the number of levels the images use: a uniform model over those levels."""
  return math.log2(levels_used(*image_sets))


def run(ctx) -> Section:
  e, v = ctx.config.eval, int(ctx.config.model.vocab_size)
  hist = histogram_bpd(ctx.ds.train_images, ctx.images, v, e.histogram_k)
  levels = levels_used(ctx.ds.train_images, ctx.images)
  m = {"histogram_bpd": hist["bpd"], "histogram_bpd_se": hist["bpd_se"],
       "histogram_k": hist["k"], "uniform_bpd": math.log2(levels), "levels_used": levels,
       "vocab_size": v}
  note = (f"per-pixel histogram fitted on the {hist['num_train']} training images "
          f"(add-k smoothing, k = {hist['k']:g}, {v} bins); uniform over the {levels} "
          "levels the data uses")
  if levels < v:
    note += f"; the data uses {levels} of the {v} levels (bpd not comparable with 8-bit data)"
  model_bpd = ctx.shared.get("per_image_bpd")
  if model_bpd is not None and np.all(np.isfinite(model_bpd)):
    diff = model_bpd - hist["per_image_bpd"]
    n = len(diff)
    m["bpd_minus_histogram"] = float(diff.mean())
    m["bpd_minus_histogram_se"] = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  return Section(metrics=m, report={"baselines": {"note": note},
                                    "per_image": {"histogram_bpd": hist["per_image_bpd"]}})
