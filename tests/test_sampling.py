"""The ancestral sampler: loop vs a plain Python loop, the update vs closed forms, modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep import config_lib, sampling
from vdmrep.models import build_model

GMIN, GMAX = -13.3, 5.0


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def film_tiny():
  """One 8x8 film-conditioned model (n_blocks=1, channels=8) shared by the tests.

  No Fourier features: sin(2^7 2 pi z) turns float32 round-off into visible differences
  between two orderings of the same arithmetic, which a float-tolerance test cannot use.
  """
  c = config_lib.base_config()
  c.model.vdm, c.model.n_blocks, c.model.channels = "mvdm", 1, 8
  c.model.conditioning, c.model.fourier_features = "film", False
  config_lib.validate(c)
  model = build_model(c.model)
  return model, jax.jit(model.init, static_argnums=1)(jax.random.key(0), (8, 8, 1))


def perturbed(params, scale, seed=1):
  """Makes the zero-initialised score-net weights (film, conditioning projections,
  output convs) non-zero, so that w and the network output really matter."""
  rng = np.random.default_rng(seed)  # numpy: no per-shape compilation
  leaves, tree = jax.tree.flatten(params["score"])
  leaves = [x + scale * rng.normal(size=x.shape).astype(np.float32) if not np.any(x) else x
            for x in leaves]
  return dict(params, score=jax.tree.unflatten(tree, leaves))


def _digits(n, offset=0):
  from sklearn.datasets import load_digits
  d = load_digits()
  return np.round(d.images[offset:offset + n] * (255 / 16)).astype(np.uint8)[..., None]


def _linear_gamma(t):
  return GMIN + (GMAX - GMIN) * t


def test_fori_loop_equals_python_loop_of_posterior_update(film_tiny):
  model, params = film_tiny
  params = perturbed(params, 0.1)
  n, b = 6, 3
  key = jax.random.key(3)
  z1 = jax.random.normal(jax.random.key(4), (b, 8, 8, 1))
  w = jax.random.normal(jax.random.key(5), (b, 128))
  eps_fn = jax.jit(lambda z, g: model.eps_hat(params, z, g, w))
  gamma_fn = lambda t: model.gamma(params, jnp.asarray(t, jnp.float32))
  frames = tuple(sampling.frame_steps(n, 3))
  run = jax.jit(lambda z, k: sampling.denoise(eps_fn, gamma_fn, z, k, num_steps=n,
                                              frames=frames))
  z0, rec = run(z1, key)

  # Independent loop: the posterior q(z_s|z_t, x_hat) in its x-form, float64 numpy.
  z, path = np.asarray(z1, np.float64), [np.asarray(z1, np.float64)]
  for k in range(n):
    g_t, g_s = _linear_gamma((n - k) / n), _linear_gamma((n - k - 1) / n)
    a_t, s_t = np.sqrt(_sig(-g_t)), np.sqrt(_sig(g_t))
    a_s, s2_s = np.sqrt(_sig(-g_s)), _sig(g_s)
    eps_hat = np.asarray(eps_fn(jnp.asarray(z, jnp.float32), jnp.full((b,), g_t)), np.float64)
    x_hat = (z - s_t * eps_hat) / a_t
    snr_ratio = np.exp(g_s - g_t)  # SNR(t) / SNR(s)
    mean = snr_ratio * (a_s / a_t) * z + a_s * (1 - snr_ratio) * x_hat
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, k), z.shape), np.float64)
    z = mean + np.sqrt((1 - snr_ratio) * s2_s) * noise
    path.append(z)
  np.testing.assert_allclose(np.asarray(z0), z, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(rec), np.stack([path[i] for i in frames]), atol=2e-4,
                             rtol=1e-4)
  assert list(frames) == [0, 3, 6]


def _gaussian_oracle_run(num_steps, m, v, n, key):
  """The sampler on data x ~ N(m, v) per dimension with the exact eps_hat = E[eps | z_t]."""
  def eps_fn(z, g):
    g = g[:, None]
    a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
    return jnp.sqrt(s2) * (z - jnp.sqrt(a2) * m) / (a2 * v + s2)
  z1 = jax.random.normal(jax.random.fold_in(key, 1), (n, 2))
  run = jax.jit(lambda z, k: sampling.denoise(eps_fn, _linear_gamma, z, k,
                                              num_steps=num_steps)[0])
  return np.asarray(run(z1, key), np.float64).ravel()


def _discrete_moments(num_steps, m, v):
  """Exact mean/variance of the N-step sampler's z_0 (everything is linear-Gaussian)."""
  mean, var = 0.0, 1.0
  for k in range(num_steps):
    n = num_steps
    g_t, g_s = _linear_gamma((n - k) / n), _linear_gamma((n - k - 1) / n)
    a_t, s2_t, a_s, s2_s = np.sqrt(_sig(-g_t)), _sig(g_t), np.sqrt(_sig(-g_s)), _sig(g_s)
    d = a_t ** 2 * v + s2_t
    p, q = a_t * v / d, m - a_t ** 2 * v * m / d  # E[x | z_t] = p z_t + q
    r = np.exp(g_s - g_t)
    a = r * a_s / a_t + a_s * (1 - r) * p
    mean, var = a * mean + a_s * (1 - r) * q, a * a * var + (1 - r) * s2_s
  return mean, var


