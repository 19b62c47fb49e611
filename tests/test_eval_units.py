"""Unit tests of the evaluation pieces against independent computations (no training)."""
import math

import numpy as np
import pytest
from scipy.special import logsumexp

from vdmrep import config_lib, data, diagnostics, plots, probes, report
from vdmrep.evaluators import elbo as elbo_eval
from vdmrep.evaluators import ood as ood_eval


def _brute_mi(mean, logvar, w):
  """I_q(x; w) by the [N, N, D] broadcast, scipy logsumexp (the textbook form)."""
  s, n, _ = w.shape
  out = []
  for k in range(s):
    diff = w[k][:, None, :] - mean[None, :, :]
    logq = -0.5 * np.sum(np.log(2 * np.pi) + logvar[None] + diff ** 2 / np.exp(logvar[None]),
                         axis=-1)
    out.append(np.diag(logq) - (logsumexp(logq, axis=1) - np.log(n)))
  return float(np.mean(out))


def test_mi_matches_brute_force_and_respects_ceiling():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(50, 6)) * np.array([3, 1, 0.3, 0.1, 0, 0])
  logvar = rng.normal(size=(50, 6)) * 0.3 - 1.0
  w = diagnostics.draw_latents(mean, logvar, 3, seed=1)
  got = diagnostics.mutual_information(mean, logvar, w, chunk=7)
  assert got["mi_nats"] == pytest.approx(_brute_mi(mean, logvar, w), rel=1e-9, abs=1e-9)
  assert got["mi_upper_nats"] == pytest.approx(math.log(50))
  # far-apart posteriors: every image identifiable -> the estimator sits at its ceiling log N
  far = np.arange(50)[:, None] * 100.0 * np.ones((1, 2))
  sharp = np.full((50, 2), -4.0)
  res = diagnostics.mutual_information(far, sharp, diagnostics.draw_latents(far, sharp, 1, 2))
  assert res["mi_nats"] == pytest.approx(math.log(50), abs=1e-6)
  # identical posteriors (full collapse): q(w|x) = q(w) -> exactly 0
  same = np.zeros((50, 4))
  res = diagnostics.mutual_information(same, same, diagnostics.draw_latents(same, same, 2, 3))
  assert res["mi_nats"] == pytest.approx(0.0, abs=1e-9)


def test_kl_and_active_units_closed_form():
  rng = np.random.default_rng(1)
  mean = rng.normal(size=(40, 5)) * np.array([1.0, 0.5, 0.05, 0.0, 2.0])
  logvar = rng.normal(size=(40, 5))
  kl = diagnostics.kl_summary(mean, logvar)
  var = np.exp(logvar)
  # KL(N(m, v) || N(0, 1)) = 0.5 (m^2 + v - 1 - log v) summed over dims
  want = np.mean(np.sum(0.5 * (mean ** 2 + var - 1 - logvar), axis=1))
  assert kl["kl_nats"] == pytest.approx(want, rel=1e-12)
  assert kl["kl_nats_per_dim"] == pytest.approx(want / 5, rel=1e-12)
  au, v = diagnostics.active_units(mean, 0.01)
  assert au == int(np.sum(mean.var(axis=0) > 0.01)) == 3  # dims 0, 1, 4 (0.05^2 < 0.01)
  np.testing.assert_allclose(v, mean.var(axis=0))


