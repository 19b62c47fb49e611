"""Probes on encoder means, one draw of w, the same encoder at random init, and raw pixels.

The probes themselves (standardised logistic regression with C chosen by cross-validation,
k-NN, I(features; label) in bits) are `vdmrep/probes.py`. `config.eval.probe_features`
picks the feature sets:
  encoder         the means of q(w|x) (categorical: the class probabilities), the usual
                  representation; a deterministic function of x, so the label information
                  it carries is not bounded by what w carries.
  encoder_w       one draw w ~ q(w|x) per image (train and eval, from the eval seed): the
                  latent the decoder sees. Its label information is a lower-bound estimate of
                  I(w; label) <= I_q(x; w). A deterministic encoder's w is its mean, so it is
                  not repeated.
  random_encoder  the means of the same architecture at initialisation.
  pixels          the raw pixels / 255.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import diagnostics, latent_diagnostics
from vdmrep import probes as probe_lib
from vdmrep.evaluators.base import (PROBE_FEATURES, PROBE_W, Section, _head, _parse,
                                   eval_seed)


def random_encoder_params(model, config, image_shape) -> dict:
  """The encoder's parameters at initialisation (`config.eval.random_encoder_seed`): the
  random-features baseline of the probes and latent maps. Only the encoder is built."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  init = jax.jit(lambda k: model.encoder.init(k, x)["params"])
  return {"encoder": init(jax.random.key(config.eval.random_encoder_seed))}


def draw_w(model, mean, logvar, seed) -> np.ndarray:
  """One w ~ q(w|x) per image from the encoder's outputs [N, D] (categorical: probabilities
  and their logs): float32 [N, D] (categorical: one-hot groups, as the decoder sees them)."""
  if model.latent_kind == "categorical":
    logq = np.asarray(logvar, np.float64).reshape(len(mean), -1, model.categories)
    codes = latent_diagnostics.draw_codes(logq, 1, seed=seed)[0]
    return np.eye(model.categories, dtype=np.float32)[codes].reshape(len(mean), -1)
  return diagnostics.draw_latents(mean, logvar, 1, seed=seed)[0].astype(np.float32)


def run(ctx) -> Section:
  ds, e, model, mesh = ctx.ds, ctx.config.eval, ctx.model, ctx.mesh
  if ctx.labels is None or ds.train_labels is None:
    return Section()
  # a config saved before the key existed (a report's) probes every feature set
  wanted = _parse(e.get("probe_features", ",".join(PROBE_FEATURES)))
  tr_imgs = _head(ds.train_images, e.probe_max_train)
  tr_y = _head(ds.train_labels, e.probe_max_train)
  feats = {}
  if "pixels" in wanted:
    feats["pixels"] = (probe_lib.pixel_features(tr_imgs), probe_lib.pixel_features(ctx.images))
  if model.conditional:
    enc = diagnostics.make_encode_fn(model, mesh)
    if {"encoder", "encoder_w"} & set(wanted):
      moments = ctx.shared.get("mean"), ctx.shared.get("logvar")
      if moments[0] is None:
        moments = diagnostics.encode_split(enc, ctx.params, ctx.images, e.batch_size, mesh)
      tr_moments = diagnostics.encode_split(enc, ctx.params, tr_imgs, e.batch_size, mesh)
      if "encoder" in wanted:
        feats["encoder"] = (tr_moments[0], moments[0])
      if "encoder_w" in wanted and not ctx.config.collapse.deterministic_encoder:
        seed = eval_seed(ctx.config)
        feats["encoder_w"] = (draw_w(model, *tr_moments, seed=(seed, PROBE_W, 0)),
                              draw_w(model, *moments, seed=(seed, PROBE_W, 1)))
    if "random_encoder" in wanted:
      rand = random_encoder_params(model, ctx.config, ds.image_shape)
      rand_mean = diagnostics.encode_split(enc, rand, ctx.images, e.batch_size, mesh)[0]
      ctx.shared["rand_mean"] = rand_mean
      feats["random_encoder"] = (diagnostics.encode_split(enc, rand, tr_imgs, e.batch_size,
                                                          mesh)[0], rand_mean)
  res = probe_lib.run_probes(feats, tr_y, ctx.labels, e, seed=eval_seed(ctx.config))
  metrics = {}
  for name, r in res.items():
    metrics.update({f"{name}_logreg_acc": r["logreg_acc"],
                    f"{name}_logreg_acc_se": r["logreg_acc_se"], f"{name}_knn_acc": r["knn_acc"],
                    f"{name}_label_info_bits": r["label_info_bits"]})
  return Section(metrics=metrics, report={"probes": {"results": res, "num_train": len(tr_imgs),
                                                     "num_eval": len(ctx.images)}})
