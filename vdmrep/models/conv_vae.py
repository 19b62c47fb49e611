"""The classic VAE, as a reference for the VAE-VDM: the same encoder q(w|x), a plain
convolutional decoder p(x|w) with a 256-way categorical distribution per pixel.

Decoder: Dense(w) -> [H/4, W/4, 2 * channels] -> swish -> two stride-2 transposed
convolutions (to H/2 with 2 * channels, to H with channels), each followed by a 3x3
convolution, swish between -> a 3x3 convolution to C * vocab_size logits (zero-initialised,
so a fresh decoder is uniform over the vocab_size levels: exactly log2(vocab_size) bits/dim).
The negative ELBO per image is recon + kl, both in nats:
  recon = -sum_pixels log p(x_pixel | w), w ~ q(w|x) (one draw),
  kl    = KL(q(w|x) || N(0, I)),
a valid upper bound on -log p(x) for the discrete pixels (Kingma & Welling 2014; the
categorical likelihood as in PixelCNN's output layer, van den Oord et al. 2016).

`ConvVAE` has VAEVDM's interface (init, encode, elbo_terms with the same keys), so
training, evaluation and the studies run it unchanged; "prior" and "diffusion" are 0.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdmrep import losses
from vdmrep.models.encoder import Encoder
from vdmrep.models.vae_vdm import ELBOTerms

VAE_DECODERS = ("conv_vae",)


class ConvDecoder(nn.Module):
  """w [B, D] -> logits [B, H, W, C, vocab_size] for images (H, W, C), H and W % 4 == 0."""
  image_shape: tuple
  channels: int = 32
  vocab_size: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, w):
    hgt, wid, ch = self.image_shape
    if hgt % 4 or wid % 4:
      raise ValueError(f"ConvDecoder needs image sides divisible by 4; got {hgt}x{wid}")
    c = self.channels
    h = nn.Dense(hgt // 4 * wid // 4 * 2 * c, dtype=self.dtype, name="from_latent")(w)
    h = nn.swish(h.reshape(w.shape[0], hgt // 4, wid // 4, 2 * c))
    for i, width in enumerate((2 * c, c)):
      h = nn.ConvTranspose(width, (4, 4), strides=(2, 2), dtype=self.dtype, name=f"up_{i}")(h)
      h = nn.swish(h)
      h = nn.swish(nn.Conv(width, (3, 3), dtype=self.dtype, name=f"conv_{i}")(h))
    logits = nn.Conv(ch * self.vocab_size, (3, 3), kernel_init=nn.initializers.zeros,
                     dtype=self.dtype, name="to_logits")(h)
    return logits.reshape(w.shape[0], hgt, wid, ch, self.vocab_size).astype(jnp.float32)


def categorical_nll(logits, x_int):
  """-log p(x) per example [B] nats: logits [B, H, W, C, V], x_int [B, H, W, C] in [0, V)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, x_int.astype(jnp.int32)[..., None], axis=-1)[..., 0]
  return -jnp.sum(picked, axis=tuple(range(1, picked.ndim)))


@dataclasses.dataclass(frozen=True)
class ConvVAE:
  """Encoder q(w|x) + ConvDecoder p(x|w). Parameters {"encoder": ..., "decoder": ...}."""
  encoder: Encoder
  channels: int = 32
  vocab_size: int = 256

  conditional = True
  score_net = None  # no diffusion decoder (code that reports it checks for None)
  decoder_term = "recon"  # the ElboTerms field that holds -log p(x | w)
  # The latent interface of VAEVDM: a Gaussian latent with the N(0, I) prior.
  latent_kind = "gaussian"
  prior = None
  categories = 0
  per_pixel_schedule = False
  committed_rate_per_dim = 0.0

  @property
  def latent_dim(self) -> int:
    return self.encoder.latent

  def sample_posterior(self, params, x_int, rng, y=None):
    """w ~ q(w|x): [B, D] (labels: accepted for the shared interface, unused)."""
    del y
    mean, logvar = self.encode(params, x_int)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)

  def sample_prior(self, params, rng, n: int):
    """w ~ N(0, I): [n, D]."""
    return jax.random.normal(rng, (n, self.latent_dim))

  def prior_log_prob(self, params, w, rng):
    """log N(w; 0, I): [B] nats."""
    return -0.5 * jnp.sum(jnp.square(w) + jnp.log(2 * jnp.pi), axis=-1)

  def decoder(self, image_shape) -> ConvDecoder:
    return ConvDecoder(tuple(image_shape), self.channels, self.vocab_size)

  def init(self, rng, image_shape) -> dict:
    k_enc, k_dec = jax.random.split(rng)
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    return {"encoder": self.encoder.init(k_enc, x)["params"],
            "decoder": self.decoder(image_shape).init(
                k_dec, jnp.zeros((1, self.encoder.latent), jnp.float32))["params"]}

  def encode(self, params, x_int):
    """x_int [B, H, W, C] -> (mean, logvar) of q(w|x), each [B, D]."""
    x = losses.data_to_model_scale(x_int, self.vocab_size)
    return self.encoder.apply({"params": params["encoder"]}, x)

  def logits(self, params, w, image_shape):
    """p(x|w) as logits [B, H, W, C, vocab_size]."""
    return self.decoder(image_shape).apply({"params": params["decoder"]}, w)

  def sample(self, params, w, image_shape, key, method: str = "sample"):
    """Integer pixels [B, H, W, C] (int32) from p(x|w): one draw per pixel, or the mode."""
    logits = self.logits(params, w, image_shape)
    if method == "argmax":
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

  def elbo_terms(self, params, x_int, rng, *, train: bool = False, t=None, w=None,
                 deterministic_encoder: bool = False, kl_balance=None) -> ELBOTerms:
    """Per-example terms of the negative ELBO as `ELBOTerms` ([B] nats): recon =
    -log p(x|w), kl, prior = diffusion = 0, and t, gamma_t, gamma_0, gamma_1 zeros (there
    is no diffusion time). `train`, `t` and `kl_balance` are accepted for the shared interface and change
    nothing (the N(0, I) prior has no parameters to balance against)."""
    del train, t, kl_balance
    b = x_int.shape[0]
    mean, logvar = self.encode(params, x_int)
    if w is None:
      w = mean if deterministic_encoder else (
          mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape))
    kl_per_dim = losses.gaussian_kl_per_dim(mean, logvar)
    zeros = jnp.zeros((b,), jnp.float32)
    return ELBOTerms(recon=categorical_nll(self.logits(params, w, x_int.shape[1:]), x_int),
                     prior=zeros, diffusion=zeros, kl=jnp.sum(kl_per_dim, axis=-1),
                     kl_per_dim=kl_per_dim, w=w, mean=mean, logvar=logvar, t=zeros,
                     gamma_t=zeros, gamma_0=zeros, gamma_1=zeros)