def test_gaussian_data_output_matches_analytic_distribution():
  m, v, n = 0.3, 0.04, 20_000
  a0, s2_0 = np.sqrt(_sig(-GMIN)), _sig(GMIN)
  true_mean, true_var = a0 * m, a0 ** 2 * v + s2_0  # q(z_0) of the data distribution
  # Many steps: the sampler's z_0 has the data's marginal (up to O(1/N) and MC error).
  z = _gaussian_oracle_run(1000, m, v, n, jax.random.key(0))
  se_var = true_var * np.sqrt(2.0 / z.size)
  assert abs(z.mean() - true_mean) < 4 * np.sqrt(true_var / z.size)
  assert abs(z.var() - true_var) < 4 * se_var + 0.01 * true_var
  # Few steps: the plug-in posterior loses variance; the sampler has exactly the
  # discrete chain's variance, measurably below the data's.
  mean20, var20 = _discrete_moments(20, m, v)
  z20 = _gaussian_oracle_run(20, m, v, n, jax.random.key(1))
  assert var20 < 0.8 * true_var
  assert abs(z20.var() - var20) < 4 * var20 * np.sqrt(2.0 / z20.size)
  assert abs(z20.mean() - mean20) < 4 * np.sqrt(var20 / z20.size)
  # and the discrete chain converges to the analytic distribution as N grows
  assert abs(_discrete_moments(5000, m, v)[1] - true_var) < 0.002 * true_var


def test_guided_mode_uses_encoder_w(film_tiny):
  model, params = film_tiny
  params = perturbed(params, 0.2)
  xa = np.repeat(_digits(1, 0), 2, 0)
  xb = np.repeat(_digits(1, 1), 2, 0)
  run = jax.jit(lambda p, x: sampling.run_mode(model, p, jax.random.key(7), x, mode="guided",
                                               num_steps=4, decode_method="argmax")[0])
  sa, sa2, sb = run(params, xa), run(params, xa), run(params, xb)
  np.testing.assert_array_equal(np.asarray(sa), np.asarray(sa2))
  assert np.mean(np.asarray(sa) != np.asarray(sb)) > 0.2
  # The same model with its film weights zeroed ignores w: inputs no longer matter.
  no_film = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "film" in jax.tree_util.keystr(path) else x, params)
  np.testing.assert_array_equal(np.asarray(run(no_film, xa)), np.asarray(run(no_film, xb)))
  # w comes from the encoder at training's input scale (pixels -> bin centres in (-1, 1)).
  key = jax.random.key(9)
  mean, logvar = jax.jit(model.encoder.apply)({"params": params["encoder"]},
                                              (xa.astype(np.float32) + 0.5) / 128.0 - 1.0)
  expect = mean + np.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  got = jax.jit(lambda p, x, k: sampling.posterior_w(model, p, x, k))(params, xa, key)
  np.testing.assert_allclose(got, expect, atol=1e-5)


def test_trajectory_frames_and_reconstruction_from_low_noise(film_tiny):
  model, params = film_tiny
  x = _digits(3)
  out = sampling.generate(model, params, jax.random.key(2), mode="reconstruction", images=x,
                          batch_size=2, num_steps=40, t_start=0.05, num_frames=3,
                          decode_method="argmax")
  # t_start = 0.05 -> 2 steps; frames at steps 0, 1, 2 = times 0.05, 0.025, 0
  np.testing.assert_allclose(out["frame_t"], [0.05, 0.025, 0.0])
  assert out["frames"].shape == (3, 3, 8, 8, 1)
  # sigma at t = 0.05 is ~0.002: reconstructions are the inputs up to one pixel level
  assert np.max(np.abs(out["images"].astype(int) - x.astype(int))) <= 1
  # the first frame is q(z_t|x): alpha_t f plus sigma_t noise
  g = _linear_gamma(0.05)
  f = (x + 0.5) / 128.0 - 1.0
  assert np.max(np.abs(out["frames"][0] - np.sqrt(_sig(-g)) * f)) < 6 * np.sqrt(_sig(g))


