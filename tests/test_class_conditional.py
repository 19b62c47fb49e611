"""Class-conditional VAE-VDM: label dropout, the unconditional path, guidance, the
conditional ELBO on noise, and training with labels."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from vdmrep import config_lib, data, sampling, steering, train
from vdmrep.models import build_model


def _model(**over):
  c = tiny_config(**{"model.num_classes": 10, **over})
  c.model.conditioning = over.get("model.conditioning", "film")
  config_lib.validate(c)
  return c, build_model(c.model)


def perturbed(params, scale=0.2, seed=1):
  """Zero-initialised weights (FiLM, output conv) made non-zero so that labels matter."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + scale * rng.normal(size=x.shape).astype(np.float32)
                      if not np.any(x) else x, params)


@pytest.fixture(scope="module", params=["film", "additive"])
def cc(request):
  c, model = _model(**{"model.conditioning": request.param, "model.label_encoder": True,
                       "model.label_dropout": 1.0})
  params = perturbed(jax.jit(model.init, static_argnums=1)(jax.random.key(0), (8, 8, 1)))
  return model, params


def _x(n=8):
  return np.asarray(jax.random.randint(jax.random.key(2), (n, 8, 8, 1), 0, 256), np.uint8)


@pytest.mark.slow
def test_label_dropout_one_is_exactly_the_unconditional_path(cc):
  model, params = cc  # label_dropout = 1: every training label becomes the null token
  x, y, key = _x(), jnp.arange(8) % 10, jax.random.key(3)
  terms = jax.jit(lambda p, y: model.elbo_terms(p, x, key, train=True, y=y))
  dropped, uncond = terms(params, y), terms(params, None)
  for k in ("recon", "prior", "diffusion", "kl"):
    np.testing.assert_array_equal(np.asarray(dropped[k]), np.asarray(uncond[k]), err_msg=k)
  # without dropout (evaluation) the labels reach the encoder and the score net
  ev = jax.jit(lambda p, y: model.elbo_terms(p, x, key, train=False, y=y))
  with_y, no_y = ev(params, y), ev(params, None)
  assert float(jnp.max(jnp.abs(with_y["diffusion"] - no_y["diffusion"]))) > 1e-3
  assert float(jnp.max(jnp.abs(with_y["mean"] - no_y["mean"]))) > 1e-3
  # and the same eps_hat as asking for the null token explicitly
  z, g, w = jnp.ones((2, 8, 8, 1)), jnp.zeros((2,)), jnp.zeros((2, 128))
  np.testing.assert_array_equal(
      np.asarray(model.eps_hat(params, z, g, w, None)),
      np.asarray(model.eps_hat(params, z, g, w, jnp.full((2,), model.null_label))))


def test_drop_labels_rate_and_untouched_labels():
  _, model = _model(**{"model.label_dropout": 0.3})
  y = jnp.arange(20_000) % 10
  out = np.asarray(model.drop_labels(jax.random.key(0), y))
  dropped = out == model.null_label
  assert abs(dropped.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / y.size)
  np.testing.assert_array_equal(out[~dropped], np.asarray(y)[~dropped])
  _, none = _model(**{"model.label_dropout": 0.0})
  assert none.drop_labels(jax.random.key(0), y) is y


@pytest.mark.slow
def test_guidance_combines_conditional_and_null_predictions(cc):
  model, params = cc
  z = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  g, w, y = jnp.full((3,), -2.0), jax.random.normal(jax.random.key(1), (3, 128)), jnp.arange(3)
  e_c = model.eps_hat(params, z, g, w, y)
  e_u = model.eps_hat(params, z, g, w, None)
  assert float(jnp.max(jnp.abs(e_c - e_u))) > 1e-3
  for s in (0.0, 1.5):
    got = sampling.guided_eps_fn(model, params, w, y, s)(z, g)
    np.testing.assert_allclose(np.asarray(got), np.asarray((1 + s) * e_c - s * e_u), atol=1e-5)


def test_class_conditional_samples_depend_on_the_label(cc):
  model, params = cc
  x = np.zeros((4, 8, 8, 1), np.uint8)
  run = jax.jit(lambda y: sampling.run_mode(model, params, jax.random.key(4), x,
                                            mode="unconditional", num_steps=4, labels=y,
                                            sampler="ddim", decode_method="argmax")[0])
  a, b = np.asarray(run(jnp.zeros(4, jnp.int32))), np.asarray(run(jnp.full(4, 7)))
  assert np.mean(a != b) > 0.1
  np.testing.assert_array_equal(a, np.asarray(run(jnp.zeros(4, jnp.int32))))


@pytest.mark.slow
def test_conditional_elbo_on_uniform_pixels_is_at_least_8_bits():
  """iid uniform 8-bit pixels have entropy 8 bits/dim given any label: after training on
  such noise with labels, the held-out conditional bound must not go below it."""
  c, model = _model(**{"model.label_dropout": 0.1, "model.conditioning": "additive"})
  c.optim.warmup_steps = 0
  rng = np.random.default_rng(0)
  ds = data.Dataset("uniform", rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8),
                    rng.integers(0, 256, (128, 8, 8, 1), dtype=np.uint8),
                    rng.integers(0, 10, 64).astype(np.int32),
                    rng.integers(0, 10, 128).astype(np.int32))
  tx = train.make_optimizer(c.optim)
  state = train.create_train_state(model, tx, jax.random.key(0), ds.image_shape)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=c))
  for s in range(20):
    images, labels = data.train_batch(ds, s, 16, 0, with_labels=True)
    state, metrics = step(state, (jnp.asarray(images), jnp.asarray(labels)), jax.random.key(1))
  assert np.isfinite(float(metrics["bpd"]))
  res = steering.elbo_bpd(model, state.params, ds.eval_images, ds.eval_labels,
                          jax.random.key(2), batch_size=64)
  assert res["num_images"] == 128
  assert res["bpd"] >= 8.0 - 3.0 * res["bpd_se"], res


