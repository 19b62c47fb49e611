"""Learned priors, capped and categorical latents, the per-pixel schedule, KL balancing:
each checked against an independent computation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdmrep import collapse, losses
from vdmrep.config_lib import ConfigError, base_config, validate
from vdmrep.models import build_model, priors
from vdmrep.models.schedules import FixedLinear, PerPixel, gamma_and_derivative


def tiny(**model):
  c = base_config()
  c.model.update(dict(dict(vdm="mvdm", encoder="te", n_blocks=1, channels=8), **model))
  return c


def perturb(tree, key, scale=0.3):
  leaves, td = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(td, [p + scale * jax.random.normal(k, p.shape)
                                 for p, k in zip(leaves, keys)])


def gaussian_kl_np(m, lv, mu, lvp):
  """KL(N(m, e^lv) || N(mu, e^lvp)) summed over the last axis (float64 numpy)."""
  return 0.5 * np.sum(lvp - lv + (np.exp(lv) + (m - mu) ** 2) / np.exp(lvp) - 1.0, axis=-1)


def mc_kl(prior, params, mean, logvar, key, n=20000, encode=None):
  """Mean and s.e. over n draws of the one-sample KL estimate of `priors.gaussian_kl_term`."""
  w = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, (n,) + mean.shape[1:])
  m, lv = jnp.broadcast_to(mean, w.shape), jnp.broadcast_to(logvar, w.shape)
  est = np.asarray(priors.gaussian_kl_term(prior, params, m, lv, w, key, encode), np.float64)
  return est.mean(), est.std(ddof=1) / math.sqrt(n)


# -- priors --------------------------------------------------------------------------
def test_mixture_kl_by_monte_carlo_equals_closed_form_for_one_standard_component():
  d = 3
  prior = priors.GaussianMixture(d, components=1)
  params = {"logits": jnp.zeros((1,)), "means": jnp.zeros((1, d)), "logvars": jnp.zeros((1, d))}
  mean, logvar = jnp.array([[0.5, -1.0, 2.0]]), jnp.array([[-0.3, 0.4, -1.5]])
  est, se = mc_kl(prior, params, mean, logvar, jax.random.key(0))
  exact = float(gaussian_kl_np(np.asarray(mean), np.asarray(logvar), 0.0, 0.0)[0])
  assert abs(est - exact) < 4 * se, (est, exact, se)
  assert se < 0.02  # the estimate is informative
  # A different (non-standard) component: the same check against the Gaussian KL.
  params = {"logits": jnp.zeros((1,)), "means": jnp.array([[1.0, 0.0, -0.5]]),
            "logvars": jnp.array([[0.5, -0.5, 0.2]])}
  est, se = mc_kl(prior, params, mean, logvar, jax.random.key(1))
  exact = float(gaussian_kl_np(np.asarray(mean), np.asarray(logvar), np.asarray(params["means"]),
                               np.asarray(params["logvars"]))[0])
  assert abs(est - exact) < 4 * se, (est, exact, se)


def test_vamp_prior_kl_by_monte_carlo_equals_closed_form_for_one_pseudo_input():
  d, shape = 2, (4, 4, 1)
  prior = priors.VampPrior(d, components=1, image_shape=shape)

  def encode(u):  # a fixed toy encoder: moments from the image mean
    s = jnp.mean(u, axis=(1, 2, 3))[:, None]
    return jnp.concatenate([s, 1.0 - s], -1), jnp.concatenate([0.3 * s, -0.2 + 0 * s], -1)
  params = priors.init_prior(prior, jax.random.key(0), encode)
  mu_u, lv_u = (np.asarray(a, np.float64) for a in encode(params["pseudo_inputs"]))
  mean, logvar = jnp.array([[0.2, 0.1]]), jnp.array([[-0.5, 0.3]])
  est, se = mc_kl(prior, params, mean, logvar, jax.random.key(2), encode=encode)
  exact = float(gaussian_kl_np(np.asarray(mean), np.asarray(logvar), mu_u, lv_u)[0])
  assert abs(est - exact) < 4 * se, (est, exact, se)


def test_standard_prior_kl_is_the_closed_form():
  mean, logvar = jnp.array([[0.5, -1.0]]), jnp.array([[-0.3, 0.4]])
  got = priors.gaussian_kl_term(priors.StandardNormal(2), {}, mean, logvar, mean, None)
  np.testing.assert_allclose(got, losses.gaussian_kl(mean, logvar), rtol=1e-6)


def test_flow_log_density_is_the_change_of_variables_with_jacfwd():
  d = 5
  flow = priors.CouplingFlow(d, layers=4, hidden=16)
  params = perturb(priors.init_prior(flow, jax.random.key(0)), jax.random.key(1))
  w = jax.random.normal(jax.random.key(2), (3, d)) * 1.5
  got = flow.apply({"params": params}, w, method=flow.log_prob)
  f = lambda v: flow.apply({"params": params}, v[None], method=flow.forward)[0][0]
  for i in range(3):
    jac = jax.jacfwd(f)(w[i])
    y = f(w[i])
    want = (-0.5 * float(jnp.sum(y ** 2)) - 0.5 * d * math.log(2 * math.pi)
            + float(jnp.linalg.slogdet(jac)[1]))
    assert float(got[i]) == pytest.approx(want, abs=1e-4)
  # sample() inverts forward(): f(sample) is the base draw.
  y = jax.random.normal(jax.random.key(3), (4, d))
  w_s = flow.apply({"params": params}, jax.random.key(3), 4, method=flow.sample)
  y_back = flow.apply({"params": params}, w_s, method=flow.forward)[0]
  np.testing.assert_allclose(y_back, y, atol=1e-4)


def test_latent_diffusion_bound_on_a_2d_gaussian_is_not_below_its_entropy():
  """-E log p(w) >= H(w) for any density p; the diffusion prior's bound is above both."""
  cov = np.array([[1.0, 0.6], [0.6, 0.5]])
  chol = np.linalg.cholesky(cov)
  entropy = 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * cov))
  prior = priors.LatentDiffusion(2, hidden=64)
  params = priors.init_prior(prior, jax.random.key(0))
  draw = lambda k, n: jax.random.normal(k, (n, 2)) @ jnp.asarray(chol.T, jnp.float32)
  loss = lambda p, k: -jnp.mean(prior.apply({"params": p}, draw(k, 256), rng=jax.random.fold_in(
      k, 1), method=prior.log_prob))
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, s, k):
    g = jax.grad(loss)(p, k)
    u, s = tx.update(g, s)
    return optax.apply_updates(p, u), s
  state = tx.init(params)
  for i in range(400):
    params, state = step(params, state, jax.random.key(100 + i))
  n = 20000
  w = draw(jax.random.key(7), n)
  bound = -np.asarray(prior.apply({"params": params}, w, rng=jax.random.key(8),
                                  method=prior.log_prob), np.float64)
  se = bound.std(ddof=1) / math.sqrt(n)
  assert bound.mean() >= entropy - 3 * se, (bound.mean(), entropy, se)
  assert bound.mean() < entropy + 1.0  # trained: a useful bound, not a vacuous one
  samples = prior.apply({"params": params}, jax.random.key(9), 2000, method=prior.sample)
  assert np.allclose(np.cov(np.asarray(samples).T), cov, atol=0.25)