def test_generate_is_deterministic_and_batch_keys_differ(film_tiny):
  model, params = film_tiny
  params = perturbed(params, 0.1)
  kw = dict(mode="unconditional", num=5, image_shape=(8, 8, 1), batch_size=4, num_steps=3)
  a = sampling.generate(model, params, jax.random.key(0), **kw)["images"]
  b = sampling.generate(model, params, jax.random.key(0), **kw)["images"]
  c = sampling.generate(model, params, jax.random.key(1), **kw)["images"]
  np.testing.assert_array_equal(a, b)
  assert a.shape == (5, 8, 8, 1) and a.dtype == np.uint8
  assert np.mean(a != c) > 0.5


def test_interpolation_paths_and_shared_noise(film_tiny):
  rng = np.random.default_rng(0)
  wa, wb = rng.normal(size=(3, 16)), rng.normal(size=(3, 16))
  alphas = np.linspace(0, 1, 5)
  sl = np.asarray(sampling.interpolate(wa, wb, alphas, "slerp"))
  lin = np.asarray(sampling.interpolate(wa, wb, alphas, "linear"))
  np.testing.assert_allclose(sl[:, 0], wa, atol=1e-5)
  np.testing.assert_allclose(sl[:, -1], wb, atol=1e-5)
  np.testing.assert_allclose(lin[:, 2], (wa + wb) / 2, atol=1e-6)
  # slerp between orthogonal unit vectors stays on the unit circle at angle a * pi/2
  e = np.eye(2)[None]
  arc = np.asarray(sampling.interpolate(e[:, 0], e[:, 1], alphas, "slerp"))[0]
  np.testing.assert_allclose(arc, np.stack([np.cos(alphas * np.pi / 2),
                                            np.sin(alphas * np.pi / 2)], -1), atol=1e-5)
  # a model that ignores w gives identical images along each row (all noise shared)
  model, params = film_tiny  # film weights still zero: the score net ignores w
  run = jax.jit(lambda p, k, a, b: sampling.interpolation_samples(model, p, k, a, b, steps=3,
                                                                 num_steps=3))
  rows = run(params, jax.random.key(0), _digits(2), _digits(2, 5))
  assert rows.shape == (2, 3, 8, 8, 1)
  np.testing.assert_array_equal(np.asarray(rows[:, 0]), np.asarray(rows[:, 2]))


@pytest.mark.parametrize("field,value,needle", [
    ("decode", "mode", "config.sample.decode"),
    ("t_start", 0.0, "config.sample.t_start"),
    ("num_steps", 0, "config.sample.num_steps"),
    ("interpolation", "cubic", "config.sample.interpolation"),
    ("inception_weights", "/nonexistent/inception.h5", "config.sample.inception_weights"),
])
def test_config_errors_name_the_key(field, value, needle):
  c = config_lib.base_config()
  c.sample[field] = value
  with pytest.raises(config_lib.ConfigError, match=needle.replace(".", r"\.")):
    config_lib.validate(c)


# -- the DDIM-style update, guidance, sampler config -----------------------------------
def _alpha_sigma(g):
  return np.sqrt(_sig(-g)), np.sqrt(_sig(g))


def test_ddim_one_step_from_t1_with_perfect_eps_recovers_the_data():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (4, 8, 8, 1))
  eps = rng.normal(size=x.shape)
  (a1, s1), (a0, s0) = _alpha_sigma(GMAX), _alpha_sigma(GMIN)
  z1 = a1 * x + s1 * eps
  z0 = np.asarray(sampling.ddim_step(jnp.asarray(z1, jnp.float32), jnp.asarray(eps, jnp.float32),
                                     GMIN, GMAX), np.float64)
  # Closed form: x_hat = (z_1 - sigma_1 eps) / alpha_1 = x, so z_0 = alpha_0 x + sigma_0 eps.
  np.testing.assert_allclose(z0, a0 * x + s0 * eps, atol=2e-5)
  np.testing.assert_allclose(z0 / a0, x, atol=s0 / a0 * np.abs(eps).max() + 2e-5)
  assert np.abs(z0 / a0 - x).max() < 0.01 < np.abs(z1 / a1 - x).max()
  # The ancestral update draws noise instead: one step lands within sigma_0 of the same x.
  noise = rng.normal(size=x.shape)
  za = np.asarray(sampling.ancestral_step(z1, eps, GMIN, GMAX, noise), np.float64)
  c = -np.expm1(GMIN - GMAX)
  np.testing.assert_allclose(za, a0 * x + np.sqrt(c) * s0 * noise + np.exp(GMIN - GMAX)
                             * (a0 / a1) * s1 * eps, atol=2e-5)


