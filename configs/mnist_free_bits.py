"""mnist: Free bits (Kingma et al. 2016): batch-mean KL of each latent dimension floored at
lambda nats (free_bits_mode = 'example' floors each example's KL instead).
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.collapse.free_bits = 0.1
  c.collapse.free_bits_mode = "batch"
  return c
