"""MNIST with the reference study's recipe (VAE-VDM, TVDM + TE by default).

100k steps, batch 64, AdamW lr 2e-4, betas (0.9, 0.99), weight decay 0.01, clip 1.0,
EMA 0.9999, fixed linear gamma from -13.3 to 5, dropout 0.1. Offline, point the source
at the real MNIST test split: --config.data.source=idx:../shared/data/mnist (then it is
split 85/15 into train/eval by `split_seed`: not the standard training set).
"""
from vdmrep.config_lib import base_config


def get_config():
  c = base_config()
  c.data.source = "tfds:mnist"
  c.model.vdm = "tvdm"
  c.model.encoder = "te"
  c.model.gamma_type = "fixed"
  c.model.gamma_min = -13.3
  c.model.gamma_max = 5.0
  c.model.dropout = 0.1
  c.optim.lr = 2e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.99
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.training.batch_size = 64
  c.training.num_steps = 100_000
  c.training.log_every = 500
  c.training.checkpoint_every = 5_000
  c.training.eval_every = 10_000
  c.eval.num_time_samples = 4
  return c
