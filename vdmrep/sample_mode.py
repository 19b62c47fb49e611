"""`--mode sample`: restore the latest checkpoint of a workdir and draw samples from it.

Above quality.py and train.py (it uses both), so neither imports the other.
"""
from __future__ import annotations

import os

import jax

from vdmrep import checkpoints, config_lib, console, parallel, quality, reliability, train


def restore_for_sampling(config, workdir: str):
  """(dataset, model, mesh, restored train state) of the latest checkpoint in `workdir`.

  Raises checkpoints.CheckpointError when there is none.
  """
  ds, model, tx, mesh = train.setup(config)
  # Read-only: a trainer may own this workdir; nothing in checkpoints/ is changed.
  ckpt = checkpoints.Checkpoints(workdir, keep=config.training.keep_checkpoints,
                                 read_only=True)
  if ckpt.check_latest_compatible(config_lib.model_fingerprint(config), ds.image_shape) is None:
    raise checkpoints.CheckpointError(f"no checkpoint to sample from in {ckpt.directory}")
  reliability.check_workdir(workdir)  # pictures and samples.npz are written here
  state = train.initial_state(model, tx, config, ds.image_shape, mesh)
  restored, _ = ckpt.restore_latest(checkpoints.abstract(state),
                                    config_lib.model_fingerprint(config), ds.image_shape)
  ckpt.close()
  if restored is None:
    raise checkpoints.CheckpointError(f"no checkpoint to sample from in {ckpt.directory}")
  return ds, model, mesh, restored


def sample_checkpoint(config, workdir: str) -> dict:
  """--mode sample: EMA parameters of the latest checkpoint -> pictures + samples.npz."""
  from clu import metric_writers
  ds, model, mesh, restored = restore_for_sampling(config, workdir)
  # Its own stream: sampling never reuses the keys of training or of the ELBO evaluation.
  key = jax.random.fold_in(jax.random.key(config.seed), 0x5A4D)
  samples = quality.draw_samples(model, restored.ema_params, ds, config, mesh, key,
                         num_unconditional=config.sample.num_samples)
  if not parallel.is_main_process():
    return {}
  writer = metric_writers.create_default_writer(workdir)
  paths = quality.write_pictures(samples, config, os.path.join(workdir, "pictures"),
                                 writer=writer, step=int(restored.step))
  writer.flush()
  npz = os.path.join(workdir, "samples.npz")
  quality.save_samples(samples, npz)
  print(console.wrap(f"sampled step {int(restored.step)}: {len(samples['unconditional'])} "
                     f"unconditional, {len(samples['inputs'])} guided/reconstruction; wrote "
                     f"{npz} and " + ", ".join(sorted(paths.values()))), flush=True)
  return paths
