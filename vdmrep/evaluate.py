"""Held-out evaluation: the negative ELBO in bits/dim with its standard error.

The ELBO reported here always weights the encoder KL by 1 (whatever beta training
used), so for any parameters it is an upper bound on -log2 p(x) per dimension, up to
Monte Carlo error (K draws of (w, z_0, t, eps) per image, `config.eval.num_time_samples`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import data as data_lib
from vdmrep import parallel

TERMS = ("recon", "prior", "diffusion", "kl")


def _eval_terms(params, batch, key, *, model, num_samples):
  """Per-image terms averaged over K draws: dict of [B] nats."""
  def one(k):
    t = model.elbo_terms(params, batch, k, train=False)
    return {name: t[name] for name in TERMS}
  terms = jax.lax.map(one, jax.random.split(key, num_samples))
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), terms)


def make_eval_fn(model, mesh, num_samples):
  return jax.jit(functools.partial(_eval_terms, model=model, num_samples=num_samples),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh),
                               parallel.replicated(mesh)),
                 out_shardings=parallel.replicated(mesh))


def per_image_terms(eval_fn, params, images, key, batch_size, mesh):
  """Per-image ELBO terms over all `images`: dict of float64 [N] nats (host numpy)."""
  out = {k: [] for k in TERMS}
  for i, (batch, mask) in enumerate(data_lib.eval_batches(images, batch_size)):
    per = batch_size // jax.process_count()
    local = batch[jax.process_index() * per:(jax.process_index() + 1) * per]
    terms = eval_fn(params, parallel.global_batch(mesh, local), jax.random.fold_in(key, i))
    keep = mask > 0
    for k in TERMS:
      out[k].append(np.asarray(terms[k], np.float64)[keep])
  return {k: np.concatenate(v) for k, v in out.items()}


def summarize(per_image: dict, num_dims: int) -> dict:
  """Means and standard errors (over images) of every term and of the total, in bits/dim."""
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  per_image = dict(per_image)
  per_image["total"] = sum(per_image[k] for k in TERMS)
  n = len(per_image["total"])
  out = {"num_images": n}
  for k, v in per_image.items():
    out[f"{k}_bpd"] = float(np.mean(v) * to_bpd)
    out[f"{k}_bpd_se"] = float(np.std(v, ddof=1) / math.sqrt(n) * to_bpd) if n > 1 else float("nan")
  out["kl_nats"] = float(np.mean(per_image["kl"]))
  out["bpd"], out["bpd_se"] = out["total_bpd"], out["total_bpd_se"]
  return out


def evaluate_elbo(model, params, images, *, seed, num_samples, batch_size, mesh):
  """Test-set negative ELBO (bits/dim, beta = 1), each term alone, and standard errors."""
  eval_fn = make_eval_fn(model, mesh, num_samples)
  per_image = per_image_terms(eval_fn, params, images, jax.random.key(seed), batch_size, mesh)
  return summarize(per_image, int(np.prod(images.shape[1:])))