# -- categorical latent --------------------------------------------------------------
@pytest.mark.slow  # compile-heavy: the full suite (CI) runs it
@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_categorical_kl_is_exact_and_the_code_discrete(prior):
  c = tiny(latent="categorical", latent_dim=3, latent_categories=4, prior=prior)
  validate(c)
  model = build_model(c.model)
  params = perturb(model.init(jax.random.key(0), (8, 8, 1)), jax.random.key(1), 0.05)
  x = jax.random.randint(jax.random.key(2), (5, 8, 8, 1), 0, 256)
  terms = model.elbo_terms(params, x, jax.random.key(3))
  probs, logq = (np.asarray(a, np.float64).reshape(5, 3, 4) for a in model.encode(params, x))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  logp = (np.full((3, 4), -math.log(4)) if prior == "standard" else
          np.asarray(jax.nn.log_softmax(params["prior"]["logits"], -1), np.float64))
  want = np.sum(probs * (logq - logp[None]), axis=(1, 2))
  np.testing.assert_allclose(terms.kl, want, rtol=1e-4, atol=1e-6)
  w = np.asarray(terms.w).reshape(5, 3, 4)
  assert set(np.unique(w)) <= {0.0, 1.0} and np.all(w.sum(-1) == 1)
  # Training's straight-through code has the same forward value (the discrete code).
  tr = model.elbo_terms(params, x, jax.random.key(3), train=True)
  np.testing.assert_allclose(tr.w, terms.w, atol=1e-6)
  np.testing.assert_allclose(tr.kl, terms.kl, rtol=1e-6)


