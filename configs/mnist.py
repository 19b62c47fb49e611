"""MNIST with the reference study's recipe (VAE-VDM, TVDM + TE): `vdmrep.recipes.mnist`.

100k steps, batch 64, AdamW lr 2e-4, betas (0.9, 0.99), weight decay 0.01, clip 1.0,
EMA 0.9999, fixed linear gamma from -13.3 to 5, dropout 0.1. Data: tfds:mnist (the
standard splits; needs the dataset downloaded). Offline, use
--config.data.source=idx:../shared/data/mnist: the real MNIST test split, split 85/15 into
train/eval by `data.split_seed` (not the standard training set).
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  return recipes.mnist(base_config(), source="tfds:mnist")
