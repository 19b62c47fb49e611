"""Collapse diagnostics of conditional models: encoder KL, active units, I_q(x; w),
usefulness of w (definitions in `vdmrep/diagnostics.py`).

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

from vdmrep import diagnostics
from vdmrep.evaluators import MI, USEFUL, Section, _head, eval_seed


def run(ctx) -> Section:
  if not ctx.model.conditional:
    return Section()
  model, params, config, mesh, e = ctx.model, ctx.params, ctx.config, ctx.mesh, ctx.config.eval
  det = bool(config.collapse.deterministic_encoder)
  seed = (eval_seed(config), MI)
  mean, logvar = diagnostics.encode_split(diagnostics.make_encode_fn(model, mesh), params,
                                          ctx.images, e.batch_size, mesh)
  au, var = diagnostics.active_units(mean, e.active_threshold)
  metrics = {"latent_dim": int(mean.shape[1]), "active_units": au,
             "active_threshold": e.active_threshold}
  std = None
  if det:
    std = ctx.shared.get("fitted_posterior_std")
  q_logvar = logvar if not det else (None if std is None else
                                     np.full_like(mean, 2.0 * math.log(std)))
  kl_dims = None
  if q_logvar is not None:
    kl = diagnostics.kl_summary(mean, q_logvar)
    kl_dims = kl["kl_per_dim_nats"]
    metrics.update({k: kl[k] for k in ("kl_nats", "kl_nats_se", "kl_nats_per_dim")})
    w = diagnostics.draw_latents(mean, q_logvar, e.mi_samples, seed=seed)
    metrics.update(diagnostics.mutual_information(mean, q_logvar, w))
  else:  # a point mass: infinite KL; I(x; w) = H(w) = log(#distinct means) exactly
    w = mean[None].astype(np.float64)
    distinct = len(np.unique(np.asarray(mean), axis=0))
    metrics.update(kl_nats=float("nan"), kl_nats_se=float("nan"),
                   kl_nats_per_dim=float("nan"), mi_nats=math.log(distinct),
                   mi_nats_se=0.0, mi_upper_nats=math.log(len(mean)), mi_samples=0)
  metrics["kl_kind"] = ("encoder" if not det else
                        "fitted_posterior_std" if std is not None else "point_mass")
  use = diagnostics.usefulness(
      diagnostics.make_usefulness_fn(model, mesh, det), params,
      _head(ctx.images, e.usefulness_max_examples), jax.random.fold_in(ctx.key, USEFUL),
      num_t=e.usefulness_num_t, batch_size=e.batch_size, mesh=mesh, num_dims=ctx.num_dims)
  metrics["usefulness_gap_bpd"] = use["gap_mean_bpd"]
  ctx.shared.update(mean=mean, logvar=logvar, usefulness=use)
  per_dim = {"mean_variance": var}
  if kl_dims is not None:
    per_dim["kl_nats"] = kl_dims
  return Section(metrics=metrics, report={"per_dim": per_dim, "usefulness": use},
                 arrays={"mean": mean, "logvar": logvar, "w_mi": w})
