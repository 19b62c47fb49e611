"""mnist: Linear KL warm-up: beta from 0 to 1 over the first third (digits) / tenth (mnist)."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.collapse.schedule = "linear"
  c.collapse.warmup_start = 0.0
  c.collapse.warmup_steps = 10_000
  return c
