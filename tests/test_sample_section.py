"""The sample-quality section end to end, and the Inception path with a stand-in network."""
import json
import os

import jax
import numpy as np
import pytest
import scipy.linalg

from vdmrep import classifier as classifier_lib
from vdmrep import config_lib, data, quality
from vdmrep.models import build_model


def _fd_scipy(mu1, s1, mu2, s2):
  """The usual FID formula with scipy's general matrix square root of S1 S2."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _digits_ds():
  return data.load(config_lib.base_config().data)


@pytest.fixture(scope="module")
def standin_weights(tmp_path_factory):
  """A tiny Keras network with InceptionV3's interface: [B, S, S, 3] in [-1, 1] -> [B, F]."""
  import keras
  inputs = keras.Input((8, 8, 3))
  h = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
  h = keras.layers.GlobalAveragePooling2D()(h)
  model = keras.Model(inputs, keras.layers.Dense(5)(h))
  path = str(tmp_path_factory.mktemp("standin") / "standin.keras")
  model.save(path)
  return path, model


def _direct_features(model, images):
  x = np.tile(images.astype(np.float32), (1, 1, 1, 3)) / 127.5 - 1.0  # already 8x8
  return np.asarray(model(x), np.float64)


def test_standin_inception_features_equal_the_network(standin_weights):
  from vdmrep import inception
  path, model = standin_weights
  images = _digits_ds().eval_images[:70]
  feats = inception.feature_fn(inception.load_network(path), batch_size=32)(images)
  np.testing.assert_allclose(feats, _direct_features(model, images), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sample_quality_section_end_to_end(tmp_path, standin_weights):
  c = config_lib.base_config()
  c.model.vdm, c.model.n_blocks, c.model.channels = "mvdm", 1, 8
  c.model.conditioning, c.model.fourier_features = "film", False
  s = c.sample
  s.num_steps, s.num_samples, s.batch_size, s.num_guided, s.grid_size = 3, 40, 20, 20, 16
  s.trajectory_frames, s.num_trajectories, s.num_interpolations, s.interpolation_steps = 3, 2, 2, 3
  s.classifier_steps, s.classifier_features = 40, 16
  s.inception_weights = standin_weights[0]
  config_lib.validate(c)
  ds, model = _digits_ds(), build_model(c.model)
  params = jax.jit(model.init, static_argnums=1)(jax.random.key(0), ds.image_shape)
  wd = str(tmp_path)
  res = quality.sample_quality_section(model, params, ds, c, wd, None, jax.random.key(3),
                                       log=lambda *_: None)
  json.dumps(res)  # JSON-serialisable
  for name in ("grid_unconditional", "grid_guided", "grid_reconstruction", "trajectory_guided",
               "trajectory_reconstruction", "interpolation"):
    with open(res["pictures"][name], "rb") as fh:
      assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
  # The numbers are those of the written samples under the cached classifier.
  samples = np.load(os.path.join(wd, "samples.npz"))
  assert samples["unconditional"].shape == (40, 8, 8, 1)
  assert samples["guided"].shape == samples["inputs"].shape == (20, 8, 8, 1)
  assert samples["guided_frames"].shape == (3, 2, 8, 8, 1)
  assert samples["interp"].shape == (2, 3, 8, 8, 1)
  clf = classifier_lib.get_classifier(ds, jax.random.split(jax.random.key(3), 4)[0],
                                      workdir=wd, steps=40, batch_size=128, lr=1e-3,
                                      features=16, log=lambda *_: None)
  assert clf.meta["cached"]
  f_gen, f_tr = clf.apply(samples["unconditional"])[1], clf.apply(ds.train_images)[1]
  assert res["fd_classifier"] == pytest.approx(_fd_scipy(*quality.gaussian_stats(f_gen),
                                                         *quality.gaussian_stats(f_tr)), rel=1e-4)
  match = np.mean(clf.predict(samples["guided"]) == clf.predict(samples["inputs"]))
  assert res["guided_class_match"] == pytest.approx(match)
  assert res["classifier_test_accuracy"] == clf.meta["test_accuracy"]
  # Stand-in Inception FD equals the FD of the network's own features.
  net = standin_weights[1]
  fd = quality.fd_from_features(_direct_features(net, samples["unconditional"]),
                                _direct_features(net, ds.train_images))
  assert res["fd_inception"] == pytest.approx(fd, rel=1e-4)
  # Real data is closer to real data than an untrained model's samples are.
  assert res["fd_classifier_floor_real_halves"] < res["fd_classifier"]
  # Same key, same numbers (the classifier is now loaded from the cache).
  again = quality.sample_quality_section(model, params, ds, c, wd, None, jax.random.key(3),
                                         log=lambda *_: None)
  assert {k: v for k, v in again.items() if k != "pictures"} == \
      {k: v for k, v in res.items() if k != "pictures"}
