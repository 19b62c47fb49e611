"""mnist: Cyclical KL annealing (Fu et al. 2019): M = 4 cycles, each rising over R = 0.5."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.collapse.schedule = "cyclical"
  c.collapse.cycles = 4
  c.collapse.cycle_ratio = 0.5
  return c
