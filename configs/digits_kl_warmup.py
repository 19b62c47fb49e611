"""digits: Linear KL warm-up: beta from 0 to 1 over the first third (digits) / tenth (mnist)."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())  # scikit-learn's 8x8 digits (CPU job)
  c.collapse.schedule = "linear"
  c.collapse.warmup_start = 0.0
  c.collapse.warmup_steps = 500
  return c
