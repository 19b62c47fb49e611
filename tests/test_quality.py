"""Sample-quality statistics: Frechet distance, Inception-style score, feature classifier."""
import jax
import numpy as np
import pytest
import scipy.linalg

from vdmrep import classifier as classifier_lib
from vdmrep import config_lib, data, quality


def _random_cov(rng, d, n=None):
  a = rng.normal(size=(n or 2 * d, d))
  return a.T @ a / len(a)


def _fd_scipy(mu1, s1, mu2, s2):
  """The usual FID formula with scipy's general matrix square root of S1 S2."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_sqrtm_and_frechet_distance_match_scipy_and_closed_form():
  rng = np.random.default_rng(0)
  s1, s2 = _random_cov(rng, 12), _random_cov(rng, 12)
  mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
  np.testing.assert_allclose(quality.sqrtm_psd(s1), scipy.linalg.sqrtm(s1).real, atol=1e-10)
  np.testing.assert_allclose(quality.frechet_distance(mu1, s1, mu2, s2),
                             _fd_scipy(mu1, s1, mu2, s2), rtol=1e-9)
  # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
  a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
  expect = np.sum((mu1[:5] - mu2[:5]) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(quality.frechet_distance(mu1[:5], np.diag(a), mu2[:5], np.diag(b)),
                             expect, rtol=1e-10)
  # a rank-deficient covariance (fewer samples than dimensions) stays real and finite
  f = rng.normal(size=(8, 20))
  g = rng.normal(size=(300, 20)) + 0.5
  np.testing.assert_allclose(quality.fd_from_features(f, g),
                             _fd_scipy(*quality.gaussian_stats(f), *quality.gaussian_stats(g)),
                             rtol=1e-5)


def test_frechet_distance_of_a_set_with_itself_is_zero():
  f = np.random.default_rng(1).normal(size=(500, 16)) * np.arange(1, 17)
  assert abs(quality.fd_from_features(f, f)) < 1e-8
  assert quality.fd_from_features(f, f + 1.0) == pytest.approx(16.0, rel=1e-8)


def test_inception_score_limits():
  k = 7
  confident = np.eye(k)[np.arange(700) % k] * 50.0  # every class equally often, certain
  assert quality.inception_score(confident)[0] == pytest.approx(k, rel=1e-6)
  one_class = np.tile(np.eye(k)[2] * 50.0, (700, 1))  # always the same class
  assert quality.inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
  uniform = np.zeros((700, k))  # p(y|x) = p(y): no information
  assert quality.inception_score(uniform) == pytest.approx((1.0, 0.0), abs=1e-9)


def _digits_ds():
  c = config_lib.base_config()
  return data.load(c.data)


@pytest.mark.slow
def test_classifier_learns_digits_and_is_cached(tmp_path):
  ds = _digits_ds()
  kw = dict(workdir=str(tmp_path), steps=60, batch_size=64, lr=1e-2, features=32,
            log=lambda *_: None)
  clf = classifier_lib.get_classifier(ds, jax.random.key(0), **kw)
  assert not clf.meta["cached"]
  assert clf.meta["test_accuracy"] > 0.9  # chance is 0.1
  acc = np.mean(clf.predict(ds.eval_images) == ds.eval_labels)
  assert acc == pytest.approx(clf.meta["test_accuracy"])
  again = classifier_lib.get_classifier(ds, jax.random.key(0), **kw)
  assert again.meta["cached"]
  np.testing.assert_array_equal(again.apply(ds.eval_images[:50])[1],
                                clf.apply(ds.eval_images[:50])[1])
  other = classifier_lib.get_classifier(ds, jax.random.key(1), **dict(kw, steps=5))
  assert not other.meta["cached"]  # other settings: trained anew, not loaded
