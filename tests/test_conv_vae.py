"""The classic VAE reference (conv decoder, categorical pixels): its ELBO terms, a known
value, training and the config option."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdmrep import (config_lib, data, diagnostics, latent_diagnostics, losses, parallel,
                    quality, sampling)
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


def test_sample_sets_and_pictures_of_a_vae_have_no_trajectories(tmp_path):
  """The evaluation's sample section asks for trajectories; a VAE decoder has none, so its
  sample sets carry images only and its pictures leave the trajectory figures out."""
  cfg = _vae_config()
  s = cfg.sample
  s.num_steps, s.batch_size, s.num_guided, s.grid_size = 3, 8, 6, 4
  s.trajectory_frames, s.num_trajectories, s.num_interpolations, s.interpolation_steps = 3, 2, 2, 3
  model = build_model(cfg.model)
  ds = data.load(cfg.data)
  params = model.init(jax.random.key(0), ds.image_shape)
  samples = quality.draw_samples(model, params, ds, cfg, None, jax.random.key(1),
                                 num_unconditional=5)
  assert samples["unconditional"].shape == (5, 8, 8, 1)
  for mode in ("guided", "reconstruction"):
    assert samples[mode].shape == (6, 8, 8, 1), mode
    assert f"{mode}_frames" not in samples and f"{mode}_frame_t" not in samples
  assert samples["interp"].shape == (2, 3, 8, 8, 1)
  paths = quality.write_pictures(samples, cfg, str(tmp_path))
  assert sorted(paths) == ["grid_guided", "grid_reconstruction", "grid_unconditional",
                           "interpolation"]
  for path in paths.values():
    with open(path, "rb") as fh:
      assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_usefulness_of_w_measures_the_vae_decoders_likelihood():
  """A VAE decoder has no diffusion term: what w saves it is the rise of -log p(x | w) when
  each image gets the next image's w (one t, as it does not depend on t)."""
  model = build_model(_vae_config().model)
  params = model.init(jax.random.key(0), (8, 8, 1))
  # Random logits weights: a fresh decoder's zero-initialised logits ignore w.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  x = jax.random.randint(jax.random.key(1), (6, 8, 8, 1), 0, 256)
  key = jax.random.key(2)
  mesh = parallel.make_mesh()
  use = diagnostics.usefulness(diagnostics.make_usefulness_fn(model, mesh), params, np.asarray(x),
                               key, num_t=1, batch_size=6, mesh=mesh, num_dims=64)
  w = model.sample_posterior(params, x, jax.random.split(jax.random.fold_in(key, 0))[0])
  own = model.elbo_terms(params, x, key, w=w).recon
  swapped = model.elbo_terms(params, x, key, w=jnp.roll(w, -1, axis=0)).recon
  gap_nats = float(jnp.mean(swapped - own))
  assert abs(gap_nats) > 1e-3
  np.testing.assert_allclose(use["gap_mean_bpd"] * 64 * math.log(2.0), gap_nats, rtol=1e-4)
  bands = latent_diagnostics.band_savings(use, 2.0, 64, term="recon")
  np.testing.assert_allclose(bands["saving_total_nats"], gap_nats, rtol=1e-4)
  assert bands["net_nats"] == pytest.approx(bands["saving_total_nats"] - 2.0)
  assert "-log p(x | w) rises" in "\n".join(latent_diagnostics.markdown(bands))
