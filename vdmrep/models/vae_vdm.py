"""The VAE-VDM: encoder q(w|x) + conditional VDM decoder p(x|w), as per-example ELBO terms.

This is the one place the objective's terms are computed; training, evaluation and the
studies all call `VAEVDM.elbo_terms`. Parameters are a plain dict
{"encoder": ..., "score": ..., "gamma": ...} ("encoder" absent when unconditional).

A class-conditional model (num_classes > 0) is a conditional VAE: p(x | w, y) (and
q(w | x, y) when the encoder takes labels) with the prior p(w) = N(0, I), so its negative
ELBO with labels is a bound on -log p(x | y). During training each label is replaced by
the "no label" token num_classes with probability label_dropout, so the same network
is also the unconditional model p(x | w) (y = None), the pair classifier-free guidance
needs; its negative ELBO without labels is a bound on -log p(x).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdmrep import losses
from vdmrep.models.encoder import Encoder
from vdmrep.models.schedules import gamma_and_derivative
from vdmrep.models.score_net import ScoreNet

# The terms of the negative ELBO (each [B] nats in `elbo_terms`); their sum is the bound.
ELBO_TERMS = ("recon", "prior", "diffusion", "kl")


@dataclasses.dataclass(frozen=True)
class VAEVDM:
  score_net: ScoreNet
  schedule: nn.Module
  encoder: Optional[Encoder] = None
  vocab_size: int = 256
  antithetic_time_sampling: bool = True
  num_classes: int = 0
  label_dropout: float = 0.0

  @property
  def conditional(self) -> bool:
    return self.encoder is not None

  @property
  def null_label(self) -> int:
    """The "no label" token of a class-conditional model."""
    return self.num_classes

  def drop_labels(self, rng, y):
    """y [B] with each label replaced by `null_label` with probability label_dropout."""
    if y is None or not self.label_dropout:
      return y
    drop = jax.random.bernoulli(rng, self.label_dropout, y.shape)
    return jnp.where(drop, self.null_label, y)

  # -- parameters ---------------------------------------------------------------
  def init(self, rng, image_shape) -> dict:
    """Parameters for images of shape (H, W, C)."""
    k_enc, k_score, k_gamma = jax.random.split(rng, 3)
    z = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    params = {"gamma": self.schedule.init(k_gamma, jnp.zeros(())).get("params", {})}
    w, y = None, (jnp.zeros((1,), jnp.int32) if self.num_classes else None)
    if self.conditional:
      params["encoder"] = self.encoder.init(k_enc, z, y)["params"]
      w = jnp.zeros((1, self.encoder.latent), jnp.float32)
    params["score"] = self.score_net.init(k_score, z, jnp.zeros((1,)), w, y)["params"]
    return params

  # -- the three networks -------------------------------------------------------
  def encoder_input(self, x_int):
    """The encoder sees the data in model scale, here and everywhere else."""
    return losses.data_to_model_scale(x_int, self.vocab_size)

  def encode(self, params, x_int, y=None):
    """x_int [B, H, W, C] (and labels y [B] if the encoder takes them) -> (mean, logvar)
    of q(w|x[, y]), each [B, D]."""
    return self.encoder.apply({"params": params["encoder"]}, self.encoder_input(x_int), y)

  def gamma(self, params, t):
    """gamma(t) for t scalar or [B]."""
    return self.schedule.apply({"params": params["gamma"]}, t)

  def eps_hat(self, params, z_t, gamma_t, w=None, y=None, *, dropout_rng=None):
    """Predicted noise [B, H, W, C]; y [B] labels (None: the unconditional path of a
    class-conditional model); dropout is on iff `dropout_rng` is given."""
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return self.score_net.apply({"params": params["score"]}, z_t, gamma_t, w, y,
                                deterministic=dropout_rng is None, rngs=rngs)

  # -- the objective ------------------------------------------------------------
  def sample_t(self, rng, batch: int):
    """[B] diffusion times; antithetic (evenly spaced from one uniform) by default."""
    if self.antithetic_time_sampling:
      t0 = jax.random.uniform(rng)
      return jnp.mod(t0 + jnp.arange(batch) / batch, 1.0)
    return jax.random.uniform(rng, (batch,))

  def elbo_terms(self, params, x_int, rng, *, train: bool = False, t=None, w=None,
                 deterministic_encoder: bool = False, y=None):
    """Per-example terms of the negative ELBO, each [B] in nats.

    Args:
      params: the parameter dict.
      x_int: [B, H, W, C] integer pixels.
      rng: PRNG key; all randomness (w, z_0, t, eps, dropout) comes from it.
      train: enables dropout in the score network.
      t: optional [B] diffusion times (default: `sample_t`).
      w: optional [B, D] latents to condition on instead of w ~ q(w|x) (the
        "usefulness of w" diagnostic feeds another image's w here).
      deterministic_encoder: w = the encoder mean, no noise (InfoDiffusion's encoder;
        "kl" is still that of the Gaussian the encoder outputs, for logging).
      y: optional [B] int labels of a class-conditional model (None: its unconditional
        path); with `train`, label dropout applies (its key is fold_in(rng, 7), so
        models without labels draw exactly what they drew before).
    Returns:
      dict with "recon", "prior", "diffusion", "kl" ([B] nats; kl is 0 when
      unconditional), the sampled "t" and "gamma_t" [B], and "gamma_0", "gamma_1" [B]
      (the endpoints; for weightings over noise levels) and, when conditional, "kl_per_dim" [B, D], "w" [B, D], "mean" and
      "logvar" [B, D].
    """
    k_w, k_0, k_t, k_eps, k_drop = jax.random.split(rng, 5)
    b = x_int.shape[0]
    f = losses.data_to_model_scale(x_int, self.vocab_size)
    if not self.num_classes:
      y = None
    elif train:
      y = self.drop_labels(jax.random.fold_in(rng, 7), y)
    out = {}
    if self.conditional:
      mean, logvar = self.encode(params, x_int, y)
      if w is None and deterministic_encoder:
        w = mean
      elif w is None:
        w = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_w, mean.shape)
      out.update(kl_per_dim=losses.gaussian_kl_per_dim(mean, logvar), w=w, mean=mean,
                 logvar=logvar)
      out["kl"] = jnp.sum(out["kl_per_dim"], axis=-1)
    else:
      out["kl"] = jnp.zeros((b,), jnp.float32)

    gamma_fn = lambda s: self.gamma(params, s)
    g_0, g_1 = gamma_fn(jnp.zeros(())), gamma_fn(jnp.ones(()))
    # Reconstruction: z_0 ~ q(z_0|x), decoded by the factorised discretised likelihood.
    eps_0 = jax.random.normal(k_0, f.shape)
    z_0_rescaled = f + jnp.exp(0.5 * g_0) * eps_0  # = z_0 / alpha_0
    out["recon"] = losses.reconstruction_loss(x_int, z_0_rescaled, g_0, self.vocab_size)
    out["prior"] = losses.prior_loss(f, g_1)
    # Diffusion: one t per example, z_t = alpha_t f + sigma_t eps.
    if t is None:
      t = self.sample_t(k_t, b)
    g_t, dg_dt = gamma_and_derivative(gamma_fn, t)
    eps = jax.random.normal(k_eps, f.shape)
    g = g_t[:, None, None, None]
    z_t = losses.alpha(g) * f + jnp.sqrt(losses.sigma2(g)) * eps
    eps_hat = self.eps_hat(params, z_t, g_t, w, y, dropout_rng=k_drop if train else None)
    out["diffusion"] = losses.diffusion_loss(eps, eps_hat, dg_dt)
    out.update(t=t, gamma_t=g_t, gamma_0=jnp.broadcast_to(g_0, (b,)),
               gamma_1=jnp.broadcast_to(g_1, (b,)))
    return out