@pytest.mark.parametrize("num_steps", [1, 3, 50])
def test_ddim_with_the_true_noise_stays_on_the_path_at_any_step_count(num_steps):
  """eps_hat(z_t) = (z_t - alpha_t x) / sigma_t, the perfect prediction for one known x:
  every DDIM step maps alpha_t x + sigma_t eps to alpha_s x + sigma_s eps."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 1)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def eps_fn(z, g):
    g = g[:, None, None, None]
    return (z - jnp.sqrt(jax.nn.sigmoid(-g)) * x) / jnp.sqrt(jax.nn.sigmoid(g))
  a1, s1 = _alpha_sigma(GMAX)
  a0, s0 = _alpha_sigma(GMIN)
  z0, _ = jax.jit(lambda z: sampling.denoise(eps_fn, _linear_gamma, z, jax.random.key(0),
                                             num_steps=num_steps, sampler="ddim"))(
                                                 a1 * x + s1 * eps)
  np.testing.assert_allclose(np.asarray(z0), a0 * np.asarray(x) + s0 * np.asarray(eps),
                             atol=5e-5)


def _ddim_moments(num_steps, m, v, mean, var):
  """Exact mean/variance after N DDIM steps on x ~ N(m, v) with the exact eps_hat (each
  step is an affine map z -> A z + B), from z_1 of the given moments."""
  n = num_steps
  for k in range(n):
    g_t, g_s = _linear_gamma((n - k) / n), _linear_gamma((n - k - 1) / n)
    (a_t, s_t), (a_s, s_s) = _alpha_sigma(g_t), _alpha_sigma(g_s)
    d = a_t ** 2 * v + s_t ** 2
    pe, qe = s_t / d, -s_t * a_t * m / d  # eps_hat = pe z + qe
    big_a = a_s * (1 - s_t * pe) / a_t + s_s * pe
    big_b = -a_s * s_t * qe / a_t + s_s * qe
    mean, var = big_a * mean + big_b, big_a ** 2 * var
  return mean, var


def test_ddim_is_deterministic_and_transports_gaussian_data():
  """On x ~ N(m, v) with the exact eps_hat the DDIM chain is affine: the sampler matches
  its moments, draws no noise, and (started from q(z_1)) converges to q(z_0) as the
  probability-flow ODE does."""
  m, v, n = 0.3, 0.04, 20_000

  def eps_fn(z, g):
    g = g[:, None]
    a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
    return jnp.sqrt(s2) * (z - jnp.sqrt(a2) * m) / (a2 * v + s2)
  (a1, s1), (a0, s0) = _alpha_sigma(GMAX), _alpha_sigma(GMIN)
  mean1, var1 = a1 * m, a1 ** 2 * v + s1 ** 2  # q(z_1) of the data
  z1 = mean1 + np.sqrt(var1) * jax.random.normal(jax.random.key(1), (n, 2))
  run = jax.jit(lambda z, k: sampling.denoise(eps_fn, _linear_gamma, z, k, num_steps=20,
                                              sampler="ddim")[0])
  a, b = np.asarray(run(z1, jax.random.key(0))), np.asarray(run(z1, jax.random.key(5)))
  np.testing.assert_array_equal(a, b)
  mean20, var20 = _ddim_moments(20, m, v, mean1, var1)
  assert abs(a.mean() - mean20) < 4 * np.sqrt(var20 / a.size)
  assert abs(a.var() - var20) < 4 * var20 * np.sqrt(2.0 / a.size)
  true_mean, true_var = a0 * m, a0 ** 2 * v + s0 ** 2
  assert var20 < 0.85 * true_var  # 20 steps lose variance ...
  mean_n, var_n = _ddim_moments(5000, m, v, mean1, var1)  # ... which comes back with N
  assert abs(mean_n - true_mean) < 1e-6 and abs(var_n - true_var) < 0.002 * true_var


@pytest.mark.parametrize("field,value,needle", [
    ("sampler", "heun", "config.sample.sampler"),
    ("guidance", -1.0, "config.sample.guidance"),
    ("label", 3, "config.sample.label"),  # the base model has no classes
])
def test_sampler_config_errors_name_the_key(field, value, needle):
  c = config_lib.base_config()
  c.sample[field] = value
  with pytest.raises(config_lib.ConfigError, match=needle.replace(".", r"\.")):
    config_lib.validate(c)
