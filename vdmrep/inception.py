"""Standard Inception features for FID, from weights the user already has (never downloaded).

`config.sample.inception_weights` names either
  * `*.h5`: Keras InceptionV3 ImageNet weights without the top
    (`inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`); the features are the
    2,048-d global average pool, as in Heusel et al. (2017). Note these are Keras's
    weights, not the 2015 TF graph of the original FID code, so values are comparable
    with other Keras-InceptionV3 FIDs, not digit-for-digit with published ones; or
  * `*.keras`: any saved Keras model with the same interface, float images
    [B, S, S, 3] in [-1, 1] -> features [B, F] (the tests use a tiny stand-in).
Images are tiled to 3 channels, resized bilinearly to the network's S x S and scaled
to [-1, 1] (InceptionV3's preprocessing). TensorFlow is imported only here.
"""
from __future__ import annotations

import os

import numpy as np

SUFFIXES = (".h5", ".keras")


def check_path(path: str, key: str) -> None:
  """Raises ConfigError (naming `key`) unless `path` is an existing .h5/.keras file."""
  from vdmrep.errors import ConfigError
  if not path.endswith(SUFFIXES):
    raise ConfigError(f"{key}={path!r} must be a Keras InceptionV3 weights file (.h5) or a "
                      "saved Keras feature model (.keras)")
  if not os.path.isfile(path):
    raise ConfigError(f"{key}={path!r} does not exist (weights are never downloaded)")


def load_network(path: str):
  """The Keras feature network stored at `path` (see the module docstring)."""
  import keras
  if path.endswith(".keras"):
    return keras.models.load_model(path, compile=False)
  return keras.applications.InceptionV3(include_top=False, weights=path, pooling="avg",
                                        input_shape=(299, 299, 3))


def preprocess(images, size):
  """uint8 [B, H, W, C] (C = 1 or 3) -> float32 [B, S, S, 3] in [-1, 1] (a tf tensor)."""
  import tensorflow as tf
  x = tf.cast(images, tf.float32)
  if x.shape[-1] == 1:
    x = tf.tile(x, [1, 1, 1, 3])
  x = tf.image.resize(x, size, method="bilinear")
  return x / 127.5 - 1.0


def feature_fn(network, batch_size: int = 64):
  """images uint8 [N, H, W, C] -> float64 [N, F] features of `network`, in batches."""
  size = tuple(network.input_shape[1:3])

  def features(images):
    out = []
    for i in range(0, len(images), batch_size):
      f = network(preprocess(np.asarray(images[i:i + batch_size]), size), training=False)
      out.append(np.asarray(f, np.float64).reshape(f.shape[0], -1))
    return np.concatenate(out)

  return features
