"""Latent diagnostics of conditional models: the rate (KL), active units, I_q(x; w), the
aggregate-posterior mismatch KL(q(w) || p(w)), the usefulness of w and its per-band
saving against the rate (definitions in `vdmrep/diagnostics.py` and
`vdmrep/latent_diagnostics.py`).

The rate is the bound's KL term: closed form for the N(0, I) prior and for a categorical
latent; for the learned Gaussian priors (mixture, VampPrior, flow, diffusion) it is the
ELBO evaluator's Monte Carlo estimate per image ("per_image" in `ctx.shared`; its
standard error includes the Monte Carlo error), or, when `elbo` did not run, the same
estimate from this evaluator's draws of w.

Deterministic encoders (w = encoder mean, the log-variance head never trained) are
measured with the w they were trained with: the usefulness of w conditions on the mean;
the KL and I_q(x; w) are those of q(w|x) = N(mean, s^2 I) with the posterior standard
deviation s fitted after training (elbo.py), labelled kl_kind = "fitted_posterior_std".
Without a fitted s, the KL of a point mass is infinite (not reported) and I_q(x; w) is
exactly log(number of distinct means): w determines the image.
"""
from __future__ import annotations

import math

import jax
import numpy as np

from vdmrep import diagnostics, latent_diagnostics
from vdmrep.evaluators.base import MI, USEFUL, Section, _head, eval_seed


def _gaussian_log_own(mean, logvar, w) -> np.ndarray:
  """log q(w_s,i | x_i) of draws w [S, N, D] under their own posteriors: [S, N] nats."""
  mean, logvar = np.asarray(mean, np.float64)[None], np.asarray(logvar, np.float64)[None]
  return -0.5 * np.sum(math.log(2 * math.pi) + logvar + (w - mean) ** 2 * np.exp(-logvar),
                       axis=-1)


def _categorical_kl(model, params, logq) -> np.ndarray:
  """Exact KL(q(w|x) || p(w)) of a categorical latent, logq [N, M, K]: [N, M] nats."""
  logp = np.asarray(model.prior_logits(params), np.float64)[None]
  return np.sum(np.exp(logq) * (logq - logp), axis=-1)


def run(ctx) -> Section:
  if not ctx.model.conditional:
    return Section()
  model, params, config, mesh, e = ctx.model, ctx.params, ctx.config, ctx.mesh, ctx.config.eval
  det = bool(config.collapse.deterministic_encoder)
  seed = (eval_seed(config), MI)
  mean, logvar = diagnostics.encode_split(diagnostics.make_encode_fn(model, mesh), params,
                                          ctx.images, e.batch_size, mesh)
  # (categorical: mean and logvar are the class probabilities and their logs)
  au, var = diagnostics.active_units(mean, e.active_threshold)
  metrics = {"latent_dim": int(mean.shape[1]), "active_units": au,
             "active_threshold": e.active_threshold}
  per_dim = {"mean_variance": var}
  kl_image = kl_split = None  # [N] rate per image; its closed-form split
  log_q_agg = None  # [S, N] log q(w) of the draws (aggregate posterior)
  if model.latent_kind == "categorical":
    logq = np.asarray(logvar, np.float64).reshape(len(mean), -1, model.categories)
    codes = latent_diagnostics.draw_codes(logq, e.mi_samples, seed=seed)
    w = np.eye(model.categories, dtype=np.float32)[codes].reshape(codes.shape[:2] + (-1,))
    log_q_agg = latent_diagnostics.categorical_log_aggregate(logq, codes)
    metrics.update(latent_diagnostics.categorical_mi(logq, codes, log_q_agg))
    kl_split = _categorical_kl(model, params, logq)  # per group
    kl_image, kind = kl_split.sum(-1), "encoder"
  else:
    std = ctx.shared.get("fitted_posterior_std") if det else None
    q_logvar = logvar if not det else (None if std is None else
                                       np.full_like(mean, 2.0 * math.log(std)))
    kind = "encoder" if not det else "point_mass" if q_logvar is None else "fitted_posterior_std"
    if q_logvar is not None:
      w = diagnostics.draw_latents(mean, q_logvar, e.mi_samples, seed=seed)
      metrics.update(diagnostics.mutual_information(mean, q_logvar, w))
      log_q_agg = latent_diagnostics.gaussian_log_aggregate(mean, q_logvar, w)
      if model.prior is None or model.prior.closed_form_kl:  # N(0, I)
        kl_split = diagnostics.kl_per_dim(mean, q_logvar)
        kl_image = kl_split.sum(-1)
    else:  # a point mass: infinite KL; I(x; w) = H(w) = log(#distinct means) exactly
      w = mean[None].astype(np.float64)
      distinct = len(np.unique(np.asarray(mean), axis=0))
      metrics.update(mi_nats=math.log(distinct), mi_nats_se=0.0,
                     mi_upper_nats=math.log(len(mean)), mi_samples=0)
  metrics["kl_kind"] = kind

  if log_q_agg is not None:
    log_p = latent_diagnostics.prior_log_prob(model, params, w, jax.random.fold_in(ctx.key, MI),
                                              mesh)
    metrics.update(latent_diagnostics.mismatch(log_q_agg, log_p))
    if kl_image is None:  # a learned Gaussian prior: Monte Carlo
      kl_image = ctx.shared.get("per_image", {}).get("kl")
      if kl_image is None or det:  # this evaluator's draws: mean_s log q(w_s|x) - log p(w_s)
        kl_image = np.mean(_gaussian_log_own(mean, q_logvar, w) - log_p, axis=0)
  if kl_image is None:
    metrics.update(kl_nats=float("nan"), kl_nats_se=float("nan"),
                   kl_nats_per_dim=float("nan"))
  else:
    kl_nats, kl_se = latent_diagnostics._mean_se(kl_image)
    metrics.update(kl_nats=kl_nats, kl_nats_se=kl_se, kl_nats_per_dim=kl_nats / mean.shape[1])
  if kl_split is not None:
    per_dim["kl_nats"] = kl_split.mean(axis=0)  # [D] per dimension, or [M] per group
  if model.committed_rate_per_dim:
    metrics["committed_rate_nats"] = model.committed_rate_per_dim * int(mean.shape[1])

  use = diagnostics.usefulness(
      diagnostics.make_usefulness_fn(model, mesh, det), params,
      _head(ctx.images, e.usefulness_max_examples), jax.random.fold_in(ctx.key, USEFUL),
      # a VAE decoder's loss does not depend on t: one grid point is exact
      num_t=e.usefulness_num_t if model.score_net is not None else 1,
      batch_size=e.batch_size, mesh=mesh, num_dims=ctx.num_dims)
  metrics["usefulness_gap_bpd"] = use["gap_mean_bpd"]
  gamma = None if (model.score_net is None or model.per_pixel_schedule) else (
      lambda t: model.gamma(params, np.asarray(t, np.float32)))
  bands = latent_diagnostics.band_savings(
      use, metrics["kl_nats"], ctx.num_dims, gamma,
      term=model.decoder_term)
  metrics.update(saving_nats=bands["saving_total_nats"], net_nats=bands["net_nats"])
  ctx.shared.update(mean=mean, logvar=logvar, usefulness=use)
  return Section(metrics=metrics,
                 report={"per_dim": per_dim, "usefulness": use, "bands": bands},
                 arrays={"mean": mean, "logvar": logvar, "w_mi": w})
