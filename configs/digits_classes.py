"""Class-conditional VAE-VDM on 8x8 digits: `configs/digits.py` plus a label embedding.

p(x | w, y) with label dropout 0.1 (one network is also the unconditional model, for
classifier-free guidance); the reported ELBO, evaluated without labels, bounds
-log p(x). `experiments/sampling.py` measures class agreement, guidance and few-step
samplers on it (docs/sampling.md).
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())
  c.model.num_classes = 10
  c.model.label_dropout = 0.1
  return c
