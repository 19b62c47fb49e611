"""digits: Cyclical KL annealing (Fu et al. 2019): M = 4 cycles, each rising over R = 0.5."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())  # scikit-learn's 8x8 digits (CPU job)
  c.collapse.schedule = "cyclical"
  c.collapse.cycles = 4
  c.collapse.cycle_ratio = 0.5
  return c
