"""Collapse remedies: schedules against their published formulas, free-bits gradients,
MMD, the objective's composition, the bound flag and validation (the config variants:
tests/test_configs.py)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep import collapse, config_lib, losses
from vdmrep.config_lib import ConfigError, base_config
from vdmrep.models.vae_vdm import ELBOTerms

# -- schedules ------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 1, 100, 250, 499, 500, 501, 2000])
def test_linear_warmup_formula(step):
  start, end, s_max = 0.2, 3.0, 500
  expected = start + (end - start) * min(1.0, step / s_max)
  np.testing.assert_allclose(collapse.linear_warmup(step, start, end, s_max), expected, rtol=1e-6)


def _fu_linear_cycles(n_iter, n_cycle, ratio, stop):
  """Fu et al.'s cyclical schedule written as a loop: per cycle, rise by a fixed step
  from 0 until `stop` is reached, then hold `stop` for the rest of the cycle."""
  out = np.full(n_iter, stop, np.float64)
  period = n_iter / n_cycle
  inc = stop / (period * ratio)
  for c in range(n_cycle):
    v, i = 0.0, 0
    while v <= stop and int(i + c * period) < n_iter:
      out[int(i + c * period)] = v
      v += inc
      i += 1
  return out


def test_cyclical_matches_loop_form():
  t, m, r, bmax = 1000, 4, 0.5, 2.0
  got = np.asarray(collapse.cyclical(np.arange(t), t, m, r, bmax))
  np.testing.assert_allclose(got, _fu_linear_cycles(t, m, r, bmax), atol=1e-4)


@pytest.mark.parametrize("step", [0, 1, 111, 222, 333, 334, 400, 667, 668, 999])
def test_cyclical_paper_formula_uneven_period(step):
  # tau = mod(t - 1, ceil(T / M)) / (T / M) with the paper's t = step + 1; f(tau) = tau / R.
  t_total, m, r, bmax = 1000, 3, 0.4, 1.0
  tau = ((step + 1 - 1) % math.ceil(t_total / m)) / (t_total / m)
  expected = bmax * (tau / r if tau <= r else 1.0)
  np.testing.assert_allclose(collapse.cyclical(step, t_total, m, r, bmax), expected, atol=1e-6)


@pytest.mark.parametrize("step", [0, 10, 999, 1000, 5000])
def test_capacity_formula(step):
  c_max, ramp, gamma = 25.0, 1000, 7.0
  expected_c = c_max * min(1.0, step / ramp)
  np.testing.assert_allclose(collapse.capacity(step, c_max, ramp), expected_c, rtol=1e-6)
  kl = jnp.array([3.0, 9.0, 30.0])
  np.testing.assert_allclose(collapse.capacity_penalty(kl, expected_c, gamma),
                             gamma * abs(14.0 - expected_c), rtol=1e-6)


def test_kl_weight_dispatches_on_schedule():
  c = base_config()
  c.training.num_steps = 800
  c.collapse.beta = 4.0
  assert float(collapse.kl_weight(jnp.int32(123), c)) == 4.0
  c.collapse.schedule, c.collapse.warmup_start, c.collapse.warmup_steps = "linear", 1.0, 100
  np.testing.assert_allclose(collapse.kl_weight(jnp.int32(25), c), 1.0 + 3.0 * 0.25)
  c.collapse.schedule, c.collapse.cycles, c.collapse.cycle_ratio = "cyclical", 2, 0.5
  np.testing.assert_allclose(collapse.kl_weight(jnp.int32(500), c), 4.0 * (100 / 400) / 0.5)


# -- free bits ------------------------------------------------------------------------
def _toy_kl(params):
  return losses.gaussian_kl_per_dim(params["mean"], params["logvar"])


def test_free_bits_batch_gradient_zero_below_floor():
  lam, b = 0.5, 4
  rng = np.random.default_rng(0)
  # dims 0-2: small means (batch-mean KL ~0.005 < lam); dims 3-5: KL ~2 > lam.
  mean = np.concatenate([rng.uniform(-0.1, 0.1, (b, 3)), rng.uniform(1.8, 2.2, (b, 3))], 1)
  # The floor acts on the batch mean, not on each example: one example of dim 2 is above
  # the floor (its dim still gets no gradient), one of dim 5 below it (it still gets one).
  mean[0, 2], mean[3, 5] = 1.2, 0.05
  logvar = rng.uniform(-0.3, 0.3, (b, 6))
  params = {"mean": jnp.asarray(mean, jnp.float32), "logvar": jnp.asarray(logvar, jnp.float32)}
  kl_bar = np.mean(0.5 * (mean ** 2 + np.exp(logvar) - logvar - 1), axis=0)
  assert np.all(kl_bar[:3] < lam) and np.all(kl_bar[3:] > lam)

  value = collapse.free_bits_batch(_toy_kl(params), lam)
  np.testing.assert_allclose(value, np.sum(np.maximum(lam, kl_bar)), rtol=1e-5)
  g = jax.grad(lambda p: collapse.free_bits_batch(_toy_kl(p), lam))(params)
  # Below the floor: exactly zero. Above: d/dmu (1/B) sum_b KL = mu / B, etc.
  assert np.all(np.asarray(g["mean"][:, :3]) == 0.0)
  assert np.all(np.asarray(g["logvar"][:, :3]) == 0.0)
  np.testing.assert_allclose(g["mean"][:, 3:], mean[:, 3:] / b, rtol=1e-5)
  np.testing.assert_allclose(g["logvar"][:, 3:], 0.5 * (np.exp(logvar[:, 3:]) - 1) / b,
                             rtol=1e-4, atol=1e-7)


def test_free_bits_example_gradient_per_entry():
  lam, b = 0.5, 4
  mean = np.array([[0.1, 2.0], [2.0, 0.1], [0.2, 1.5], [1.5, 0.05]])
  params = {"mean": jnp.asarray(mean, jnp.float32), "logvar": jnp.zeros((b, 2), jnp.float32)}
  kl = 0.5 * mean ** 2
  np.testing.assert_allclose(collapse.free_bits_example(_toy_kl(params), lam),
                             np.mean(np.sum(np.maximum(lam, kl), -1)), rtol=1e-5)
  g = jax.grad(lambda p: collapse.free_bits_example(_toy_kl(p), lam))(params)["mean"]
  expected = np.where(kl > lam, mean / b, 0.0)
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=0)


# -- MMD --------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_mmd_zero_for_prior_positive_for_shift(kernel):
  d, n = 16, 256
  nulls = [float(collapse.mmd_to_prior(jax.random.normal(jax.random.key(s), (n, d)),
                                       jax.random.key(100 + s), kernel)) for s in range(3)]
  shifted = float(collapse.mmd_to_prior(1.0 + jax.random.normal(jax.random.key(7), (n, d)),
                                        jax.random.key(8), kernel))
  assert max(abs(v) for v in nulls) < 0.005, nulls
  assert shifted > 20 * max(abs(v) for v in nulls) and shifted > 0.05, (shifted, nulls)


def test_sigmoid_weighting_formula():
  g = jnp.array([-13.3, -2.0, 0.0, 5.0])
  got = collapse.diffusion_weight(g, "sigmoid", 1.5)
  np.testing.assert_allclose(got, [1 / (1 + math.exp(-(x + 1.5))) for x in g.tolist()],
                             rtol=1e-6)
  assert np.all(np.diff(np.asarray(got)) > 0)  # more weight at higher noise
  np.testing.assert_array_equal(collapse.diffusion_weight(g, "elbo"), np.ones(4))


# -- the objective -----------------------------------------------------------------------
def _fake_terms(seed=0, b=8, d=5):
  r = np.random.default_rng(seed)
  mean, logvar = r.normal(size=(b, d)), r.normal(scale=0.3, size=(b, d))
  kpd = 0.5 * (mean ** 2 + np.exp(logvar) - logvar - 1)
  t = {"recon": r.uniform(1, 2, b), "prior": r.uniform(0, 0.1, b),
       "diffusion": r.uniform(10, 20, b), "gamma_t": r.uniform(-13, 5, b),
       "kl_per_dim": kpd, "kl": kpd.sum(-1), "w": mean + np.exp(logvar / 2) * r.normal(size=(b, d))}
  return ELBOTerms(**{k: jnp.asarray(v, jnp.float32) for k, v in t.items()},
                   t=jnp.zeros((b,), jnp.float32), gamma_0=jnp.full((b,), -13.3, jnp.float32),
                   gamma_1=jnp.full((b,), 5.0, jnp.float32))


def test_objective_elbo_default():
  terms, c = _fake_terms(), base_config()
  loss, logs = collapse.objective(terms, jnp.int32(3), c, jax.random.key(0))
  expected = np.mean(terms.total)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(logs["beta"]) == 1.0 and float(logs["mmd_term_nats"]) == 0.0
  np.testing.assert_allclose(logs["kl_unweighted_nats"], np.mean(terms.kl), rtol=1e-6)


def test_objective_combined_remedies():
  terms, c = _fake_terms(1), base_config()
  c.training.num_steps = 1000
  c.collapse.update(schedule="cyclical", beta=2.0, cycles=4, cycle_ratio=0.5, free_bits=0.3,
                    mmd_alpha=0.5, mmd_lambda=10.0, mmd_kernel="imq",
                    diffusion_weighting="sigmoid", diffusion_weight_bias=-1.0)
  step, key = 300, jax.random.key(3)
  loss, logs = collapse.objective(terms, jnp.int32(step), c, key)
  n = {k: np.asarray(v, np.float64) for k, v in vars(terms).items()}
  beta = 2.0 * min(1.0, ((step % 250) / 250) / 0.5)
  wt = 1 / (1 + np.exp(-(n["gamma_t"] - 1.0)))
  fb = np.sum(np.maximum(0.3, n["kl_per_dim"].mean(0)))
  prior = jax.random.normal(key, terms.w.shape)
  mmd = float(losses.mmd(terms.w, prior, "imq"))
  expected = np.mean(n["recon"] + n["prior"] + wt * n["diffusion"]) + beta * 0.5 * fb \
      + (0.5 + 10.0 - 1.0) * mmd
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(logs["beta"], beta, rtol=1e-6)
  np.testing.assert_allclose(logs["kl_weight"], beta * 0.5, rtol=1e-6)
  np.testing.assert_allclose(logs["kl_unweighted_nats"], n["kl"].mean(), rtol=1e-6)


def test_objective_capacity_logs_c():
  terms, c = _fake_terms(2), base_config()
  c.collapse.update(capacity_gamma=50.0, capacity_max=10.0, capacity_steps=100)
  loss, logs = collapse.objective(terms, jnp.int32(40), c, jax.random.key(0))
  n = {k: np.asarray(v, np.float64) for k, v in vars(terms).items()}
  np.testing.assert_allclose(logs["capacity"], 4.0, rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(n["recon"] + n["prior"] + n["diffusion"])
                             + 50.0 * abs(n["kl"].mean() - 4.0), rtol=1e-5)


@pytest.mark.parametrize("encoder", ["ue", "none"])
def test_objective_no_latent_penalty(encoder):
  terms, c = _fake_terms(3), base_config()
  c.model.encoder = encoder
  loss, logs = collapse.objective(terms, jnp.int32(0), c, jax.random.key(0))
  np.testing.assert_allclose(loss, np.mean(terms.recon + terms.prior + terms.diffusion),
                             rtol=1e-6)
  assert float(logs["kl_term_nats"]) == 0.0 and float(logs["beta"]) == 0.0


# -- bound flag and validation -------------------------------------------------------------
@pytest.mark.parametrize("updates,bound", [
    ({}, True),
    ({"beta": 1e4}, False),
    ({"schedule": "linear", "warmup_start": 1.0}, True),   # beta = 1 at every step
    ({"schedule": "linear"}, False),
    ({"schedule": "cyclical", "beta": 2.0, "cycle_ratio": 1.0}, False),  # mean ~1, still not
    ({"free_bits": 0.1}, False),
    ({"capacity_gamma": 10.0}, False),
    ({"mmd_lambda": 2.0}, False),
    ({"diffusion_weighting": "sigmoid"}, False),
])
def test_is_bound(updates, bound):
  c = base_config()
  c.training.num_steps = 1000
  c.collapse.update(updates)
  ok, why = collapse.is_bound(c)
  assert ok == bound and (why == "") == bound, why


@pytest.mark.parametrize("updates,key", [
    ({"schedule": "cosine"}, "schedule"),
    ({"beta": -1.0}, "beta"),
    ({"schedule": "linear", "warmup_steps": 0}, "warmup_steps"),
    ({"schedule": "cyclical", "cycles": 5000}, "cycles"),
    ({"cycle_ratio": 0.0}, "cycle_ratio"),
    ({"free_bits_mode": "dim"}, "free_bits_mode"),
    ({"free_bits": 0.1, "capacity_gamma": 1.0}, "free_bits"),
    ({"capacity_gamma": 1.0, "capacity_steps": 0}, "capacity_steps"),
    ({"mmd_alpha": 1.5}, "mmd_alpha"),
    ({"mmd_alpha": -2.0, "mmd_lambda": 1.0}, "mmd_lambda"),
    ({"mmd_kernel": "laplace"}, "mmd_kernel"),
    ({"deterministic_encoder": True}, "deterministic_encoder"),
    ({"diffusion_weighting": "p2"}, "diffusion_weighting"),
    ({"beta": float("nan")}, "beta"),
])
def test_validate_names_the_key(updates, key):
  c = base_config()
  c.collapse.update(updates)
  with pytest.raises(ConfigError, match=rf"config\.collapse\.{key}="):
    config_lib.validate(c)


def test_validate_rejects_remedy_without_latent():
  c = base_config()
  c.model.encoder = "none"
  c.collapse.free_bits = 0.2
  with pytest.raises(ConfigError, match=r"config\.collapse\.free_bits=.*encoder='none'"):
    config_lib.validate(c)


@pytest.mark.slow
def test_elbo_terms_deterministic_encoder_and_gamma_t():
  from vdmrep.models import build_model
  c = base_config()
  c.model.update(vdm="mvdm", encoder="te", n_blocks=1, channels=8)
  model = build_model(c.model)
  params = model.init(jax.random.key(0), (8, 8, 1))
  x = jax.random.randint(jax.random.key(1), (4, 8, 8, 1), 0, 256)
  det = model.elbo_terms(params, x, jax.random.key(2), deterministic_encoder=True)
  sto = model.elbo_terms(params, x, jax.random.key(2))
  np.testing.assert_array_equal(det.w, det.mean)
  assert float(jnp.max(jnp.abs(sto.w - sto.mean))) > 1e-3
  np.testing.assert_allclose(det.gamma_t, model.gamma(params, det.t), rtol=1e-6)
  np.testing.assert_array_equal(det.t, sto.t)  # same key, same t


def test_objective_mmd_needs_rng():
  terms, c = _fake_terms(4), base_config()
  c.collapse.mmd_lambda = 5.0
  with pytest.raises(ValueError, match="needs an rng"):
    collapse.objective(terms, jnp.int32(0), c)
  loss_a, _ = collapse.objective(terms, jnp.int32(0), c, jax.random.key(1))
  loss_b, _ = collapse.objective(terms, jnp.int32(0), c, jax.random.key(1))
  assert float(loss_a) == float(loss_b)  # same key, same prior samples
