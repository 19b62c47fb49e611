"""The held-out negative ELBO and the trained objective.

The ELBO reported here weights the encoder KL by 1 (whatever beta training used), so
for any parameters it is an upper bound on -log2 p(x) per dimension, up to Monte Carlo
error: K draws of (w, z_0, t, eps) per image (`config.eval.num_time_samples`), t
stratified per image (`eval_times`). K and the eval seed are in the metrics; the
standard error is over images and does not include the spread between eval seeds or
between training seeds (compare rows with `report.paired_difference` or over seeds).

Deterministic encoders (`config.collapse.deterministic_encoder`): training conditioned
the decoder on w = the encoder mean and never trained the log-variance head, so every
term here is computed at exactly that w. A point-mass q(w|x) has no finite KL to
N(0, I), so the ELBO of the trained model is not a bound; what is reported instead:
  * at_mean_*: recon + prior + diffusion at w = mean (what training saw; not a bound);
  * bpd: the ELBO of the same decoder with q(w|x) = N(mean(x), s^2 I), s a standard
    deviation fitted after training (the best of `config.eval.posterior_std_grid` on the
    first `posterior_fit_examples` training images, chosen before the eval images are
    seen). This is a real bound, labelled bound_kind = "fitted_posterior_std"; with an
    empty grid, bpd is absent (bound_kind = "none").
The trained objective is evaluated at step - 1, the last step training applied.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdmrep import collapse, losses, parallel
from vdmrep import data as data_lib
from vdmrep.evaluators.base import ELBO, FIT, OBJECTIVE, Section, _parse, eval_seed
from vdmrep.models.vae_vdm import ELBO_TERMS as TERMS

# How w is drawn for the ELBO: the encoder's Gaussian; w = mean (no KL); N(mean, s^2 I).
W_MODES = ("encoder", "mean", "fixed_std")


def eval_times(key, batch: int, num_samples: int):
  """[K, B] diffusion times: for each image its own K stratified times (u_i + k/K) mod 1.

  Training's antithetic sampling spreads one uniform over the *batch*, which makes the
  times of neighbouring images dependent: the few real images of a padded last batch (or
  a small OOD set) would all get nearly the same t. Here u_i are independent, so
  per-image estimates are independent (the standard error over images is valid, and an
  image's score does not depend on its batch position) and each is stratified over its K draws.
  """
  u = jax.random.uniform(key, (batch,))
  return jnp.mod(u[None, :] + jnp.arange(num_samples)[:, None] / num_samples, 1.0)


def _eval_terms(params, batch, key, posterior_std, *, model, num_samples, w_mode):
  """Per-image terms averaged over K draws of (w, z_0, t, eps): dict of [B] nats.

  w_mode 'encoder': w ~ q(w|x) as trained; 'mean': w = encoder mean, "kl" = 0 (no finite
  KL exists); 'fixed_std': w ~ N(mean, posterior_std^2 I), "kl" its closed form.
  """
  k_t, k_rest = jax.random.split(key)
  times = eval_times(k_t, batch.shape[0], num_samples)
  mean = logvar = None
  if model.conditional and w_mode != "encoder":
    mean, _ = model.encode(params, batch)
    logvar = jnp.full_like(mean, 2.0 * jnp.log(posterior_std))

  def one(args):
    t, k = args
    k_w, k_terms = jax.random.split(k)
    w = None
    if w_mode == "mean" and mean is not None:
      w = mean
    elif w_mode == "fixed_std" and mean is not None:
      w = mean + posterior_std * jax.random.normal(k_w, mean.shape)
    terms = model.elbo_terms(params, batch, k_terms if w_mode != "encoder" else k, t=t, w=w)
    out = terms.bound_terms()
    if w_mode == "mean" and mean is not None:
      out["kl"] = jnp.zeros_like(out["kl"])
    elif w_mode == "fixed_std" and mean is not None:
      out["kl"] = jnp.sum(losses.gaussian_kl_per_dim(mean, logvar), axis=-1)
    return out
  terms = jax.lax.map(one, (times, jax.random.split(k_rest, num_samples)))
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), terms)


@functools.lru_cache(maxsize=8)  # periodic evals reuse the compiled function
def make_eval_fn(model, mesh, num_samples, w_mode="encoder"):
  """Jitted (params, batch, key, posterior_std) -> dict of [B] nats (see `_eval_terms`)."""
  repl = parallel.replicated(mesh)
  return jax.jit(functools.partial(_eval_terms, model=model, num_samples=num_samples,
                                   w_mode=w_mode),
                 in_shardings=(repl, parallel.batch_sharded(mesh), repl, repl),
                 out_shardings=repl)


def per_image_terms(eval_fn, params, images, key, batch_size, mesh, posterior_std=1.0):
  """Per-image ELBO terms over all `images`: dict of float64 [N] nats (host numpy)."""
  out = {k: [] for k in TERMS}
  std = jnp.asarray(posterior_std, jnp.float32)
  for i, (batch, mask) in enumerate(data_lib.eval_batches(images, batch_size)):
    terms = eval_fn(params, parallel.shard_full_batch(mesh, batch), jax.random.fold_in(key, i),
                    std)
    keep = mask > 0
    for k in TERMS:
      out[k].append(np.asarray(terms[k], np.float64)[keep])
  return {k: np.concatenate(v) for k, v in out.items()}


def summarize(per_image: dict, num_dims: int, prefix: str = "") -> dict:
  """Means and standard errors (over images) of every term and of the total, in bits/dim."""
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  per_image = dict(per_image)
  per_image["total"] = sum(per_image[k] for k in TERMS)
  n = len(per_image["total"])
  out = {"num_images": n}
  for k, v in per_image.items():
    out[f"{prefix}{k}_bpd"] = float(np.mean(v) * to_bpd)
    out[f"{prefix}{k}_bpd_se"] = (float(np.std(v, ddof=1) / math.sqrt(n) * to_bpd)
                                  if n > 1 else float("nan"))
  out[f"{prefix}bpd"], out[f"{prefix}bpd_se"] = out[f"{prefix}total_bpd"], out[f"{prefix}total_bpd_se"]
  return out


def per_image_bpd(per_image: dict, num_dims: int) -> np.ndarray:
  """The negative ELBO of each image in bits/dim: [N] (the OOD score)."""
  return sum(per_image[k] for k in TERMS) / (num_dims * math.log(2.0))


def evaluate_elbo(model, params, images, *, seed, num_samples, batch_size, mesh):
  """Test-set negative ELBO (bits/dim, beta = 1), each term alone, and standard errors."""
  eval_fn = make_eval_fn(model, mesh, num_samples)
  per_image = per_image_terms(eval_fn, params, images, jax.random.key(seed), batch_size, mesh)
  return summarize(per_image, int(np.prod(images.shape[1:])))


# -- deterministic encoders: a posterior standard deviation fitted after training --------
def fit_posterior_std(model, params, images, key, *, grid, num_samples, batch_size, mesh):
  """The s of `grid` whose q(w|x) = N(mean(x), s^2 I) gives the lowest ELBO on `images`.

  Returns (s, {s: bpd on `images`}); `images` should be training images, so the eval
  split's bound is not selected on itself.
  """
  fn = make_eval_fn(model, mesh, num_samples, "fixed_std")
  d = int(np.prod(images.shape[1:]))
  scores = {}
  for s in grid:
    per = per_image_terms(fn, params, images, key, batch_size, mesh, posterior_std=s)
    scores[float(s)] = float(np.mean(per_image_bpd(per, d)))
  return min(scores, key=scores.get), scores


# -- the trained objective ------------------------------------------------------------
def _objective_batch(params, batch, key, step, *, model, config, num_samples):
  """The training objective (nats/image, batch mean, K-draw mean) on one eval batch."""
  def one(k):
    k_terms, k_obj = jax.random.split(k)  # k_obj: the MMD's prior samples, if any
    terms = model.elbo_terms(params, batch, k_terms, train=False,
                             deterministic_encoder=config.collapse.deterministic_encoder)
    return collapse.objective(terms, step, config, k_obj)[0]
  return jnp.mean(jax.lax.map(one, jax.random.split(key, num_samples)))


@functools.lru_cache(maxsize=8)
def _make_objective_fn(model, mesh, frozen_config):
  repl = parallel.replicated(mesh)
  return jax.jit(functools.partial(_objective_batch, model=model, config=frozen_config,
                                   num_samples=frozen_config.eval.num_time_samples),
                 in_shardings=(repl, parallel.batch_sharded(mesh), repl, repl),
                 out_shardings=repl)


def trained_objective(model, params, images, key, step, config, mesh) -> dict:
  """The objective of training step `step` on `images` in bits/dim, with its standard error.

  Batch-level terms (MMD, batch free bits, capacity) depend on the batch, so batches
  have the training batch size and only whole batches are used (the remainder is
  dropped; `num_images` says how many were used). The standard error is over batches.
  """
  ndev = jax.device_count()
  bsz = min(config.training.batch_size, len(images) - len(images) % ndev)
  fn = _make_objective_fn(model, mesh, ml_collections.FrozenConfigDict(config))
  vals = [float(fn(params, parallel.shard_full_batch(mesh, images[s:s + bsz]),
                   jax.random.fold_in(key, i), jnp.asarray(step, jnp.int32)))
          for i, s in enumerate(range(0, len(images) - bsz + 1, bsz))]
  to_bpd = 1.0 / (int(np.prod(images.shape[1:])) * math.log(2.0))
  se = np.std(vals, ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
  return {"bpd": float(np.mean(vals) * to_bpd), "bpd_se": float(se * to_bpd),
          "num_images": len(vals) * bsz, "batch_size": bsz}


def last_trained_step(step: int) -> int:
  """Parameters after `step` optimiser steps were last updated by the step numbered step - 1."""
  return max(int(step) - 1, 0)


# -- the evaluator ----------------------------------------------------------------------
def run(ctx) -> Section:
  model, params, config, mesh = ctx.model, ctx.params, ctx.config, ctx.mesh
  e = config.eval
  det = bool(model.conditional and config.collapse.deterministic_encoder)
  k = functools.partial(jax.random.fold_in, ctx.key)
  metrics = {"eval_num_time_samples": int(e.num_time_samples), "eval_seed": eval_seed(config)}
  if not det:
    fn = make_eval_fn(model, mesh, e.num_time_samples)
    per = per_image_terms(fn, params, ctx.images, k(ELBO), e.batch_size, mesh)
    metrics.update(summarize(per, ctx.num_dims), bound_kind="elbo")
    std = 1.0
  else:
    fn_mean = make_eval_fn(model, mesh, e.num_time_samples, "mean")
    at_mean = per_image_terms(fn_mean, params, ctx.images, k(ELBO), e.batch_size, mesh)
    metrics.update(summarize(at_mean, ctx.num_dims, prefix="at_mean_"))
    grid = [float(s) for s in _parse(e.posterior_std_grid)]
    if grid:
      fit_imgs = ctx.ds.train_images[:e.posterior_fit_examples or None]
      std, scores = fit_posterior_std(model, params, fit_imgs, k(FIT), grid=grid,
                                      num_samples=e.num_time_samples,
                                      batch_size=e.batch_size, mesh=mesh)
      fn = make_eval_fn(model, mesh, e.num_time_samples, "fixed_std")
      per = per_image_terms(fn, params, ctx.images, k(ELBO), e.batch_size, mesh, std)
      metrics.update(summarize(per, ctx.num_dims), bound_kind="fitted_posterior_std",
                     fitted_posterior_std=std, posterior_fit_images=len(fit_imgs))
      ctx.shared.update(fitted_posterior_std=std, posterior_std_scores=scores)
    else:  # no bound: downstream scores (OOD, baselines) use the decoder at w = mean
      fn, std, per = fn_mean, 1.0, at_mean
      metrics.update(num_images=len(ctx.images), bound_kind="none",
                     bpd=float("nan"), bpd_se=float("nan"))
  bpd_per_image = per_image_bpd(per, ctx.num_dims)
  ctx.shared.update(per_image=per, per_image_bpd=bpd_per_image)
  ctx.shared["score_fn"] = lambda imgs, key: per_image_bpd(
      per_image_terms(fn, params, imgs, key, e.batch_size, mesh, std),
      int(np.prod(imgs.shape[1:])))

  obj_step = last_trained_step(ctx.step)
  bound, why = collapse.is_bound_at(config, obj_step)
  run_bound, run_why = collapse.is_bound(config)
  if bound:
    metrics.update(objective_bpd=metrics["bpd"], objective_bpd_se=metrics["bpd_se"])
  else:
    obj = trained_objective(model, params, ctx.images, k(OBJECTIVE), obj_step, config, mesh)
    metrics.update(objective_bpd=obj["bpd"], objective_bpd_se=obj["bpd_se"],
                   objective_num_images=obj["num_images"])
  metrics.update(objective_step=obj_step, objective_is_bound=bound,
                 objective_not_bound_reason=why, run_trained_elbo_throughout=run_bound,
                 run_not_elbo_reason=run_why)
  return Section(metrics=metrics,
                 report={"per_image": {"bpd": bpd_per_image}, "eval_key": eval_key(ctx)})


def eval_key(ctx) -> dict:
  """What must agree for two reports' per-image values to be paired image by image: the
  eval images themselves (source, split, count and a position-weighted checksum)."""
  d, e = ctx.config.data, ctx.config.eval
  digest = np.asarray(ctx.images, np.uint8)
  return {"source": d.source, "split_seed": int(d.split_seed),
          "eval_fraction": float(d.eval_fraction), "max_examples": int(e.max_examples),
          "ood_holdout_class": int(e.ood_holdout_class), "num_images": len(ctx.images),
          "images_checksum": int(np.sum(digest.astype(np.int64)
                                        * (np.arange(digest.size) % 7919 + 1).reshape(digest.shape)))}
