"""The public loss API: every term of the VAE-VDM objective as a pure function.

Conventions, for every function here:
  * Inputs are `jax.numpy` arrays; `B` is the batch size, images are [B, H, W, C].
  * Outputs are **per example**, shape [B], in **nats** (natural-log units),
    unless the docstring says otherwise (`mmd` returns one scalar per batch;
    `to_bpd` converts nats to bits per dimension).
  * "Model scale" means pixel values mapped into (-1, 1) by `data_to_model_scale`.
  * `gamma` arguments (log signal-to-noise ratio, negated: gamma = -log SNR) may be
    Python/0-d scalars, arrays of shape [B] (one schedule value per example) or arrays
    of the image's shape [B, H, W, C] (a per-pixel schedule gamma(t, w), as in MuLAN,
    Sahoo et al. 2024); the same holds for d gamma / dt.

Notation follows Kingma et al. (2021), "Variational Diffusion Models":
  sigma_t^2 = sigmoid(gamma_t),  alpha_t^2 = sigmoid(-gamma_t) = 1 - sigma_t^2,
  z_t = alpha_t * f + sigma_t * eps  with f = data_to_model_scale(x).

The negative ELBO of one image (nats) is
  reconstruction_loss + prior_loss + diffusion_loss + gaussian_kl(encoder),
and `to_bpd` turns it into bits per dimension.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def broadcast_gamma(g, ndim: int):
  """A scalar, [B] or per-pixel [B, H, W, C] gamma, reshaped to broadcast against an
  array of rank `ndim` ([B] -> [B, 1, ..., 1]; others unchanged up to trailing 1s)."""
  g = jnp.asarray(g)
  if g.ndim == 0:
    return g
  return jnp.reshape(g, g.shape + (1,) * (ndim - g.ndim))


def _sum_non_batch(x: Array) -> Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def sigma2(gamma):
  """Variance of the noise at log-SNR -gamma: sigmoid(gamma). Same shape as gamma."""
  return jax.nn.sigmoid(gamma)


def alpha(gamma):
  """Signal scale sqrt(1 - sigma^2) = sqrt(sigmoid(-gamma)). Same shape as gamma."""
  return jnp.sqrt(jax.nn.sigmoid(-gamma))


def data_to_model_scale(x_int, vocab_size: int = 256):
  """Maps integer pixels {0..vocab_size-1} to bin centres in (-1, 1).

  Args:
    x_int: integer (or integer-valued float) pixels, any shape.
    vocab_size: number of pixel values (256 for 8-bit images).
  Returns:
    float32 array of the same shape: 2 * ((x + 0.5) / vocab_size) - 1.
  """
  return 2.0 * ((jnp.asarray(x_int, jnp.float32) + 0.5) / vocab_size) - 1.0


def gaussian_kl_per_dim(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) for each latent dimension.

  Args:
    mean, logvar: [B, D] parameters of a diagonal Gaussian q(w|x).
  Returns:
    [B, D] KL in nats per example and dimension.
  """
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - logvar - 1.0)


