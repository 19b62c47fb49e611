"""CIFAR-10 (32x32x3) with the MNIST recipe and the small VDM (SVDM) + OE encoder.

Variants: configs/cifar10.py:remedy=NAME (as configs/digits.py; default elbo).
"""
from configs import common

NUMBERS = dict(kl_warmup_steps=20_000, capacity=(1000.0, 25.0, 100_000), mmd_lambda=1000.0)


def get_config(arg=None):
  a = common.parse_arg("configs/cifar10.py", arg, remedy="elbo")
  c = common.base_config()
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
  return common.apply_remedy(c, a.remedy, **NUMBERS)