# -- per-pixel schedule -----------------------------------------------------------------
def test_per_pixel_gamma_is_monotone_with_fixed_endpoints_and_starts_scalar():
  sched = PerPixel((4, 4, 1), gamma_min=-13.3, gamma_max=5.0)
  w = jax.random.normal(jax.random.key(0), (3, 6))
  params = sched.init(jax.random.key(1), jnp.zeros((3,)), w)["params"]
  ts = jnp.linspace(0.0, 1.0, 41)
  at = lambda p, t: sched.apply({"params": p}, jnp.full((3,), t), w)
  for t in ts:  # at initialisation: the w-independent scalar linear schedule
    np.testing.assert_allclose(at(params, t), FixedLinear().apply({}, t) * jnp.ones((3, 4, 4, 1)),
                               rtol=1e-5, atol=1e-5)
  params = perturb(params, jax.random.key(2), 1.0)
  g = np.stack([np.asarray(at(params, t)) for t in ts])  # [T, B, H, W, C]
  assert np.all(np.diff(g, axis=0) >= -1e-5)
  assert np.ptp(g[20], axis=(1, 2, 3)).max() > 0.1  # the perturbed schedule varies per pixel
  np.testing.assert_allclose(g[0], -13.3, atol=1e-4)
  np.testing.assert_allclose(g[-1], 5.0, atol=1e-4)
  # d gamma / dt from the jvp is the finite difference, per pixel.
  t = jnp.full((3,), 0.4)
  _, dg = gamma_and_derivative(lambda s: sched.apply({"params": params}, s, w), t)
  fd = (at(params, 0.4 + 1e-3) - at(params, 0.4 - 1e-3)) / 2e-3
  np.testing.assert_allclose(dg, fd, rtol=2e-2, atol=1e-2)


def test_per_pixel_losses_with_a_constant_schedule_equal_the_scalar_ones():
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.randint(k[0], (2, 4, 4, 1), 0, 256)
  f = losses.data_to_model_scale(x)
  eps, eps_hat = jax.random.normal(k[1], f.shape), jax.random.normal(k[2], f.shape)
  g = jnp.array([-3.0, 1.5])
  full = lambda v: jnp.broadcast_to(v[:, None, None, None], f.shape)
  np.testing.assert_allclose(losses.diffusion_loss(eps, eps_hat, full(g)),
                             losses.diffusion_loss(eps, eps_hat, g), rtol=1e-6)
  np.testing.assert_allclose(losses.prior_loss(f, full(g)), losses.prior_loss(f, g), rtol=1e-6)
  z = f + 0.01 * eps
  g0 = jnp.array([-13.3, -10.0])
  np.testing.assert_allclose(losses.reconstruction_loss(x, z, full(g0)),
                             losses.reconstruction_loss(x, z, g0), rtol=1e-6)


@pytest.mark.slow  # compile-heavy: the full suite (CI) runs it
def test_per_pixel_model_at_initialisation_equals_the_scalar_schedule_model():
  scalar = build_model(tiny(latent_dim=4).model)
  pixel = build_model(tiny(latent_dim=4, gamma_type="per_pixel").model, (8, 8, 1))
  params = pixel.init(jax.random.key(0), (8, 8, 1))
  p_scalar = dict(params, gamma={})
  x = jax.random.randint(jax.random.key(1), (4, 8, 8, 1), 0, 256)
  a = pixel.elbo_terms(params, x, jax.random.key(2))
  b = scalar.elbo_terms(p_scalar, x, jax.random.key(2))
  for k in ("recon", "prior", "diffusion", "kl", "gamma_t"):
    np.testing.assert_allclose(getattr(a, k), getattr(b, k), rtol=2e-5, atol=1e-5, err_msg=k)


# -- training mechanisms ---------------------------------------------------------------
@pytest.mark.slow  # compile-heavy: the full suite (CI) runs it
def test_kl_balancing_keeps_the_value_and_splits_the_gradient():
  c = tiny(latent_dim=4, prior="mixture", prior_components=3)
  model = build_model(c.model)
  params = perturb(model.init(jax.random.key(0), (8, 8, 1)), jax.random.key(1), 0.05)
  x = jax.random.randint(jax.random.key(2), (4, 8, 8, 1), 0, 256)
  alpha = 0.8
  kl = lambda p, a: jnp.mean(model.elbo_terms(p, x, jax.random.key(3), kl_balance=a).kl)
  np.testing.assert_allclose(kl(params, alpha), kl(params, None), rtol=1e-6)
  g_plain, g_bal = jax.grad(kl)(params, None), jax.grad(kl)(params, alpha)
  for part, scale in (("encoder", 1 - alpha), ("prior", alpha)):
    for a, b in zip(jax.tree.leaves(g_bal[part]), jax.tree.leaves(g_plain[part])):
      np.testing.assert_allclose(a, scale * b, rtol=1e-3, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g_plain["prior"])) > 1e-4
  c.collapse.kl_balance = alpha
  assert collapse.kl_balance(c) == alpha


