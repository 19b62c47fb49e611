"""The classic VAE reference (conv decoder, categorical pixels): its ELBO terms, a known
value, training and the config option."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdmrep import config_lib, losses, sampling
from vdmrep.models import build_model
from vdmrep.models.conv_vae import ConvVAE, categorical_nll

from conftest import tiny_config


def _vae_config(**kw):
  return tiny_config(**{"model.decoder": "conv_vae", "model.channels": 8, **kw})


def test_categorical_nll_matches_a_direct_sum():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 2, 1, 5))
  x = rng.integers(0, 5, (2, 3, 2, 1))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = [-sum(logp[b, i, j, 0, x[b, i, j, 0]] for i in range(3) for j in range(2))
              for b in range(2)]
  np.testing.assert_allclose(categorical_nll(jnp.asarray(logits), jnp.asarray(x)), expected,
                             rtol=1e-5)


@pytest.mark.slow
def test_uniform_decoder_gives_exactly_8_bits_per_dim_plus_the_kl():
  cfg = _vae_config()
  config_lib.validate(cfg)
  model = build_model(cfg.model)
  assert isinstance(model, ConvVAE)
  params = model.init(jax.random.key(0), (8, 8, 1))
  x = jax.random.randint(jax.random.key(1), (4, 8, 8, 1), 0, 256)
  terms = model.elbo_terms(params, x, jax.random.key(2))
  d = 8 * 8 * 1
  # The zero-initialised logits layer is uniform over 256 levels: D ln 256 nats exactly.
  np.testing.assert_allclose(terms.recon, d * math.log(256.0), rtol=1e-6)
  np.testing.assert_array_equal(terms.prior, 0.0)
  np.testing.assert_array_equal(terms.diffusion, 0.0)
  mean, logvar = model.encode(params, x)
  np.testing.assert_allclose(terms.kl, losses.gaussian_kl(mean, logvar), rtol=1e-6)
  bpd = losses.to_bpd(terms.total, d)
  np.testing.assert_allclose(bpd, 8.0 + terms.kl / (d * math.log(2.0)), rtol=1e-6)
  assert float(jnp.min(terms.kl)) > 0  # a fresh encoder's posterior is not the prior


@pytest.mark.slow
def test_training_lowers_the_negative_elbo_and_uses_w():
  model = build_model(_vae_config().model)
  params = model.init(jax.random.key(0), (8, 8, 1))
  # Two fixed images: the decoder can only tell them apart through w.
  x = jnp.stack([jnp.full((8, 8, 1), 30), jnp.full((8, 8, 1), 220)]).astype(jnp.int32)
  x = jnp.tile(x, (8, 1, 1, 1))
  loss = lambda p, k: jnp.mean(sum(getattr(model.elbo_terms(p, x, k), t) for t in ("recon", "kl")))
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, k):
    value, g = jax.value_and_grad(loss)(p, k)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, value
  first = float(loss(params, jax.random.key(5)))
  for i in range(150):
    params, opt, _ = step(params, opt, jax.random.key(i))
  last = float(loss(params, jax.random.key(5)))
  assert last < 0.5 * first, (first, last)
  # Decoding each image's posterior mean gives back that image's grey level.
  mean, _ = model.encode(params, x[:2])
  out = model.sample(params, mean, (8, 8, 1), jax.random.key(9), method="argmax")
  assert abs(int(out[0].mean()) - 30) < 10 and abs(int(out[1].mean()) - 220) < 10


def test_samplers_decode_directly_and_config_errors():
  model = build_model(_vae_config().model)
  params = model.init(jax.random.key(0), (8, 8, 1))
  x = jnp.zeros((3, 8, 8, 1), jnp.int32)
  for mode in sampling.MODES:
    out, recorded = sampling.run_mode(model, params, jax.random.key(1), x, mode=mode,
                                      num_steps=4)
    assert out.shape == x.shape and out.dtype == jnp.int32 and recorded is None
    assert int(out.min()) >= 0 and int(out.max()) <= 255
  with pytest.raises(config_lib.ConfigError, match="needs an encoder"):
    config_lib.validate(_vae_config(**{"model.encoder": "none"}))
  with pytest.raises(config_lib.ConfigError, match="config.model.decoder"):
    config_lib.validate(tiny_config(**{"model.decoder": "pixelcnn"}))
  with pytest.raises(config_lib.ConfigError, match="divisible by 4"):
    config_lib.check_image_shape(_vae_config(), (6, 6, 1))
  assert config_lib.model_fingerprint(_vae_config())["decoder"] == "conv_vae"
