"""Priors p(w) over the VAE latent, and the KL term they give the bound.

Each prior is a flax module with two methods, both on latents w [B, D]:

  log_prob(w, encode=None, rng=None) -> [B] nats: log p(w), or for the latent diffusion
      prior a lower bound on it (its negative ELBO, negated), so KL estimates built on it
      are upper bounds and the VAE's negative ELBO stays a bound on -log p(x).
  sample(rng, n, encode=None) -> [n, D]: w ~ p(w) (unconditional samples use it).

`encode` maps model-scale images [K, H, W, C] to the encoder's (mean, logvar) [K, D]; only
the VampPrior reads it (its components are the posteriors at learned pseudo-inputs).

The KL term of the bound (`gaussian_kl_term`) is E_q[log q(w|x) - log p(w)]: closed form
for the standard normal, otherwise -H[q(w|x)] (closed form) - log p(w) at one w ~ q(w|x),
an unbiased one-sample estimate whose Monte Carlo error the evaluation's standard error
over images and draws includes.

References: VampPrior, Tomczak & Welling (2018); affine coupling flows, Dinh et al. (2017,
RealNVP); a diffusion prior over the latent trained jointly, Vahdat et al. (2021, LSGM);
the continuous-time bound, Kingma et al. (2021, VDM).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdmrep import losses

PRIORS = ("standard", "mixture", "vamp", "flow", "diffusion")
CATEGORICAL_PRIORS = ("standard", "learned")  # standard: uniform over the K categories
_LOG_2PI = math.log(2.0 * math.pi)


def diag_gaussian_log_prob(w, mean, logvar):
  """log N(w; mean, diag exp(logvar)), summed over the last axis (broadcasting). Nats."""
  return -0.5 * jnp.sum(_LOG_2PI + logvar + jnp.square(w - mean) * jnp.exp(-logvar), axis=-1)


def gaussian_entropy(logvar):
  """H[N(., diag exp(logvar))] = 0.5 sum_d (1 + log 2 pi + logvar_d): [B, D] -> [B] nats."""
  return 0.5 * jnp.sum(1.0 + _LOG_2PI + logvar, axis=-1)


def mixture_log_prob(w, log_weights, means, logvars):
  """log sum_k pi_k N(w; mean_k, diag exp(logvar_k)).

  Args:
    w: [B, D]; log_weights: [K] normalised log pi_k; means, logvars: [K, D].
  Returns:
    [B] nats.
  """
  comp = diag_gaussian_log_prob(w[:, None, :], means[None], logvars[None])  # [B, K]
  return jax.nn.logsumexp(comp + log_weights[None], axis=-1)


def mixture_sample(rng, n, log_weights, means, logvars):
  """n draws from the diagonal Gaussian mixture: [n, D]."""
  k_c, k_e = jax.random.split(rng)
  k = jax.random.categorical(k_c, log_weights, shape=(n,))
  eps = jax.random.normal(k_e, (n, means.shape[-1]))
  return means[k] + jnp.exp(0.5 * logvars[k]) * eps


class StandardNormal(nn.Module):
  """p(w) = N(0, I); the KL has a closed form (`losses.gaussian_kl`)."""
  latent: int
  closed_form_kl = True

  def log_prob(self, w, encode=None, rng=None):
    return diag_gaussian_log_prob(w, 0.0, 0.0)

  def sample(self, rng, n, encode=None):
    return jax.random.normal(rng, (n, self.latent))

  def __call__(self, w):  # for init
    return self.log_prob(w)


class GaussianMixture(nn.Module):
  """p(w) = sum_k pi_k N(mean_k, diag var_k) with learned weights, means and variances.

  Means start at N(0, init_scale^2) draws, variances at 1, weights uniform.
  """
  latent: int
  components: int = 16
  init_scale: float = 1.0
  closed_form_kl = False

  def setup(self):
    self.logits = self.param("logits", nn.initializers.zeros, (self.components,))
    self.means = self.param("means", nn.initializers.normal(self.init_scale),
                            (self.components, self.latent))
    self.logvars = self.param("logvars", nn.initializers.zeros,
                              (self.components, self.latent))

  def _params(self):
    return jax.nn.log_softmax(self.logits), self.means, self.logvars

  def log_prob(self, w, encode=None, rng=None):
    return mixture_log_prob(w, *self._params())

  def sample(self, rng, n, encode=None):
    return mixture_sample(rng, n, *self._params())

  def __call__(self, w):
    return self.log_prob(w)


class VampPrior(nn.Module):
  """p(w) = (1/K) sum_k q(w | u_k): the encoder's posteriors at K learned pseudo-inputs.

  The pseudo-inputs u_k [K, H, W, C] live in model scale (like the encoder's input) and
  start at uniform draws on (-1, 1) (the range of real inputs).
  """
  latent: int
  components: int
  image_shape: tuple
  closed_form_kl = False

  def setup(self):
    self.pseudo_inputs = self.param(
        "pseudo_inputs", lambda k, s: jax.random.uniform(k, s, minval=-1.0, maxval=1.0),
        (self.components,) + tuple(self.image_shape))

  def _moments(self, encode):
    if encode is None:
      raise ValueError("VampPrior needs the encoder (`encode`) to evaluate its components")
    return encode(self.pseudo_inputs)

  def log_prob(self, w, encode=None, rng=None):
    means, logvars = self._moments(encode)
    log_w = jnp.full((self.components,), -math.log(self.components))
    return mixture_log_prob(w, log_w, means, logvars)

  def sample(self, rng, n, encode=None):
    means, logvars = self._moments(encode)
    log_w = jnp.full((self.components,), -math.log(self.components))
    return mixture_sample(rng, n, log_w, means, logvars)

  def __call__(self, w, encode):
    return self.log_prob(w, encode)


class _Coupling(nn.Module):
  """One affine coupling layer: the dims where `mask` is 0 are scaled and shifted by an
  MLP of the dims where it is 1. y = m w + (1 - m)(w exp(s) + t), log|det| = sum (1 - m) s."""
  mask: tuple
  hidden: int

  def setup(self):
    d = len(self.mask)
    self.net = [nn.Dense(self.hidden), nn.Dense(self.hidden),
                nn.Dense(2 * d, kernel_init=nn.initializers.zeros)]

  def _st(self, w_masked):
    h = nn.gelu(self.net[0](w_masked))
    h = nn.gelu(self.net[1](h))
    s, t = jnp.split(self.net[2](h), 2, axis=-1)
    m = jnp.asarray(self.mask, jnp.float32)
    return jnp.tanh(s) * (1.0 - m), t * (1.0 - m)  # tanh keeps the scales bounded

  def __call__(self, w):
    m = jnp.asarray(self.mask, jnp.float32)
    s, t = self._st(w * m)
    return w * jnp.exp(s) + t, jnp.sum(s, axis=-1)

  def inverse(self, y):
    m = jnp.asarray(self.mask, jnp.float32)
    s, t = self._st(y * m)  # y * m = w * m: the conditioning half passes unchanged
    return (y - t) * jnp.exp(-s)


class CouplingFlow(nn.Module):
  """p(w) by change of variables: y = f(w) through `layers` affine couplings (alternating
  masks), y ~ N(0, I); log p(w) = log N(f(w); 0, I) + log |det df/dw|. Starts at the
  identity (zero-initialised output layers), i.e. at N(0, I)."""
  latent: int
  layers: int = 4
  hidden: int = 64
  closed_form_kl = False

  def setup(self):
    masks = []
    for i in range(self.layers):
      m = [(j + i) % 2 for j in range(self.latent)]
      masks.append(tuple(m))
    self.couplings = [_Coupling(mask=m, hidden=self.hidden) for m in masks]

  def forward(self, w):
    """(y = f(w) [B, D], log |det df/dw| [B])."""
    logdet = jnp.zeros(w.shape[:1])
    for c in self.couplings:
      w, ld = c(w)
      logdet = logdet + ld
    return w, logdet

  def log_prob(self, w, encode=None, rng=None):
    y, logdet = self.forward(w)
    return diag_gaussian_log_prob(y, 0.0, 0.0) + logdet

  def inverse(self, y):
    """w = f^-1(y) [B, D]: the base space's points mapped to latents."""
    for c in reversed(self.couplings):
      y = c.inverse(y)
    return y

  def sample(self, rng, n, encode=None):
    return self.inverse(jax.random.normal(rng, (n, self.latent)))

  def __call__(self, w):
    return self.log_prob(w)


class _LatentEpsNet(nn.Module):
  """eps_hat(z_t, gamma_t) for latent vectors: an MLP on [z_t, embedding of gamma_t]."""
  latent: int
  hidden: int
  gamma_min: float
  gamma_max: float

  @nn.compact
  def __call__(self, z, gamma_t):
    t = (gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)
    freqs = jnp.exp(jnp.linspace(0.0, math.log(1000.0), 16))
    emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    h = jnp.concatenate([z, emb], axis=-1)
    for i in range(3):
      h = nn.gelu(nn.Dense(self.hidden, name=f"dense_{i}")(h))
    return nn.Dense(self.latent, kernel_init=nn.initializers.zeros, name="out")(h)


class LatentDiffusion(nn.Module):
  """A small continuous-time VDM over w whose negative ELBO L(w) >= -log p(w).

  With z_t = alpha_t w + sigma_t eps, gamma(t) linear from gamma_min to gamma_max:

    L(w) = E[-log N(w; z_0 / alpha_0, exp(gamma_0))]          (Gaussian decoder at t = 0)
         + KL(q(z_1 | w) || N(0, I))                           (`losses.prior_loss`)
         + 0.5 E_t[gamma'(t) ||eps - eps_hat(z_t; gamma_t)||^2]  (`losses.diffusion_loss`)

  The decoder term in closed form given eps_0: w - z_0 / alpha_0 = -exp(gamma_0 / 2) eps_0,
  so -log N = 0.5 D (log 2 pi + gamma_0) + 0.5 ||eps_0||^2. `log_prob` returns -L(w) at one
  draw of (t, eps_0, eps) from `rng`: an unbiased estimate of a lower bound on log p(w).
  """
  latent: int
  hidden: int = 128
  gamma_min: float = -10.0
  gamma_max: float = 6.0
  num_sample_steps: int = 200
  closed_form_kl = False

  def setup(self):
    self.eps_net = _LatentEpsNet(self.latent, self.hidden, self.gamma_min, self.gamma_max)

  def gamma(self, t):
    return self.gamma_min + (self.gamma_max - self.gamma_min) * t

  def negative_elbo(self, w, rng):
    """(decoder, prior, diffusion) terms of L(w), each [B] nats."""
    b, d = w.shape
    k_t, k_0, k_eps = jax.random.split(rng, 3)
    g_0, g_1 = self.gamma(0.0), self.gamma(1.0)
    eps_0 = jax.random.normal(k_0, w.shape)
    decoder = 0.5 * d * (_LOG_2PI + g_0) + 0.5 * jnp.sum(jnp.square(eps_0), axis=-1)
    prior = losses.prior_loss(w, g_1)
    t = jnp.mod(jax.random.uniform(k_t) + jnp.arange(b) / b, 1.0)  # antithetic over B
    g_t = self.gamma(t)
    eps = jax.random.normal(k_eps, w.shape)
    z_t = losses.alpha(g_t)[:, None] * w + jnp.sqrt(losses.sigma2(g_t))[:, None] * eps
    diffusion = losses.diffusion_loss(eps, self.eps_net(z_t, g_t),
                                      self.gamma_max - self.gamma_min)
    return decoder, prior, diffusion

  def log_prob(self, w, encode=None, rng=None):
    if rng is None:
      raise ValueError("LatentDiffusion.log_prob needs an rng (its bound is Monte Carlo)")
    return -sum(self.negative_elbo(w, rng))

  def sample(self, rng, n, encode=None):
    """Ancestral sampling from z_1 ~ N(0, I) over `num_sample_steps` steps, then w = z_0 / alpha_0."""
    steps = self.num_sample_steps
    k_z, *k_steps = jax.random.split(rng, steps + 1)
    z = jax.random.normal(k_z, (n, self.latent))

    def body(i, z):
      t, s = (steps - i) / steps, (steps - i - 1) / steps
      g_t, g_s = self.gamma(t), self.gamma(s)
      eps_hat = self.eps_net(z, jnp.full((n,), g_t))
      c = -jnp.expm1(g_s - g_t)
      mean = jnp.sqrt(jax.nn.sigmoid(-g_s) / jax.nn.sigmoid(-g_t)) * (
          z - c * jnp.sqrt(jax.nn.sigmoid(g_t)) * eps_hat)
      noise = jax.random.normal(k_steps[i], z.shape)
      return mean + jnp.sqrt(c * jax.nn.sigmoid(g_s)) * noise

    # A python loop: flax submodules cannot be called inside lax.fori_loop bodies
    # without nn.scan / lifted transforms; the step count is small.
    for i in range(steps):
      z = body(i, z)
    return z / losses.alpha(self.gamma(0.0))

  def __call__(self, w, rng):
    return self.log_prob(w, rng=rng)


class LearnedCategorical(nn.Module):
  """A learned prior over M groups of K categories: logits [M, K], initialised uniform."""
  latent: int
  categories: int
  closed_form_kl = True

  @nn.compact
  def __call__(self, w):
    logits = self.param("logits", nn.initializers.zeros,
                        (self.latent // self.categories, self.categories))
    return jnp.sum(w.reshape(w.shape[0], -1, self.categories)
                   * jax.nn.log_softmax(logits, -1)[None], axis=(-2, -1))


def make_prior(kind: str, latent: int, *, components: int = 16, image_shape=None,
               flow_layers: int = 4, hidden: int = 128, categories: int = 0) -> nn.Module:
  """The prior named by `config.model.prior` over a latent of size `latent` (a
  categorical latent of `categories` per group: 'standard' = uniform, 'learned')."""
  if categories:
    if kind == "learned":
      return LearnedCategorical(latent, categories)
    if kind == "standard":
      return None
    raise ValueError(f"unknown categorical prior {kind!r}; choose one of "
                     f"{list(CATEGORICAL_PRIORS)}")
  if kind == "standard":
    return StandardNormal(latent)
  if kind == "mixture":
    return GaussianMixture(latent, components=components)
  if kind == "vamp":
    return VampPrior(latent, components=components, image_shape=tuple(image_shape))
  if kind == "flow":
    return CouplingFlow(latent, layers=flow_layers, hidden=hidden)
  if kind == "diffusion":
    return LatentDiffusion(latent, hidden=hidden)
  raise ValueError(f"unknown prior {kind!r}; choose one of {list(PRIORS)}")


def init_prior(prior: nn.Module, rng, encode: Optional[Callable] = None) -> dict:
  """The prior's parameters ({} for the standard normal)."""
  w = jnp.zeros((1, prior.latent), jnp.float32)
  if isinstance(prior, VampPrior):
    return prior.init(rng, w, encode).get("params", {})
  if isinstance(prior, LatentDiffusion):
    return prior.init(rng, w, jax.random.key(0)).get("params", {})
  return prior.init(rng, w).get("params", {})


def gaussian_kl_term(prior: nn.Module, prior_params, mean, logvar, w, rng, encode=None):
  """The bound's KL term for a Gaussian posterior: [B] nats.

  Standard normal: KL(q || N(0, I)) in closed form. Otherwise the one-sample estimate
  -H[q(w|x)] - log p(w) at the given draw w ~ q(w|x) (an upper bound in expectation for
  the latent diffusion prior, whose log_prob is a lower bound).
  """
  if isinstance(prior, StandardNormal):
    return losses.gaussian_kl(mean, logvar)
  log_p = prior.apply({"params": prior_params}, w, encode=encode, rng=rng,
                      method=prior.log_prob)
  return -gaussian_entropy(logvar) - log_p