def test_kl_balancing_is_not_beta_one_for_the_encoder():
  # Its value is the ELBO (is_bound), its encoder gradient is beta = 1 - alpha's.
  c = tiny(latent_dim=4)
  assert collapse.encoder_gradient_note(c) == ""
  c.collapse.kl_balance = 0.8
  assert collapse.is_bound(c)[0]
  assert collapse.encoder_gradient_note(c).endswith("(beta = 0.2 for the encoder)")
  c.collapse.kl_balance = 0.0  # all of the gradient on the encoder: the ELBO's
  assert collapse.encoder_gradient_note(c) == ""


def test_capped_posterior_std_commits_a_rate():
  c = tiny(latent_dim=6, posterior_std_max=0.5)
  validate(c)
  model = build_model(c.model)
  params = perturb(model.init(jax.random.key(0), (8, 8, 1)), jax.random.key(1), 1.0)
  x = jax.random.randint(jax.random.key(2), (8, 8, 8, 1), 0, 256)
  _, logvar = model.encode(params, x)
  assert float(jnp.max(logvar)) <= 2 * math.log(0.5) + 1e-6
  delta = 6 * (0.5 * (0.25 - math.log(0.25) - 1))
  assert model.committed_rate_per_dim * 6 == pytest.approx(delta)
  assert float(jnp.min(model.elbo_terms(params, x, jax.random.key(3)).kl)) >= delta - 1e-4


@pytest.mark.parametrize("updates,match", [
    ({"latent_dim": 1}, "latent_dim"),
    ({"prior": "vampire"}, "model.prior"),
    ({"latent": "categorical", "latent_dim": 2}, "latent_categories"),
    ({"posterior_std_max": 0.5, "prior": "flow"}, "posterior_std_max"),
    ({"encoder": "none", "prior": "flow"}, "no latent"),
])
def test_bad_latent_configs_name_the_key(updates, match):
  with pytest.raises(ConfigError, match=match):
    validate(tiny(**updates))


# -- the bound on data with a known entropy ------------------------------------------------
UNIFORM_MECHANISMS = {
    "standard": {"latent_dim": 4},
    "mixture": {"prior": "mixture", "latent_dim": 4, "prior_components": 4},
    "vamp": {"prior": "vamp", "latent_dim": 4, "prior_components": 4},
    "flow": {"prior": "flow", "latent_dim": 4, "prior_hidden": 16},
    "diffusion": {"prior": "diffusion", "latent_dim": 4, "prior_hidden": 32},
    "categorical": {"latent": "categorical", "latent_dim": 2, "latent_categories": 4,
                    "prior": "learned"},
    "per_pixel": {"gamma_type": "per_pixel_learned_endpoints", "latent_dim": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(UNIFORM_MECHANISMS))
def test_eval_bpd_on_iid_uniform_pixels_is_not_below_8_bits(name):
  """No model beats the entropy of iid uniform 8-bit pixels (8 bits/dim): a reported value
  more than 3 s.e. below it would mean the reported number is not a bound."""
  from vdmrep import parallel
  from vdmrep.evaluators import elbo as elbo_eval
  c = tiny(**UNIFORM_MECHANISMS[name])
  validate(c)
  model = build_model(c.model, (8, 8, 1))
  rng = np.random.default_rng(0)
  train_x = rng.integers(0, 256, (256, 8, 8, 1)).astype(np.uint8)
  params = model.init(jax.random.key(0), (8, 8, 1))
  tx = optax.adam(2e-3)

  @jax.jit
  def step(p, s, x, k):
    loss = lambda p: jnp.mean(model.elbo_terms(p, x, k, train=True).total)
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s)
    return optax.apply_updates(p, u), s
  state = tx.init(params)
  for i in range(60):
    x = train_x[(i * 32) % 256:(i * 32) % 256 + 32]
    params, state = step(params, state, x, jax.random.key(i))
  eval_x = rng.integers(0, 256, (256, 8, 8, 1)).astype(np.uint8)
  s = elbo_eval.evaluate_elbo(model, params, eval_x, seed=1, num_samples=2, batch_size=128,
                             mesh=parallel.make_mesh())
  assert s["bpd"] >= 8.0 - 3 * s["bpd_se"], s
  assert s["bpd"] < 16.0, s  # a finite, sane figure


