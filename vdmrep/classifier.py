"""The feature classifier behind the sample-quality numbers: a small conv net trained on
the dataset's labels, whose penultimate layer is the feature space of the Frechet
distance and whose softmax is the Inception-style score's p(y | x).

It is trained once per workdir and kept in `workdir/classifier/` (parameters as flax
msgpack + `meta.json` with its settings and test accuracy); a cached classifier is reused
only when every setting that made it (data, shape, steps, key, ...) matches.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdmrep import data as data_lib
from vdmrep import losses


class ConvClassifier(nn.Module):
  """x in model scale [B, H, W, C] -> (logits [B, classes], features [B, features])."""
  num_classes: int
  features: int = 64
  width: int = 16

  @nn.compact
  def __call__(self, x):
    c = self.width
    h = nn.relu(nn.Conv(c, (3, 3), name="conv_0")(x))
    h = nn.relu(nn.Conv(2 * c, (3, 3), strides=(2, 2), name="conv_1")(h))
    h = nn.relu(nn.Conv(2 * c, (3, 3), strides=(2, 2), name="conv_2")(h))
    h = jnp.mean(h, axis=(1, 2))
    f = nn.relu(nn.Dense(self.features, name="features")(h))
    return nn.Dense(self.num_classes, name="logits")(f), f


@functools.partial(jax.jit, static_argnums=0)
def _apply(net, params, x_int):
  return net.apply({"params": params}, losses.data_to_model_scale(x_int))


@dataclasses.dataclass(frozen=True)
class FeatureClassifier:
  """A trained classifier: `apply(images uint8 [N, H, W, C])` -> (logits, features) numpy."""
  net: ConvClassifier
  params: dict
  meta: dict

  def apply(self, images, batch_size: int = 256):
    """(logits [N, classes], features [N, F]) as float64 numpy, in fixed-size batches."""
    logits, feats = [], []
    for batch, mask in data_lib.eval_batches(np.asarray(images), batch_size):
      lo, fe = _apply(self.net, self.params, batch)
      logits.append(np.asarray(lo, np.float64)[mask > 0])
      feats.append(np.asarray(fe, np.float64)[mask > 0])
    return np.concatenate(logits), np.concatenate(feats)

  def predict(self, images, batch_size: int = 512):
    return np.argmax(self.apply(images, batch_size)[0], axis=-1)


def _train(net, images, labels, key, *, steps, batch_size, lr):
  """All `steps` Adam steps as one compiled scan over random minibatches."""
  x_all = losses.data_to_model_scale(jnp.asarray(images))
  y_all = jnp.asarray(labels, jnp.int32)
  k_init, k_batches = jax.random.split(key)
  params = net.init(k_init, x_all[:1])["params"]
  tx = optax.adam(lr)

  def step(carry, k):
    params, opt_state = carry
    idx = jax.random.randint(k, (batch_size,), 0, x_all.shape[0])

    def loss_fn(p):
      logits, _ = net.apply({"params": p}, x_all[idx])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y_all[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  run = jax.jit(lambda p, ks: jax.lax.scan(step, (p, tx.init(p)), ks))
  (params, _), loss_curve = run(params, jax.random.split(k_batches, steps))
  return params, np.asarray(loss_curve)


def get_classifier(ds, key, *, workdir, steps, batch_size, lr, features,
                   log=print) -> FeatureClassifier:
  """Loads the classifier cached in `workdir/classifier/` or trains (and caches) one.

  Args:
    ds: `data.Dataset` with train/eval labels.
    key: PRNG key of the initialisation and minibatch order (part of the cache key).
  Returns:
    FeatureClassifier; `meta["test_accuracy"]` is its accuracy on the eval split and
    `meta["cached"]` says whether it was loaded.
  """
  if ds.train_labels is None or ds.eval_labels is None:
    raise ValueError(f"{ds.name} has no labels; the feature classifier needs them")
  num_classes = int(max(ds.train_labels.max(), ds.eval_labels.max())) + 1
  net = ConvClassifier(num_classes=num_classes, features=features)
  settings = {"data": ds.name, "image_shape": list(ds.image_shape),
              "num_train": int(len(ds.train_images)), "num_classes": num_classes,
              "steps": int(steps), "batch_size": int(batch_size), "lr": float(lr),
              "features": int(features), "key": np.asarray(jax.random.key_data(key)).tolist()}
  directory = os.path.join(workdir, "classifier")
  meta_path, params_path = (os.path.join(directory, "meta.json"),
                            os.path.join(directory, "params.msgpack"))
  if os.path.exists(meta_path) and os.path.exists(params_path):
    with open(meta_path) as fh:
      meta = json.load(fh)
    if meta.get("settings") == settings:
      target = net.init(jax.random.key(0), jnp.zeros((1,) + ds.image_shape))["params"]
      with open(params_path, "rb") as fh:
        params = flax.serialization.from_bytes(target, fh.read())
      log(f"feature classifier: loaded from {directory} "
          f"(test accuracy {meta['test_accuracy']:.4f})")
      return FeatureClassifier(net, params, dict(meta, cached=True))
    log(f"feature classifier in {directory} was made with other settings; retraining")
  params, loss_curve = _train(net, ds.train_images, ds.train_labels, key, steps=steps,
                              batch_size=batch_size, lr=lr)
  clf = FeatureClassifier(net, params, {})
  acc = float(np.mean(clf.predict(ds.eval_images) == ds.eval_labels))
  meta = {"settings": settings, "test_accuracy": acc, "num_eval": int(len(ds.eval_images)),
          "final_train_loss": float(np.mean(loss_curve[-20:]))}
  if jax.process_index() == 0:  # every process trains the same net; one writes it
    os.makedirs(directory, exist_ok=True)
    with open(params_path, "wb") as fh:
      fh.write(flax.serialization.to_bytes(params))
    with open(meta_path, "w") as fh:
      json.dump(meta, fh, indent=1)
  log(f"feature classifier: trained {steps} steps; test accuracy {acc:.4f} "
      f"on {len(ds.eval_images)} eval images")
  return FeatureClassifier(net, params, dict(meta, cached=False))