def test_logistic_probe_equals_sklearn_and_knn_is_exact_on_separated_data():
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(2)
  x = rng.normal(size=(120, 4))
  y = (x[:, 0] + 0.3 * rng.normal(size=120) > 0).astype(int)
  from sklearn.preprocessing import StandardScaler
  got = probes.logistic_probe(x[:80], y[:80], x[80:], y[80:], cs=[0.5], max_iter=500)
  sc = StandardScaler().fit(x[:80])
  want = LogisticRegression(C=0.5, max_iter=500).fit(sc.transform(x[:80]), y[:80]).score(
      sc.transform(x[80:]), y[80:])
  assert got["acc"] == want and got["c"] == 0.5
  centres = np.array([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
  lab = np.repeat(np.arange(3), 20)
  pts = centres[lab] + 0.1 * rng.normal(size=(60, 2))
  assert probes.knn_probe(pts[::2], lab[::2], pts[1::2], lab[1::2], k=3)["acc"] == 1.0


def test_auroc_against_pair_counting():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=30), rng.normal(size=20) + 1.0
  pairs = np.mean((b[None, :] > a[:, None]) + 0.5 * (b[None, :] == a[:, None]))
  assert ood_eval.auroc(a, b) == pytest.approx(pairs)


def test_pca_matches_sklearn_up_to_sign():
  from sklearn.decomposition import PCA
  x = np.random.default_rng(4).normal(size=(60, 5)) * np.array([5, 2, 1, 0.5, 0.1])
  ours, theirs = plots.pca_2d(x), PCA(2).fit_transform(x)
  for j in range(2):
    assert abs(np.corrcoef(ours[:, j], theirs[:, j])[0, 1]) == pytest.approx(1.0, abs=1e-9)


def test_t_grid_is_midpoints():
  np.testing.assert_allclose(diagnostics.t_grid(4), [0.125, 0.375, 0.625, 0.875])


def test_hold_out_class_removes_it_from_training():
  ds = data.load(config_lib.base_config().data)
  held = data.hold_out_class(ds, 3)
  assert not np.any(held.train_labels == 3) and not np.any(held.eval_labels == 3)
  assert len(held.held_out_images) == int(np.sum(ds.eval_labels == 3)) > 0
  assert len(held.train_images) == int(np.sum(ds.train_labels != 3))
  with pytest.raises(data.DataError, match="ood_holdout_class=42"):
    data.hold_out_class(ds, 42)


@pytest.mark.parametrize("key,value", [("mi_samples", 0), ("usefulness_num_t", 0),
                                       ("active_threshold", 0.0), ("probe_max_train", -1),
                                       ("ood_holdout_class", -2), ("ood_source", "bogus"),
                                       ("probe_features", "encoder,latent")])
def test_bad_eval_config_names_the_key(key, value):
  c = config_lib.base_config()
  c.eval[key] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.eval.{key}"):
    config_lib.validate(c)


def test_report_json_turns_nan_into_null():
  out = report._jsonable({"a": np.float32(1.5), "b": float("nan"), "c": np.arange(2),
                          "d": np.bool_(True)})
  assert out == {"a": 1.5, "b": None, "c": [0, 1], "d": True}


def _tiny_model_and_params():
  import jax
  from vdmrep.models import build_model
  c = config_lib.base_config()
  c.model.vdm, c.model.n_blocks, c.model.channels, c.model.encoder = "mvdm", 1, 8, "te"
  model = build_model(c.model)
  params = model.init(jax.random.key(0), (8, 8, 1))
  # zero-initialised output layers would make the net ignore its inputs: randomise all
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])
  return model, params


@pytest.mark.slow
def test_usefulness_gap_is_zero_exactly_when_the_decoder_ignores_w():
  import jax
  from vdmrep import parallel
  model, params = _tiny_model_and_params()
  mesh = parallel.make_mesh()
  images = data.load(config_lib.base_config().data).eval_images[:24]
  fn = diagnostics.make_usefulness_fn(model, mesh)
  kw = dict(num_t=3, batch_size=16, mesh=mesh, num_dims=64)
  uses = diagnostics.usefulness(fn, params, images, jax.random.key(0), **kw)
  assert uses["num_images"] == 24 and np.all(np.abs(uses["gap_bpd"]) > 0)
  # the first 8 cond_0 inputs are the time embedding, the rest are w (additive conditioning)
  blind = jax.tree.map(lambda x: x, params)
  blind["score"]["cond_0"]["kernel"] = blind["score"]["cond_0"]["kernel"].at[8:].set(0.0)
  same = diagnostics.usefulness(fn, blind, images, jax.random.key(0), **kw)
  np.testing.assert_array_equal(same["gap_bpd"], 0.0)
  assert np.all(same["own_bpd"] > 0)


def test_batch_stats_counts_varying_means():
  import jax.numpy as jnp
  from vdmrep.models import ELBOTerms
  mean = jnp.array([[0.0, 1.0, 0.0], [0.0, -1.0, 0.05], [0.0, 1.0, -0.05], [0.0, -1.0, 0.0]])
  kl_pd = jnp.array([[0.1, 2.0, 0.0]] * 4)
  zero = jnp.zeros((4,))
  terms = ELBOTerms(recon=zero, prior=zero, diffusion=zero, kl=kl_pd.sum(-1), t=zero,
                    gamma_t=zero, gamma_0=zero, gamma_1=zero, mean=mean, kl_per_dim=kl_pd)
  s = diagnostics.batch_stats(terms, 0.01)
  assert float(s["active_units_batch"]) == 1.0  # var 1, var 0.00125, var 0
  assert float(s["kl_nats_per_dim"]) == pytest.approx(2.1 / 3)
  assert float(s["kl_max_dim_nats"]) == pytest.approx(2.0)


