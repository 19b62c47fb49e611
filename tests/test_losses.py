"""The public loss API against independent float64 numpy computations of the formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from vdmrep import losses

RTOL = 1e-5


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_data_to_model_scale_bin_centres():
  x = np.arange(256)
  expect = 2.0 * ((x + 0.5) / 256.0) - 1.0
  np.testing.assert_allclose(losses.data_to_model_scale(x), expect, rtol=RTOL, atol=1e-7)
  # 17 levels: centres still inside (-1, 1) and equally spaced by 2 / vocab.
  c = np.asarray(losses.data_to_model_scale(np.arange(17), 17))
  np.testing.assert_allclose(np.diff(c), 2.0 / 17, rtol=1e-5)


def test_gaussian_kl_closed_form_and_monte_carlo():
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)) * 0.5
  var = np.exp(logvar)
  per_dim = 0.5 * (mean ** 2 + var - np.log(var) - 1.0)
  np.testing.assert_allclose(losses.gaussian_kl_per_dim(mean, logvar), per_dim, rtol=RTOL)
  np.testing.assert_allclose(losses.gaussian_kl(mean, logvar), per_dim.sum(-1), rtol=RTOL)
  # Monte Carlo E_q[log q - log p] agrees with the closed form.
  w = mean[0] + np.sqrt(var[0]) * rng.normal(size=(200_000, 5))
  log_q = -0.5 * (((w - mean[0]) ** 2) / var[0] + logvar[0] + math.log(2 * math.pi))
  log_p = -0.5 * (w ** 2 + math.log(2 * math.pi))
  assert abs((log_q - log_p).sum(-1).mean() - per_dim[0].sum()) < 0.02


@pytest.mark.parametrize("gamma_1", [5.0, np.array([5.0, 2.0])])
def test_prior_loss_is_kl_of_gaussians(gamma_1):
  f = np.random.default_rng(1).uniform(-1, 1, size=(2, 4, 4, 3))
  var1 = _sigmoid(np.broadcast_to(np.asarray(gamma_1, np.float64), (2,)))[:, None, None, None]
  mean1 = np.sqrt(1.0 - var1) * f
  # KL(N(m, v) || N(0, 1)) per pixel, summed.
  expect = (0.5 * (mean1 ** 2 + var1 - np.log(var1) - 1.0)).sum((1, 2, 3))
  np.testing.assert_allclose(losses.prior_loss(jnp.asarray(f, jnp.float32), gamma_1), expect,
                             rtol=RTOL)


def _recon_numpy(x, z, g0, vocab):
  centres = 2.0 * ((np.arange(vocab) + 0.5) / vocab) - 1.0
  b = x.shape[0]
  g0 = np.broadcast_to(np.asarray(g0, np.float64), (b,))
  out = np.zeros(b)
  for i in range(b):
    for idx in np.ndindex(x.shape[1:]):
      logits = -0.5 * ((z[i][idx] - centres) * np.exp(-0.5 * g0[i])) ** 2
      out[i] -= logits[x[i][idx]] - logsumexp(logits)
  return out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("gamma_0", [-13.3, -4.0, np.array([-6.0, -2.0])])
def test_reconstruction_loss_matches_numpy(channels, gamma_0):
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, size=(2, 3, 2, channels))
  f = 2.0 * ((x + 0.5) / 256) - 1.0
  z = f + np.exp(0.5 * np.max(gamma_0)) * rng.normal(size=x.shape)
  got = losses.reconstruction_loss(x, jnp.asarray(z, jnp.float32), gamma_0)
  expect = _recon_numpy(x, z.astype(np.float32).astype(np.float64), gamma_0, 256)
  np.testing.assert_allclose(got, expect, rtol=RTOL, atol=1e-5)


def test_reconstruction_of_exact_bin_centre_is_nearly_free():
  x = np.arange(0, 256, 17).reshape(1, -1, 1, 1)
  z = losses.data_to_model_scale(x)
  # With gamma_0 = -13.3 the bins are ~6 standard deviations apart: -log p ~ 0.
  assert float(losses.reconstruction_loss(x, z, -13.3)[0]) < 1e-6


def test_diffusion_loss_matches_numpy():
  rng = np.random.default_rng(3)
  eps, eps_hat = rng.normal(size=(4, 3, 3, 2)), rng.normal(size=(4, 3, 3, 2))
  dg = rng.uniform(1, 20, size=4)
  expect = 0.5 * dg * ((eps - eps_hat) ** 2).sum((1, 2, 3))
  np.testing.assert_allclose(losses.diffusion_loss(eps, eps_hat, dg), expect, rtol=RTOL)
  np.testing.assert_allclose(losses.diffusion_loss(eps, eps_hat, 18.3),
                             0.5 * 18.3 * ((eps - eps_hat) ** 2).sum((1, 2, 3)), rtol=RTOL)


def _mmd_numpy(z, p, kernel):
  d = z.shape[1]
  def k(a, b):
    sq = ((a - b) ** 2).sum()
    return math.exp(-sq / (2 * d)) if kernel == "rbf" else 2 * d / (2 * d + sq)
  n, m = len(z), len(p)
  kzz = sum(k(z[i], z[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  kpp = sum(k(p[i], p[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kzp = sum(k(z[i], p[j]) for i in range(n) for j in range(m)) / (n * m)
  return kzz + kpp - 2 * kzp


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_mmd_is_the_unbiased_u_statistic(kernel):
  rng = np.random.default_rng(4)
  z, p = rng.normal(size=(7, 3)) + 0.5, rng.normal(size=(6, 3))
  np.testing.assert_allclose(losses.mmd(z, p, kernel=kernel), _mmd_numpy(z, p, kernel),
                             rtol=1e-5, atol=1e-7)


def test_mmd_separates_shifted_gaussian():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  a, b = jax.random.normal(k1, (256, 8)), jax.random.normal(k2, (256, 8))
  shifted = jax.random.normal(k3, (256, 8)) + 1.0
  same, diff = float(losses.mmd(a, b)), float(losses.mmd(shifted, b))
  assert abs(same) < 0.01 and diff > 0.1
  with pytest.raises(ValueError, match="unknown kernel"):
    losses.mmd(a, b, kernel="cosine")


def test_to_bpd():
  np.testing.assert_allclose(losses.to_bpd(np.array([64 * math.log(2.0) * 3.0]), 64), [3.0],
                             rtol=RTOL)