def gaussian_kl(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, diag exp(logvar)) || N(0, I)), summed over latent dimensions.

  Args:
    mean, logvar: [B, D].
  Returns:
    [B] KL in nats per example (the VAE's encoder KL / "rate").
  """
  return jnp.sum(gaussian_kl_per_dim(mean, logvar), axis=-1)


def prior_loss(f: Array, gamma_1) -> Array:
  """KL(q(z_1|x) || N(0, I)): how far the most-noised latent is from the prior.

  q(z_1|x) = N(alpha_1 f, sigma_1^2 I) with sigma_1^2 = sigmoid(gamma_1).

  Args:
    f: [B, H, W, C] data in model scale (or [B, D] latents: any [B, ...]).
    gamma_1: scalar, [B] or the shape of f (per pixel), gamma at t = 1.
  Returns:
    [B] nats per example.
  """
  var_1 = broadcast_gamma(sigma2(gamma_1), f.ndim)
  mean1_sqr = (1.0 - var_1) * jnp.square(f)
  return 0.5 * _sum_non_batch(mean1_sqr + var_1 - jnp.log(var_1) - 1.0)


def reconstruction_logits(z_0_rescaled: Array, gamma_0, vocab_size: int = 256) -> Array:
  """Log-probabilities of every pixel value under the VDM discretised decoder.

  p(x_i = k | z_0) is proportional to exp(-0.5 * ((z_0_i/alpha_0 - c_k) / exp(gamma_0/2))^2)
  with bin centres c_k = data_to_model_scale(k).

  Args:
    z_0_rescaled: [B, H, W, C], z_0 / alpha_0.
    gamma_0: scalar, [B] or [B, H, W, C] (per pixel).
    vocab_size: number of pixel values.
  Returns:
    [B, H, W, C, vocab_size] normalised log-probabilities (nats). This materialises
    vocab_size floats per pixel; `reconstruction_loss` does not need it.
  """
  c = data_to_model_scale(jnp.arange(vocab_size), vocab_size)
  inv_stdev = jnp.exp(-0.5 * broadcast_gamma(gamma_0, z_0_rescaled.ndim + 1))
  logits = -0.5 * jnp.square((z_0_rescaled[..., None] - c) * inv_stdev)
  return jax.nn.log_softmax(logits, axis=-1)


# Half-width of the window of bins `reconstruction_loss` sums over when the decoder is
# sharp (stdev <= bin spacing): every bin left out has a logit at least
# ((8 - 0.5)^2 - 0.5^2) / 2 = 28 nats below the largest, so all 256 of them together
# change the normaliser by < 256 e^-28 = 2e-10 (relative), far below float32 precision.
_WINDOW = 8


def _bin_log_normalizer(z_0_rescaled: Array, gamma_0, vocab_size: int) -> Array:
  """log sum_k exp(-0.5 ((z - c_k) / s)^2) over the bin centres c_k, s = exp(gamma_0/2).

  [B, H, W, C] -> same shape. When s <= the bin spacing 2/vocab_size (every useful
  gamma_0: the default gamma_min -13.3 gives s = spacing / 6) it sums only the
  2 * _WINDOW + 1 bins around the nearest one, exact to float32 precision (see
  _WINDOW) and without the [..., vocab_size] tensor; otherwise all bins.
  """
  g = broadcast_gamma(gamma_0, z_0_rescaled.ndim)
  inv_stdev = jnp.exp(-0.5 * g)
  spacing = 2.0 / vocab_size

  def logits_at(k):  # k: integer bin indices broadcastable against z[..., None]
    c = data_to_model_scale(k, vocab_size)
    return -0.5 * jnp.square((z_0_rescaled[..., None] - c) * inv_stdev[..., None])

  def full(_):
    return jax.nn.logsumexp(logits_at(jnp.arange(vocab_size)), axis=-1)

  def window(_):
    nearest = jnp.clip(jnp.round((z_0_rescaled + 1.0) / spacing - 0.5), 0, vocab_size - 1)
    k = nearest.astype(jnp.int32)[..., None] + jnp.arange(-_WINDOW, _WINDOW + 1)
    logits = jnp.where((k >= 0) & (k < vocab_size), logits_at(k), -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1)

  if vocab_size <= 2 * _WINDOW + 1:
    return full(None)
  sharp = jnp.all(jnp.exp(0.5 * jnp.asarray(gamma_0)) <= spacing)
  return jax.lax.cond(sharp, window, full, None)


def reconstruction_loss(x_int: Array, z_0_rescaled: Array, gamma_0,
                        vocab_size: int = 256) -> Array:
  """-log p(x | z_0) under the VDM factorised discretised decoder.

  Each pixel (every channel independently) is a categorical over the `vocab_size`
  bin centres with logit_k = -0.5 * ((z_0_rescaled - c_k) * exp(-gamma_0/2))^2.
  Computed as logit_x - log sum_k exp(logit_k), equal to picking x from
  `reconstruction_logits` (tests/test_perf.py) without materialising all the logits.

  Args:
    x_int: [B, H, W, C] integer pixels in {0..vocab_size-1}.
    z_0_rescaled: [B, H, W, C], z_0 / alpha_0 (model scale).
    gamma_0: scalar, [B] or [B, H, W, C] (per pixel), gamma at t = 0.
    vocab_size: number of pixel values.
  Returns:
    [B] nats per example.
  """
  inv_stdev = jnp.exp(-0.5 * broadcast_gamma(gamma_0, z_0_rescaled.ndim))
  logit_x = -0.5 * jnp.square((z_0_rescaled - data_to_model_scale(x_int, vocab_size)) * inv_stdev)
  return -_sum_non_batch(logit_x - _bin_log_normalizer(z_0_rescaled, gamma_0, vocab_size))


def diffusion_loss(eps: Array, eps_hat: Array, dgamma_dt) -> Array:
  """Continuous-time (T -> infinity) VDM diffusion loss, one Monte Carlo sample of t.

  L_inf = 0.5 * sum_i gamma_i'(t) (eps_i - eps_hat_i(z_t; t))^2 over the dimensions i,
  with t ~ U(0, 1): an unbiased estimate of the diffusion term of the negative ELBO
  (Kingma et al. 2021, eq. 17; per pixel, Sahoo et al. 2024). A scalar or [B] gamma'
  is the same for every pixel and gives 0.5 gamma'(t) ||eps - eps_hat||^2.

  Args:
    eps: [B, ...] the noise used to make z_t.
    eps_hat: [B, ...] the score network's prediction of it.
    dgamma_dt: scalar, [B] or the shape of eps (per pixel), d gamma / dt at the sampled t.
  Returns:
    [B] nats per example.
  """
  dg = jnp.asarray(dgamma_dt)
  if dg.ndim == eps.ndim:
    return 0.5 * _sum_non_batch(dg * jnp.square(eps - eps_hat))
  return 0.5 * dg * _sum_non_batch(jnp.square(eps - eps_hat))


def _pairwise_sq_dists(a: Array, b: Array) -> Array:
  return jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)


def rbf_kernel(a: Array, b: Array, bandwidth=None) -> Array:
  """Gaussian k(a, b) = exp(-||a - b||^2 / (2 D s^2)); s = bandwidth (default 1). [N, M].

  The squared length scale grows with D (2 D s^2), the Wasserstein-autoencoder choice
  of Tolstikhin et al. (2018); it is *not* InfoVAE's (see `infovae_kernel`: D^2).
  """
  s = 1.0 if bandwidth is None else bandwidth
  return jnp.exp(-_pairwise_sq_dists(a, b) / (2.0 * a.shape[-1] * s * s))


def infovae_kernel(a: Array, b: Array, bandwidth=None) -> Array:
  """InfoVAE's Gaussian kernel k(a, b) = exp(-||a - b||^2 / (D^2 s^2)). [N, M].

  Zhao et al.'s MMD-VAE code divides the *mean* squared difference over the D
  dimensions by D, i.e. ||a - b||^2 / D^2 (s = 1): for D = 128 a length scale D / 2 = 64
  times wider (in squared distance) than `rbf_kernel`'s 2 D.
  """
  s = 1.0 if bandwidth is None else bandwidth
  d = a.shape[-1]
  return jnp.exp(-_pairwise_sq_dists(a, b) / (d * d * s * s))


def imq_kernel(a: Array, b: Array, bandwidth=None) -> Array:
  """Inverse multiquadric k(a, b) = C / (C + ||a - b||^2), C = 2 D s^2. [N, M].

  The kernel of Tolstikhin et al. (2018) for Wasserstein autoencoders; s defaults to 1.
  """
  s = 1.0 if bandwidth is None else bandwidth
  c = 2.0 * a.shape[-1] * s * s
  return c / (c + _pairwise_sq_dists(a, b))


KERNELS = {"rbf": rbf_kernel, "imq": imq_kernel, "infovae": infovae_kernel}
MMD_ESTIMATORS = ("unbiased", "biased")


def mmd(z: Array, z_prior: Array, kernel: str = "rbf", bandwidth=None,
        estimator: str = "unbiased") -> Array:
  """Squared maximum mean discrepancy between two samples.

  MMD^2 = E k(z, z') + E k(p, p') - 2 E k(z, p). 'unbiased': the U-statistic of
  Gretton et al. (2012), the two within-sample means exclude the diagonal (i != j), the
  cross term averages all N*M pairs; it can be slightly negative when the two
  distributions are equal. 'biased': the V-statistic, every mean over all pairs with
  the diagonal, as in InfoVAE's code (kernel "infovae", estimator "biased" is its MMD).

  Args:
    z: [N, D] samples, e.g. encoder latents w ~ q(w|x) of a batch.
    z_prior: [M, D] samples of the prior N(0, I).
    kernel: "rbf" (Gaussian, exp(-||a-b||^2 / (2 D s^2))), "infovae" (Gaussian,
      exp(-||a-b||^2 / (D^2 s^2))) or "imq" (inverse multiquadric, C / (C + ||a-b||^2)
      with C = 2 D s^2).
    bandwidth: s, default 1.
    estimator: "unbiased" or "biased".
  Returns:
    scalar, one value for the whole batch (not per example); unitless.
  """
  if kernel not in KERNELS:
    raise ValueError(f"mmd: unknown kernel {kernel!r}; choose one of {sorted(KERNELS)}")
  k = KERNELS[kernel]
  n, m = z.shape[0], z_prior.shape[0]
  kzz = k(z, z, bandwidth)
  kpp = k(z_prior, z_prior, bandwidth)
  kzp = k(z, z_prior, bandwidth)
  if estimator == "biased":
    return jnp.mean(kzz) + jnp.mean(kpp) - 2.0 * jnp.mean(kzp)
  if estimator != "unbiased":
    raise ValueError(f"mmd: unknown estimator {estimator!r}; choose one of {MMD_ESTIMATORS}")
  within_z = (jnp.sum(kzz) - jnp.trace(kzz)) / (n * (n - 1))
  within_p = (jnp.sum(kpp) - jnp.trace(kpp)) / (m * (m - 1))
  return within_z + within_p - 2.0 * jnp.mean(kzp)


def to_bpd(nats, num_dims: int):
  """Nats per example -> bits per dimension: nats / (num_dims * ln 2).

  Args:
    nats: any shape (usually [B]), nats per example.
    num_dims: data dimensions per example, H * W * C.
  Returns:
    same shape, bits per dimension.
  """
  return jnp.asarray(nats) / (num_dims * math.log(2.0))
