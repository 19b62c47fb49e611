"""CIFAR-10 (32x32x3) with the MNIST recipe and the small VDM (SVDM) + OE encoder."""
from vdmrep.config_lib import base_config


def get_config():
  c = base_config()
  c.data.source = "tfds:cifar10"
  c.model.vdm = "svdm"
  c.model.encoder = "oe"
  c.model.dropout = 0.1
  c.optim.lr = 2e-4
  c.optim.ema_decay = 0.9999
  c.training.batch_size = 64
  c.training.num_steps = 200_000
  c.training.log_every = 500
  c.training.checkpoint_every = 5_000
  c.training.eval_every = 20_000
  return c
