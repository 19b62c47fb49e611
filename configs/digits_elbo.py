"""digits: The ELBO (beta = 1): the baseline every remedy is compared with."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())  # scikit-learn's 8x8 digits (CPU job)
  c.collapse.beta = 1.0
  return c
