"""The VAE-VDM: encoder q(w|x) + conditional VDM decoder p(x|w), as per-example ELBO terms.

This is the one place the objective's terms are computed; training, evaluation and the
studies all call `VAEVDM.elbo_terms`, which returns an `ELBOTerms`. Parameters are a plain
dict {"encoder": ..., "score": ..., "gamma": ...[, "prior": ...]} ("encoder" absent when
unconditional).

A class-conditional model (num_classes > 0) is a conditional VAE: p(x | w, y) (and
q(w | x, y) when the encoder takes labels) with the prior p(w), so its negative
ELBO with labels is a bound on -log p(x | y). During training each label is replaced by
the "no label" token num_classes with probability label_dropout, so the same network
is also the unconditional model p(x | w) (y = None), the pair classifier-free guidance
needs; its negative ELBO without labels is a bound on -log p(x).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vdmrep import losses
import vdmrep.models.priors as priors  # the module, not the package: models/__init__ imports this one
from vdmrep.models.encoder import Encoder
from vdmrep.models.schedules import PerPixel, gamma_and_derivative
from vdmrep.models.score_net import ScoreNet

Array = jax.Array


@flax.struct.dataclass
class ELBOTerms:
  """Per-example terms of the negative ELBO of one batch, from `VAEVDM.elbo_terms`.

  The four bound terms (`BOUND_TERMS`) are [B] nats per image and sum to a one-sample
  Monte Carlo estimate of the negative ELBO (`total`), an upper bound on -log p(x) in
  expectation, whatever the training objective was:

    recon:     -log p(x | z_0), z_0 ~ q(z_0 | x).
    prior:     KL(q(z_1 | x) || N(0, I)).
    diffusion: the continuous-time diffusion loss at the sampled t.
    kl:        the latent's rate E_q[log q(w|x) - log p(w)] (closed form when the prior and
               posterior allow it, else the one-sample estimate at `w`); 0 when unconditional.

  The rest describe the draw (read by objectives and diagnostics, never summed):

    t:          [B] sampled diffusion times.
    gamma_t:    [B] gamma(t) (-log SNR) at `t`; for a per-pixel schedule, its mean over
                pixels (what the score network's time embedding sees).
    gamma_0, gamma_1: [B] the schedule's endpoints gamma(0), gamma(1) (per-pixel schedule:
                their means over pixels), for objectives that weight the terms by noise level.
    w:          [B, D] the latent the decoder saw, or None (unconditional); for a
                categorical latent the M one-hot groups of K, flattened (D = M K).
    mean:       [B, D] E_q[w | x] (categorical: the class probabilities), or None.
    logvar:     [B, D] log Var_q[w | x] of a Gaussian posterior, or None.
    kl_per_dim: nats, the KL split where it factorises, else None; sums to `kl`:
                [B, D] per dimension (Gaussian posterior, standard-normal prior) or
                [B, M] per group (categorical latent).
  """
  recon: Array
  prior: Array
  diffusion: Array
  kl: Array
  t: Array
  gamma_t: Array
  gamma_0: Array
  gamma_1: Array
  w: Optional[Array] = None
  mean: Optional[Array] = None
  logvar: Optional[Array] = None
  kl_per_dim: Optional[Array] = None

  @property
  def total(self) -> Array:
    """[B] nats: recon + prior + diffusion + kl, the negative ELBO estimate."""
    return self.recon + self.prior + self.diffusion + self.kl

  def __getitem__(self, name: str):
    """terms["kl"] is terms.kl: the dict-style reading of the untyped terms it replaced."""
    return getattr(self, name)

  def bound_terms(self) -> dict:
    """{name: [B] nats} of the four terms that sum to the bound (`BOUND_TERMS`)."""
    return {k: getattr(self, k) for k in BOUND_TERMS}


BOUND_TERMS = ("recon", "prior", "diffusion", "kl")
ELBO_TERMS = BOUND_TERMS  # the name evaluators and benchmarks import


@dataclasses.dataclass(frozen=True)
class VAEVDM:
  """Encoder q(w|x), prior p(w), noise schedule and score network, composed.

  Attributes:
    score_net: eps_hat(z_t; gamma_t, w).
    schedule: a scalar gamma(t) module (`schedules.SCHEDULES`) or `schedules.PerPixel`
      (gamma(t, w) per pixel; conditional models only).
    encoder: q(w|x), or None for an unconditional VDM.
    prior: p(w) (`priors.make_prior`); None means N(0, I) (categorical: uniform).
    latent_kind: "gaussian" (diagonal Gaussian q(w|x)) or "categorical" (M groups of K
      categories: the encoder's `mean` output is read as the M K logits).
    categories: K, the categories per group of a categorical latent.
    posterior_std_max: > 0 caps the posterior standard deviation of a Gaussian latent
      (delta-VAE, Razavi et al. 2019): with the standard normal prior each dimension
      then pays at least `committed_rate_per_dim` nats.
    relaxation_temperature: the Gumbel-softmax temperature of the straight-through
      gradient of a categorical latent (training only; its value is never reported).
  """
  score_net: ScoreNet
  schedule: nn.Module
  encoder: Optional[Encoder] = None
  vocab_size: int = 256
  antithetic_time_sampling: bool = True
  prior: Optional[nn.Module] = None
  latent_kind: str = "gaussian"
  categories: int = 0
  posterior_std_max: float = 0.0
  relaxation_temperature: float = 1.0
  num_classes: int = 0
  label_dropout: float = 0.0

  # The ElboTerms field through which w helps the decoder (code comparing decoders reads it).
  decoder_term = "diffusion"

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

  @property
  def latent_dim(self) -> int:
    """D, the size of w (categorical: M K)."""
    return self.encoder.latent

  @property
  def per_pixel_schedule(self) -> bool:
    return isinstance(self.schedule, PerPixel)

  @property
  def committed_rate_per_dim(self) -> float:
    """delta per dimension (nats) a capped posterior variance commits to under N(0, 1):
    min over mean and var <= s^2 of KL(N(mean, var) || N(0, 1)) = 0.5 (s^2 - log s^2 - 1)."""
    s2 = self.posterior_std_max ** 2
    return 0.5 * (s2 - math.log(s2) - 1.0) if 0.0 < s2 < 1.0 else 0.0

  # -- parameters ---------------------------------------------------------------
  def init(self, rng, image_shape) -> dict:
    """Parameters for images of shape (H, W, C)."""
    k_enc, k_score, k_gamma, k_prior = jax.random.split(rng, 4)
    z = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    w, y = None, (jnp.zeros((1,), jnp.int32) if self.num_classes else None)
    params = {}
    if self.conditional:
      params["encoder"] = self.encoder.init(k_enc, z, y)["params"]
      w = jnp.zeros((1, self.latent_dim), jnp.float32)
      if self.prior is not None:
        encode = lambda u: self._encode_model_scale(params, u)
        prior_params = priors.init_prior(self.prior, k_prior, encode)
        if prior_params:
          params["prior"] = prior_params
    if self.per_pixel_schedule:
      params["gamma"] = self.schedule.init(k_gamma, jnp.zeros((1,)), w)["params"]
    else:
      params["gamma"] = self.schedule.init(k_gamma, jnp.zeros(())).get("params", {})
    params["score"] = self.score_net.init(k_score, z, jnp.zeros((1,)), w, y)["params"]
    return params

  # -- the networks -------------------------------------------------------------
  def encoder_input(self, x_int):
    """The encoder sees the data in model scale, here and everywhere else."""
    return losses.data_to_model_scale(x_int, self.vocab_size)

  def _encode_model_scale(self, params, u, y=None):
    mean, logvar = self.encoder.apply({"params": params["encoder"]}, u, y)
    if self.latent_kind == "gaussian" and self.posterior_std_max > 0:
      cap = 2.0 * math.log(self.posterior_std_max)  # a smooth min(logvar, cap)
      logvar = cap - jax.nn.softplus(cap - logvar)
    return mean, logvar

  def encode(self, params, x_int, y=None):
    """x_int [B, H, W, C] (and labels y [B] if the encoder takes them) -> the encoder's
    outputs, each [B, D].

    Gaussian latent: (mean, logvar) of q(w|x[, y]). Categorical latent: (class
    probabilities, their logs), each [B, M K]: E_q[w|x] and log q per category.
    """
    mean, logvar = self._encode_model_scale(params, self.encoder_input(x_int), y)
    if self.latent_kind == "categorical":
      logp = jax.nn.log_softmax(self._groups(mean), axis=-1).reshape(mean.shape)
      return jnp.exp(logp), logp
    return mean, logvar

  def _groups(self, v):
    return v.reshape(v.shape[:-1] + (-1, self.categories))

  def prior_logits(self, params):
    """[M, K] normalised log-probabilities of a categorical prior (learned or uniform)."""
    m = self.latent_dim // self.categories
    if self.prior is not None and "prior" in params:
      return jax.nn.log_softmax(params["prior"]["logits"], axis=-1)
    return jnp.full((m, self.categories), -math.log(self.categories))

  def gamma(self, params, t, w=None):
    """gamma(t): t scalar or [B] -> same shape; per-pixel schedule: needs w [B, D] and
    returns [B, H, W, C]."""
    if self.per_pixel_schedule:
      return self.schedule.apply({"params": params["gamma"]}, t, w)
    return self.schedule.apply({"params": params["gamma"]}, t)

  def eps_hat(self, params, z_t, gamma_t, w=None, y=None, *, dropout_rng=None):
    """Predicted noise [B, H, W, C]; y [B] labels (None: the unconditional path of a
    class-conditional model); dropout is on iff `dropout_rng` is given."""
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return self.score_net.apply({"params": params["score"]}, z_t, gamma_t, w, y,
                                deterministic=dropout_rng is None, rngs=rngs)

  # -- the prior ----------------------------------------------------------------
  def prior_log_prob(self, params, w, rng):
    """log p(w) [B] nats (a lower bound for the latent diffusion prior)."""
    if self.latent_kind == "categorical":
      logits = self.prior_logits(params)
      return jnp.sum(self._groups(w) * logits[None], axis=(-2, -1))
    prior = self.prior or priors.StandardNormal(self.latent_dim)
    return prior.apply({"params": params.get("prior", {})}, w, rng=rng,
                       encode=lambda u: self._encode_model_scale(params, u),
                       method=prior.log_prob)

  def sample_prior(self, params, rng, n: int):
    """w ~ p(w): [n, D] (categorical: one-hot groups)."""
    if self.latent_kind == "categorical":
      logits = self.prior_logits(params)
      c = jax.random.categorical(rng, logits[None], shape=(n,) + logits.shape[:1])
      return jax.nn.one_hot(c, self.categories).reshape(n, -1)
    prior = self.prior or priors.StandardNormal(self.latent_dim)
    return prior.apply({"params": params.get("prior", {})}, rng, n,
                       encode=lambda u: self._encode_model_scale(params, u),
                       method=prior.sample)

  def sample_posterior(self, params, x_int, rng, y=None):
    """w ~ q(w|x[, y]): [B, D] (categorical: the exact discrete code, one-hot groups)."""
    a, b = self.encode(params, x_int, y)
    if self.latent_kind == "categorical":
      c = jax.random.categorical(rng, self._groups(b), axis=-1)
      return jax.nn.one_hot(c, self.categories).reshape(a.shape)
    return a + jnp.exp(0.5 * b) * jax.random.normal(rng, a.shape)

  def _latent(self, params, x_int, rng, *, train, w, deterministic_encoder, kl_balance, y):
    """w and the KL term: dict of ELBOTerms fields."""
    k_w, k_p = jax.random.split(rng)  # w's draw; a learned prior's Monte Carlo log p(w)
    if self.latent_kind == "categorical":
      return self._categorical_latent(params, x_int, k_w, train=train, w=w,
                                      kl_balance=kl_balance, y=y)
    mean, logvar = self.encode(params, x_int, y)
    if w is None and deterministic_encoder:
      w = mean
    elif w is None:
      w = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_w, mean.shape)
    out = dict(w=w, mean=mean, logvar=logvar)
    if self.prior is None or isinstance(self.prior, priors.StandardNormal):
      kl_fn = lambda q, _: losses.gaussian_kl_per_dim(*q)
      kl_per_dim = _balanced(kl_fn, (mean, logvar), None, kl_balance)
      return dict(out, kl_per_dim=kl_per_dim, kl=jnp.sum(kl_per_dim, axis=-1))

    def kl_fn(q, prior_params):
      m, lv, ww = q
      p = dict(params, prior=prior_params)
      return -priors.gaussian_entropy(lv) - self.prior_log_prob(p, ww, k_p)
    return dict(out, kl=_balanced(kl_fn, (mean, logvar, w), params.get("prior", {}),
                                  kl_balance))

  def _categorical_latent(self, params, x_int, rng, *, train, w, kl_balance, y):
    probs, logq = self.encode(params, x_int, y)
    g_logq = self._groups(logq)  # [B, M, K]
    if w is None:
      gumbel = jax.random.gumbel(rng, g_logq.shape)
      hard = jax.nn.one_hot(jnp.argmax(g_logq + gumbel, -1), self.categories)  # exact draw
      if train:  # straight-through: the forward value is the discrete code
        soft = jax.nn.softmax((g_logq + gumbel) / self.relaxation_temperature, axis=-1)
        hard = hard + soft - jax.lax.stop_gradient(soft)
      w = hard.reshape(probs.shape)

    def kl_fn(q, prior_params):
      logp = self.prior_logits({"prior": prior_params} if prior_params else {})
      return jnp.sum(jnp.exp(q) * (q - logp[None]), axis=-1)  # exact, [B, M]
    kl_per_group = _balanced(kl_fn, g_logq, params.get("prior", {}), kl_balance)
    return dict(w=w, mean=probs, kl_per_dim=kl_per_group, kl=jnp.sum(kl_per_group, -1))

  # -- the objective ------------------------------------------------------------
  def sample_t(self, rng, batch: int):
    """[B] diffusion times; antithetic (evenly spaced from one uniform) by default."""
    if self.antithetic_time_sampling:
      t0 = jax.random.uniform(rng)
      return jnp.mod(t0 + jnp.arange(batch) / batch, 1.0)
    return jax.random.uniform(rng, (batch,))

  def elbo_terms(self, params, x_int, rng, *, train: bool = False, t=None, w=None,
                 deterministic_encoder: bool = False, kl_balance=None, y=None) -> ELBOTerms:
    """Per-example terms of the negative ELBO, each [B] in nats.

    Args:
      params: the parameter dict.
      x_int: [B, H, W, C] integer pixels.
      rng: PRNG key; all randomness (w, z_0, t, eps, dropout) comes from it.
      train: enables dropout in the score network (and a categorical latent's
        straight-through gradient; its forward value is the discrete code either way).
      t: optional [B] diffusion times (default: `sample_t`).
      w: optional [B, D] latents to condition on instead of w ~ q(w|x) (the
        "usefulness of w" diagnostic feeds another image's w here).
      deterministic_encoder: w = the encoder mean, no noise (InfoDiffusion's encoder;
        "kl" is still that of the Gaussian the encoder outputs, for logging).
      kl_balance: None, or alpha in [0, 1]: the KL's value is unchanged but its gradient
        is alpha * grad KL(sg(q) || p) + (1 - alpha) * grad KL(q || sg(p)) (Hafner et
        al. 2021, DreamerV2).
      y: optional [B] int labels of a class-conditional model (None: its unconditional
        path); with `train`, label dropout applies (its key is split off k_w only
        when there are labels, so models without labels draw the same w).
    Returns:
      `ELBOTerms` ([B] nats per image; see its docstring).
    """
    k_w, k_0, k_t, k_eps, k_drop = jax.random.split(rng, 5)
    b = x_int.shape[0]
    f = losses.data_to_model_scale(x_int, self.vocab_size)
    if not self.num_classes:
      y = None
    elif train:
      k_w, k_y = jax.random.split(k_w)
      y = self.drop_labels(k_y, y)
    if self.conditional:
      latent = self._latent(params, x_int, k_w, train=train, w=w,
                            deterministic_encoder=deterministic_encoder,
                            kl_balance=kl_balance, y=y)
      w = latent["w"]
    else:
      latent = {"kl": jnp.zeros((b,), jnp.float32)}

    if self.per_pixel_schedule:
      gamma_fn = lambda s: self.gamma(params, s, w)
      g_0, g_1 = gamma_fn(jnp.zeros((b,))), gamma_fn(jnp.ones((b,)))
    else:
      gamma_fn = lambda s: self.gamma(params, s)
      g_0, g_1 = gamma_fn(jnp.zeros(())), gamma_fn(jnp.ones(()))
    # Reconstruction: z_0 ~ q(z_0|x), decoded by the factorised discretised likelihood.
    eps_0 = jax.random.normal(k_0, f.shape)
    z_0_rescaled = f + jnp.exp(0.5 * g_0) * eps_0  # = z_0 / alpha_0
    recon = losses.reconstruction_loss(x_int, z_0_rescaled, g_0, self.vocab_size)
    prior = losses.prior_loss(f, g_1)
    # Diffusion: one t per example, z_t = alpha_t f + sigma_t eps.
    if t is None:
      t = self.sample_t(k_t, b)
    g_t, dg_dt = gamma_and_derivative(gamma_fn, t)
    eps = jax.random.normal(k_eps, f.shape)
    g = losses.broadcast_gamma(g_t, f.ndim)
    z_t = losses.alpha(g) * f + jnp.sqrt(losses.sigma2(g)) * eps
    g_embed = g_t if g_t.ndim == 1 else jnp.mean(g_t.reshape(b, -1), axis=-1)
    eps_hat = self.eps_hat(params, z_t, g_embed, w, y, dropout_rng=k_drop if train else None)
    diffusion = losses.diffusion_loss(eps, eps_hat, dg_dt)
    pixel_mean = lambda g: (jnp.broadcast_to(g, (b,)) if g.ndim <= 1
                            else jnp.mean(g.reshape(b, -1), axis=-1))
    return ELBOTerms(recon=recon, prior=prior, diffusion=diffusion, t=t, gamma_t=g_embed,
                     gamma_0=pixel_mean(g_0), gamma_1=pixel_mean(g_1), **latent)


def _balanced(kl_fn, q, p, alpha):
  """kl_fn(q, p) in value; with alpha, the DreamerV2 split of its gradient:
  alpha * kl_fn(sg(q), p) + (1 - alpha) * kl_fn(q, sg(p))."""
  if alpha is None:
    return kl_fn(q, p)
  sg = jax.lax.stop_gradient
  return alpha * kl_fn(sg(q), p) + (1.0 - alpha) * kl_fn(q, sg(p))
