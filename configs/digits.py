"""The default job: a tiny VAE-VDM on scikit-learn's 8x8 digits (CPU, a few minutes)."""
from vdmrep.config_lib import base_config


def get_config():
  c = base_config()
  c.data.source = "digits"
  c.model.vdm = "mvdm"
  c.model.encoder = "te"
  c.training.batch_size = 64
  c.training.num_steps = 1500
  c.training.log_every = 100
  c.training.checkpoint_every = 500
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.999
  c.eval.num_time_samples = 4
  return c