def test_staged_training_stages_kl_weight_and_frozen_encoder():
  c = tiny(latent_dim=4)
  c.training.num_steps = 100
  c.collapse.update(stage_surrogate_steps=20, stage_frozen_steps=30)
  validate(c)
  steps = np.arange(100)
  np.testing.assert_array_equal(collapse.stage(steps, c), np.r_[[0] * 20, [1] * 30, [2] * 50])
  np.testing.assert_array_equal(collapse.kl_weight(steps, c), np.r_[[0.0] * 20, [1.0] * 80])
  updates = {"encoder": {"k": jnp.ones(3)}, "score": {"k": jnp.ones(2)}}
  for step, enc in ((5, 1.0), (25, 0.0), (60, 1.0)):
    got = collapse.freeze_encoder(updates, jnp.int32(step), c)
    np.testing.assert_array_equal(got["encoder"]["k"], enc)
    np.testing.assert_array_equal(got["score"]["k"], 1.0)
  assert collapse.is_bound(c)[0] is False  # trained on a surrogate for part of the run
  c.collapse.stage_frozen_steps = 80
  with pytest.raises(ConfigError, match="stage_frozen_steps"):
    validate(c)


def test_batch_mutual_information_matches_the_eval_estimator():
  from vdmrep import diagnostics
  r = np.random.default_rng(0)
  mean, logvar = r.normal(size=(16, 3)), r.normal(scale=0.3, size=(16, 3)) - 1.0
  w = mean + np.exp(0.5 * logvar) * r.normal(size=(16, 3))
  got = diagnostics.batch_mutual_information(*(jnp.asarray(a, jnp.float32)
                                               for a in (mean, logvar, w)))
  want = diagnostics.mutual_information(mean, logvar, w[None])["mi_nats"]
  assert float(got) == pytest.approx(want, rel=1e-4)
  assert want > 1.0  # separated posteriors: an informative check


@pytest.mark.parametrize("data", ["digits", "fashion_mnist"])
def test_every_mechanism_config_validates(data):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "latents.py")
  spec = importlib.util.spec_from_file_location("latents_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for name in mod.MECHANISMS:
    c = mod.get_config(f"data={data},mechanism={name}")
    validate(c)
    assert collapse.is_bound(c)[0] == (name not in ("staged",)), name
  with pytest.raises(ValueError, match="mechanism"):
    mod.get_config("mechanism=nope")


def test_categorical_aggregate_posterior_in_chunks_matches_the_direct_sum():
  """log q(c) = log mean_j prod_m q_j(c_m), scored a few draws at a time (the full
  N x N x M array does not fit for a 10,000-image test split)."""
  from vdmrep import latent_diagnostics as ld
  rng = np.random.default_rng(0)
  n, m, k = 7, 3, 4
  logits = rng.normal(size=(n, m, k))
  logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  codes = ld.draw_codes(logq, 2, seed=1)  # [S, N, M]
  q = np.exp(logq)
  direct = np.array([[math.log(np.mean([np.prod(q[j, np.arange(m), codes[s, i]])
                                        for j in range(n)]))
                      for i in range(n)] for s in range(2)])
  for chunk in (1, 3, 128):
    np.testing.assert_allclose(ld.categorical_log_aggregate(logq, codes, chunk=chunk), direct,
                               rtol=1e-10)
  # Posteriors that each put all mass on a distinct code: I_q(x; c) is log N exactly.
  sharp = np.full((n, m, k), -1e9)
  for i in range(n):
    sharp[i, 0, i % k], sharp[i, 1, i // k], sharp[i, 2, 0] = 0.0, 0.0, 0.0
  mi = ld.categorical_mi(sharp, ld.draw_codes(sharp, 1, seed=2))
  assert mi["mi_nats"] == pytest.approx(math.log(n)) and mi["mi_upper_nats"] == math.log(n)
  given = ld.categorical_mi(logq, codes, ld.categorical_log_aggregate(logq, codes))
  assert given == ld.categorical_mi(logq, codes)
