"""mnist: The ELBO (beta = 1): the baseline every remedy is compared with."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.collapse.beta = 1.0
  return c
