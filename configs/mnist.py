"""MNIST with the reference study's recipe (VAE-VDM, TVDM + TE; `common.study`).

100k steps, batch 64, AdamW lr 2e-4, betas (0.9, 0.99), weight decay 0.01, clip 1.0,
EMA 0.9999, fixed linear gamma from -13.3 to 5, dropout 0.1.

Variants by argument (comma-separated key=value pairs):
  configs/mnist.py                              the ELBO on tfds:mnist
  configs/mnist.py:remedy=reference_beta1e4     the study's beta = 1e4 (common.REMEDIES)
  configs/mnist.py:source=idx:DIR               offline: MNIST's idx files in DIR
Keys:
  remedy   as configs/digits.py (default elbo)
  source   tfds:mnist (default; the standard splits, downloaded on first use) or
           idx:DIR (a DIR holding only the t10k split is split 85/15 into train/eval by
           `data.split_seed`: not the standard training set)
"""
from configs import common

# The remedies' numbers for a 100k-step run.
NUMBERS = dict(kl_warmup_steps=10_000, capacity=(1000.0, 25.0, 50_000), mmd_lambda=1000.0)


def get_config(arg=None):
  a = common.parse_arg("configs/mnist.py", arg, remedy="elbo", source="tfds:mnist")
  c = common.mnist(common.base_config(), a.source)
  return common.apply_remedy(c, a.remedy, **NUMBERS)
