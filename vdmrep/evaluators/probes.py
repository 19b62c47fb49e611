"""Probes on encoder means, the same encoder at random init, and raw pixels (labelled data).

The probes themselves (standardised logistic regression with C chosen by cross-validation,
k-NN, I(features; label) in bits) are `vdmrep/probes.py`. Features of a deterministic
encoder are its means, the w it was trained with.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vdmrep import diagnostics
from vdmrep import probes as probe_lib
from vdmrep.evaluators.base import Section, _head, eval_seed


def random_encoder_params(model, config, image_shape) -> dict:
  """The encoder's parameters at initialisation (`config.eval.random_encoder_seed`): the
  random-features baseline of the probes and latent maps. Only the encoder is built."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  init = jax.jit(lambda k: model.encoder.init(k, x)["params"])
  return {"encoder": init(jax.random.key(config.eval.random_encoder_seed))}


def run(ctx) -> Section:
  ds, e, model, mesh = ctx.ds, ctx.config.eval, ctx.model, ctx.mesh
  if ctx.labels is None or ds.train_labels is None:
    return Section()
  tr_imgs = _head(ds.train_images, e.probe_max_train)
  tr_y = _head(ds.train_labels, e.probe_max_train)
  feats = {"pixels": (probe_lib.pixel_features(tr_imgs), probe_lib.pixel_features(ctx.images))}
  if model.conditional:
    enc = diagnostics.make_encode_fn(model, mesh)
    mean = ctx.shared.get("mean")
    if mean is None:
      mean = diagnostics.encode_split(enc, ctx.params, ctx.images, e.batch_size, mesh)[0]
    rand = random_encoder_params(model, ctx.config, ds.image_shape)
    rand_mean = diagnostics.encode_split(enc, rand, ctx.images, e.batch_size, mesh)[0]
    ctx.shared["rand_mean"] = rand_mean
    feats["encoder"] = (diagnostics.encode_split(enc, ctx.params, tr_imgs, e.batch_size,
                                                 mesh)[0], mean)
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
