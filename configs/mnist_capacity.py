"""mnist: KL capacity (Burgess et al. 2018): gamma |KL - C(step)|, C ramped 0 -> C_max nats."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.collapse.capacity_gamma = 1000.0
  c.collapse.capacity_max = 25.0
  c.collapse.capacity_steps = 50_000
  return c