def test_ood_source_of_another_shape_is_rejected(tmp_path):
  path = str(tmp_path / "big.npz")
  np.savez(path, images=np.zeros((20, 10, 10, 1), np.uint8))
  c = config_lib.base_config()
  c.eval.ood_source = "npz:" + path
  ds = data.load(c.data)
  with pytest.raises(data.DataError, match="config.eval.ood_source=.*differ in shape"):
    ood_eval.ood_sets(ds, c)


def test_eval_times_are_stratified_per_image_and_independent_across_images():
  import jax
  t = np.asarray(elbo_eval.eval_times(jax.random.key(0), 128, 4))
  assert t.shape == (4, 128) and np.all((t >= 0) & (t < 1))
  offsets = np.sort(np.mod(t - t[0], 1.0), axis=0)
  np.testing.assert_allclose(offsets, np.repeat([[0.0], [0.25], [0.5], [0.75]], 128, 1),
                             atol=1e-6)
  # training's antithetic scheme would put images 0..5 within 6/128 of each other
  assert np.ptp(t[0, :6]) > 6 / 128


@pytest.mark.slow
def test_trained_objective_of_an_mmd_model_is_its_training_loss():
  """InfoVAE/MMD objectives need an rng and (InfoDiffusion) w = mean: check against collapse."""
  import jax
  import jax.numpy as jnp
  from vdmrep import collapse, parallel
  model, params = _tiny_model_and_params()
  c = config_lib.base_config()
  c.model.encoder = "te"
  c.collapse.mmd_alpha, c.collapse.mmd_lambda, c.collapse.deterministic_encoder = 1.0, 2.0, True
  c.training.batch_size, c.eval.num_time_samples = 8, 1
  images = data.load(c.data).eval_images[:8]
  key = jax.random.key(3)
  got = elbo_eval.trained_objective(model, params, images, key, 5, c, parallel.make_mesh())
  k_terms, k_obj = jax.random.split(jax.random.split(jax.random.fold_in(key, 0), 1)[0])
  terms = model.elbo_terms(params, jnp.asarray(images), k_terms, deterministic_encoder=True)
  want = float(collapse.objective(terms, 5, c, k_obj)[0]) / (64 * math.log(2))
  assert got["bpd"] == pytest.approx(want, rel=1e-5) and got["num_images"] == 8


def test_w_probe_features_are_draws_from_q():
  from types import SimpleNamespace
  from vdmrep.evaluators import probes as probe_eval
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(20000, 3)) * np.array([2.0, 0.5, 0.0])
  logvar = np.log(np.array([[0.25, 1.0, 4.0]])).repeat(20000, 0)
  w = probe_eval.draw_w(SimpleNamespace(latent_kind="gaussian"), mean, logvar, seed=(0, 7, 1))
  assert w.shape == mean.shape and w.dtype == np.float32
  z = (w - mean) / np.exp(0.5 * logvar)  # standard normal if w ~ N(mean, exp(logvar))
  np.testing.assert_allclose(z.mean(0), 0.0, atol=0.03)  # 4 s.e.
  np.testing.assert_allclose(z.std(0), 1.0, atol=0.025)  # 5 s.e.
  again = probe_eval.draw_w(SimpleNamespace(latent_kind="gaussian"), mean, logvar, seed=(0, 7, 1))
  np.testing.assert_array_equal(w, again)  # same seed, same draw
  # categorical: M = 2 groups of K = 3; one-hot per group, frequencies follow q
  probs = np.array([[0.7, 0.2, 0.1, 0.0, 0.5, 0.5]]).repeat(20000, 0)
  with np.errstate(divide="ignore"):
    logq = np.log(probs)
  w = probe_eval.draw_w(SimpleNamespace(latent_kind="categorical", categories=3), probs, logq,
                        seed=3)
  assert w.shape == (20000, 6) and set(np.unique(w)) == {0.0, 1.0}
  np.testing.assert_array_equal(w.reshape(-1, 2, 3).sum(-1), 1.0)
  np.testing.assert_allclose(w.mean(0), probs[0], atol=0.015)


def test_a_config_saved_before_probe_features_existed_still_validates():
  import ml_collections
  d = config_lib.base_config().to_dict()
  del d["eval"]["probe_features"]  # a report's config from before the key
  config_lib.validate(ml_collections.ConfigDict(d))
