"""The train step: it learns, it checkpoints exactly, it shards, and bad configs fail early."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdmrep import checkpoints, config_lib, data, parallel, train

from conftest import ROOT, tiny_config


def _setup(config):
  ds, model, tx, mesh = train.setup(config)
  state = train.initial_state(model, tx, config, ds.image_shape, mesh)
  return ds, model, tx, mesh, state


def _batch(ds, config, step, mesh):
  local = data.train_batch(ds, step, config.training.batch_size, config.seed)
  return parallel.global_batch(mesh, local)


@pytest.mark.slow
def test_training_lowers_the_loss_on_digits():
  config = tiny_config(**{"training.batch_size": 32})
  ds, model, tx, mesh, state = _setup(config)
  step = train.make_train_step(model, tx, config, mesh)
  key = jax.random.key(config.seed)
  losses = []
  for s in range(40):
    state, metrics = step(state, _batch(ds, config, s, mesh), key)
    losses.append(float(metrics["loss_bpd"]))
  assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


@pytest.mark.slow
def test_checkpoint_roundtrip_gives_identical_params_and_next_loss(tmp_path):
  config = tiny_config()
  ds, model, tx, mesh, state = _setup(config)
  step = train.make_train_step(model, tx, config, mesh)
  key = jax.random.key(0)
  for s in range(3):
    state, _ = step(state, _batch(ds, config, s, mesh), key)
  ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
  ckpt.save(3, state, {"model_fingerprint": config_lib.model_fingerprint(config)})
  template = train.initial_state(model, tx, config, ds.image_shape, mesh)
  restored, meta = ckpt.restore_latest(checkpoints.abstract(template),
                                       config_lib.model_fingerprint(config))
  assert int(restored.step) == 3
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  batch = _batch(ds, config, 3, mesh)
  # The step donates its input state: compare from copies.
  _, m1 = step(jax.tree.map(jnp.copy, state), batch, key)
  _, m2 = step(restored, batch, key)
  assert float(m1["loss_bpd"]) == float(m2["loss_bpd"])
  # A checkpoint of another model is refused by name before any array is read.
  other = config_lib.model_fingerprint(tiny_config(**{"model.vdm": "tvdm"}))
  with pytest.raises(checkpoints.CheckpointError, match="different model"):
    ckpt.restore_latest(checkpoints.abstract(template), other)


SHARDED = textwrap.dedent("""
  import jax, numpy as np
  from jax.sharding import Mesh
  from vdmrep import data, parallel, train
  from conftest import tiny_config
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config(**{"training.batch_size": 16})
  ds, model, tx, _ = train.setup(config)
  out = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
    state = train.initial_state(model, tx, config, ds.image_shape, mesh)
    step = train.make_train_step(model, tx, config, mesh)
    for s in range(2):
      batch = jax.device_put(data.train_batch(ds, s, 16, 0), parallel.batch_sharded(mesh))
      state, m = step(state, batch, jax.random.key(0))
    out.append((float(m["loss_bpd"]), np.asarray(jax.tree.leaves(state.params)[0])))
  print("losses", out[0][0], out[1][0])
  assert abs(out[0][0] - out[1][0]) <= 1e-5 * abs(out[0][0]), out
  np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)
  print("OK")
""")


@pytest.mark.slow
def test_sharded_step_on_8_devices_matches_1_device():
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags,
             PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("key,value,message", [
    ("model.vdm", "huge", "config.model.vdm='huge' is not valid"),
    ("model.encoder", "xe", "config.model.encoder='xe' is not valid"),
    ("model.gamma_type", "cosine", "config.model.gamma_type='cosine' is not valid"),
    ("model.gamma_min", 6.0, "config.model.gamma_min=6.0 must be < config.model.gamma_max"),
    ("training.batch_size", 0, "config.training.batch_size=0 must be > 0"),
    ("training.batch_size", -4, "config.training.batch_size=-4 must be > 0"),
    ("data.source", "imagenet", "config.data.source='imagenet' is not valid"),
    ("collapse.schedule", "magic", "config.collapse.schedule='magic' is not valid"),
    ("optim.ema_decay", 1.0, "config.optim.ema_decay=1.0 must be in [0, 1)"),
])
def test_bad_config_values_name_the_key(key, value, message):
  config = tiny_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config)
  assert message in str(err.value)


def test_batch_must_divide_over_devices():
  with pytest.raises(config_lib.ConfigError, match="not divisible by the 3 devices"):
    config_lib.validate(tiny_config(**{"training.batch_size": 16}), num_devices=3)
