"""Steering generation: class agreement of class-conditional samples, latent arithmetic
with class means in w, interpolation that respects the model's prior p(w), and timed
sampler sweeps (sampler x steps, guidance weight).

Everything here is built on `sampling` (the samplers) and a trained feature classifier
(`classifier.FeatureClassifier`); `experiments/sampling.py` turns it into the tables of
docs/sampling.md.

Latent arithmetic (as in the conditional-VAE and diffusion-autoencoder literature): the
class mean m_k = E[mean(q(w | x)) | y = k] over eval images, the overall mean m, and the
attribute direction d_k = m_k - m; w + a d_k moves a latent towards class k. It can only
work when w carries class information (an informative, non-collapsed encoder); the
class agreement of samples decoded from m_k says whether it does.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import data as data_lib
from vdmrep import quality, sampling
from vdmrep.models import priors


# -- latent arithmetic -------------------------------------------------------------
def class_means(w, labels, num_classes: int):
  """(class means [K, D], overall mean [D], attribute directions [K, D] = m_k - m).

  w: [N, D] latents (usually encoder means); labels: int [N]. A class with no example
  gets the overall mean (direction 0).
  """
  w, labels = np.asarray(w, np.float64), np.asarray(labels)
  overall = w.mean(axis=0)
  means = np.stack([w[labels == k].mean(axis=0) if np.any(labels == k) else overall
                    for k in range(num_classes)])
  return means, overall, means - overall[None]


def interpolate_in_prior(model, params, w_a, w_b, alphas, method="slerp", *, rng=None,
                         moment_samples: int = 4096):
  """Paths between latents w_a, w_b ([P, D] each) that respect the model's prior: [P, S, D].

  Slerp keeps a path at the typical radius of N(0, I); each prior gets the coordinates in
  which it is (close to) N(0, I):
    standard normal: w itself;
    coupling flow: its base space y = f(w), where the prior is exactly N(0, I), mapped
      back with f^-1 (the endpoints come back up to the flow's round-off);
    mixture, VampPrior, latent diffusion: no such map exists in closed form, so the
      whitened coordinates of the Gaussian with the prior's mean and per-dimension
      standard deviation, estimated from `moment_samples` draws of p(w) (key `rng`).
  method: "slerp" or "linear". A categorical latent has no path between codes.
  """
  if model.latent_kind == "categorical":
    raise ValueError("interpolate_in_prior: a categorical latent has no path between codes")
  prior = model.prior
  if prior is None or isinstance(prior, priors.StandardNormal):
    return sampling.interpolate(w_a, w_b, alphas, method)
  variables = {"params": params.get("prior", {})}
  if isinstance(prior, priors.CouplingFlow):
    to_base = lambda w: prior.apply(variables, jnp.asarray(w, jnp.float32),
                                    method=prior.forward)[0]
    y = sampling.interpolate(to_base(w_a), to_base(w_b), alphas, method)
    w = prior.apply(variables, y.reshape(-1, y.shape[-1]), method=prior.inverse)
    return w.reshape(y.shape)
  if rng is None:
    raise ValueError(f"interpolate_in_prior: a {type(prior).__name__} prior needs `rng` "
                     "(its moments are estimated from draws)")
  draws = np.asarray(model.sample_prior(params, rng, moment_samples), np.float64)
  return interpolate_under_prior(w_a, w_b, alphas, method, prior_mean=draws.mean(0),
                                 prior_scale=draws.std(0) + 1e-6)


def attribute_walk(w, direction, scales):
  """w + a d for each a in scales: w [P, D], direction [D] -> [P, S, D]."""
  w = np.asarray(w, np.float64)
  a = np.asarray(scales, np.float64)[None, :, None]
  return w[:, None, :] + a * np.asarray(direction, np.float64)[None, None, :]


def interpolate_under_prior(w_a, w_b, alphas, method="slerp", prior_mean=None,
                            prior_scale=None):
  """`sampling.interpolate` in the whitened coordinates of a Gaussian prior N(mu, s^2).

  Slerp keeps a path at the typical radius of N(0, I); for a learned Gaussian prior
  (or a mixture component, or a flow's base) the same holds after u = (w - mu) / s.
  prior_mean, prior_scale: [D] (None: the standard prior). Returns [P, S, D].
  """
  mu = 0.0 if prior_mean is None else jnp.asarray(prior_mean)
  s = 1.0 if prior_scale is None else jnp.asarray(prior_scale)
  u = sampling.interpolate((jnp.asarray(w_a) - mu) / s, (jnp.asarray(w_b) - mu) / s,
                           alphas, method)
  return u * s + mu


def samples_for_latents(model, params, key, w, labels, image_shape, *, num_steps,
                        sampler="ancestral", guidance=0.0, decode_method="sample"):
  """One sample per latent w [N, D] (labels [N] or None), all sharing z_1 and the
  sampler noise of `key`, so that only w (and y) differ: int [N, H, W, C]."""
  k_z, k_run = jax.random.split(key)
  w = jnp.asarray(w, jnp.float32)
  z = jnp.broadcast_to(jax.random.normal(k_z, (1,) + tuple(image_shape)),
                       (w.shape[0],) + tuple(image_shape))
  lab = None if labels is None else jnp.asarray(labels, jnp.int32)
  run = jax.jit(lambda p, w_, z_, y_: sampling.sample_from(
      model, p, k_run, w_, z_, num_steps=num_steps, sampler=sampler, labels=y_,
      guidance=guidance, decode_method=decode_method)[0])
  return np.asarray(run(params, w, z, lab))


# -- measurements ------------------------------------------------------------------
def class_agreement(clf, images, labels) -> float:
  """Fraction of images [N, H, W, C] the feature classifier assigns to labels [N]."""
  return float(np.mean(clf.predict(images) == np.asarray(labels)))


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """0, 1, ..., K-1, 0, 1, ... (int32 [num])."""
  return (np.arange(num) % num_classes).astype(np.int32)


def timed_samples(model, params, key, *, num, image_shape, batch_size, num_steps,
                  sampler="ancestral", labels=None, guidance=0.0, decode_method="sample"):
  """Class-conditional (or unconditional, labels None) samples and the wall time of the
  sampling alone: compiled ahead of time, so the seconds exclude compilation.

  Returns (images uint8 [num, H, W, C], seconds per image). Batch i uses fold_in(key, i),
  as `sampling.generate` does.
  """
  inputs = np.zeros((num,) + tuple(image_shape), np.uint8)
  lab_b = None if labels is None else [l for l, _ in data_lib.eval_batches(
      np.asarray(labels, np.int32), batch_size)]
  fn = jax.jit(lambda p, k, x, y: sampling.run_mode(
      model, p, k, x, mode="unconditional", num_steps=num_steps, sampler=sampler,
      labels=y, guidance=guidance, decode_method=decode_method)[0])
  batches = list(data_lib.eval_batches(inputs, batch_size))
  compiled = fn.lower(params, key, batches[0][0],
                      None if lab_b is None else lab_b[0]).compile()
  outs, start = [], time.perf_counter()
  for i, (batch, mask) in enumerate(batches):
    y = None if lab_b is None else lab_b[i]
    x = compiled(params, jax.random.fold_in(key, i), batch, y)
    outs.append(np.asarray(x)[mask > 0])
  seconds = time.perf_counter() - start
  return np.concatenate(outs).astype(np.uint8), seconds / num


def sample_row(clf, train_features, images, labels) -> dict:
  """FD (classifier features, vs the training split) and class agreement of samples."""
  _, feats = clf.apply(images)
  row = {"fd": quality.fd_from_features(feats, train_features), "num": int(len(images))}
  if labels is not None:
    row["class_agreement"] = class_agreement(clf, images, labels)
  return row


def elbo_bpd(model, params, images, labels, key, *, num_samples: int = 4,
             batch_size: int = 256) -> dict:
  """Negative ELBO at beta = 1 in bits/dim: mean and standard error over images.

  With labels [N] it is the conditional VAE's bound on -log p(x | y); with labels None a
  class-conditional model runs its unconditional path (the "no label" token), a bound on
  -log p(x). Each image gets `num_samples` stratified times, as in `evaluators.elbo`.
  """
  from vdmrep.evaluators import elbo as elbo_eval  # imports much; only this needs it

  @jax.jit
  def per_image(p, x, y, k):
    k_t, k_rest = jax.random.split(k)
    times = elbo_eval.eval_times(k_t, x.shape[0], num_samples)

    def one(args):
      t, kk = args
      return model.elbo_terms(p, x, kk, t=t, y=y).total
    return jnp.mean(jax.lax.map(one, (times, jax.random.split(k_rest, num_samples))), 0)

  images = np.asarray(images)
  lab = None if labels is None else list(data_lib.eval_batches(np.asarray(labels, np.int32),
                                                                batch_size))
  nats = []
  for i, (batch, mask) in enumerate(data_lib.eval_batches(images, batch_size)):
    y = None if lab is None else lab[i][0]
    nats.append(np.asarray(per_image(params, batch, y, jax.random.fold_in(key, i)),
                           np.float64)[mask > 0])
  bpd = np.concatenate(nats) / (np.prod(images.shape[1:]) * np.log(2.0))
  return {"bpd": float(bpd.mean()), "bpd_se": float(bpd.std(ddof=1) / np.sqrt(len(bpd))),
          "num_images": int(len(bpd))}
