"""digits: KL capacity (Burgess et al. 2018): gamma |KL - C(step)|, C ramped 0 -> C_max nats."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())  # scikit-learn's 8x8 digits (CPU job)
  c.collapse.capacity_gamma = 100.0
  c.collapse.capacity_max = 10.0
  c.collapse.capacity_steps = 1000
  return c
