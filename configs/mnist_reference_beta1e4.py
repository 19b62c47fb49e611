"""mnist: The reference study's hidden setting: beta = 1e4 on a bits/dim KL.

Our loss is already the objective in bits/dim, so this is their objective exactly
(tests/test_collapse.py checks it on train_step). Not a bound.
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.collapse.beta = 1e4
  return c