def test_config_and_data_errors_name_the_key():
  c = tiny_config(**{"model.label_encoder": True})
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.label_encoder"):
    config_lib.validate(c)
  c = tiny_config(**{"model.num_classes": 10, "model.label_dropout": 1.5})
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.label_dropout"):
    config_lib.validate(c)
  c = tiny_config(**{"model.num_classes": 10, "sample.label": 10})
  with pytest.raises(config_lib.ConfigError, match=r"config\.sample\.label"):
    config_lib.validate(c)
  ds = data.load(tiny_config().data)
  with pytest.raises(data.DataError, match=r"config\.model\.num_classes=5"):
    data.check_labels(ds, 5, "config.model.num_classes")
  data.check_labels(ds, 10, "config.model.num_classes")  # digits 0..9 fit


def test_class_means_and_prior_interpolation():
  w = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
  means, overall, dirs = steering.class_means(w, np.array([0, 0, 1, 1]), 3)
  np.testing.assert_allclose(means, [[2, 0], [0, 3], [1, 1.5]])
  np.testing.assert_allclose(dirs[2], 0.0)
  np.testing.assert_allclose(steering.attribute_walk(overall[None], dirs[0], [0, 1])[0],
                             [overall, means[0]])
  # slerp under N(mu, s^2): endpoints kept, the path at the prior's whitened radius
  mu, sc = np.array([5.0, -1.0]), np.array([2.0, 0.5])
  a, b = mu + sc * np.array([1.0, 0.0]), mu + sc * np.array([0.0, 1.0])
  path = np.asarray(steering.interpolate_under_prior(a[None], b[None], np.linspace(0, 1, 5),
                                                      "slerp", mu, sc))[0]
  np.testing.assert_allclose(path[[0, -1]], [a, b], atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm((path - mu) / sc, axis=-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_unet_takes_labels_too():
  c, model = _model(**{"model.vdm": "unet_s", "model.channels": 8, "model.n_blocks": 1,
                       "model.conditioning": "additive"})
  params = perturbed(jax.jit(model.init, static_argnums=1)(jax.random.key(0), (8, 8, 1)))
  assert params["score"]["label_embed"]["embedding"].shape == (11, 8)
  z, g, w = jnp.ones((2, 8, 8, 1)), jnp.zeros((2,)), jnp.zeros((2, 128))
  a = model.eps_hat(params, z, g, w, jnp.array([0, 1]))
  b = model.eps_hat(params, z, g, w, None)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def _prior_model(prior):
  from vdmrep.config_lib import base_config
  from vdmrep.models import build_model
  c = base_config()
  c.model.update(vdm="mvdm", encoder="te", n_blocks=1, channels=8, latent_dim=4, prior=prior,
                 prior_hidden=16)
  model = build_model(c.model, (8, 8, 1))
  params = model.init(jax.random.key(0), (8, 8, 1))
  # move the learned prior away from its N(0, I) initialisation
  leaves, td = jax.tree.flatten(params["prior"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params["prior"] = jax.tree.unflatten(
      td, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, params


@pytest.mark.slow
def test_interpolation_in_a_flow_prior_runs_through_its_base_space():
  model, params = _prior_model("flow")
  flow, v = model.prior, {"params": params["prior"]}
  a, b = jax.random.normal(jax.random.key(2), (2, 3, 4))
  alphas = np.linspace(0, 1, 5)
  path = np.asarray(steering.interpolate_in_prior(model, params, a, b, alphas))
  np.testing.assert_allclose(path[:, [0, -1]], np.stack([a, b], 1), atol=1e-4)
  # the base-space images of the path are the slerp of the endpoints' images
  base = lambda w: np.asarray(flow.apply(v, jnp.asarray(w), method=flow.forward)[0])
  want = np.asarray(sampling.interpolate(base(a), base(b), alphas))
  np.testing.assert_allclose(base(path.reshape(-1, 4)).reshape(want.shape), want, atol=1e-4)
  # and it is not the slerp in w (the flow is not the identity any more)
  assert np.abs(path - np.asarray(sampling.interpolate(a, b, alphas))).max() > 1e-2


@pytest.mark.slow
def test_interpolation_in_a_mixture_prior_whitens_by_its_moments():
  model, params = _prior_model("mixture")
  a, b = jax.random.normal(jax.random.key(3), (2, 2, 4))
  alphas = np.linspace(0, 1, 4)
  with pytest.raises(ValueError, match="needs `rng`"):
    steering.interpolate_in_prior(model, params, a, b, alphas)
  key = jax.random.key(4)
  path = np.asarray(steering.interpolate_in_prior(model, params, a, b, alphas, rng=key))
  np.testing.assert_allclose(path[:, [0, -1]], np.stack([a, b], 1), atol=1e-4)
  draws = np.asarray(model.sample_prior(params, key, 4096), np.float64)
  want = steering.interpolate_under_prior(a, b, alphas, "slerp", draws.mean(0),
                                          draws.std(0) + 1e-6)
  np.testing.assert_allclose(path, np.asarray(want), atol=1e-4)
