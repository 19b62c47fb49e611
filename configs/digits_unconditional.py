"""digits: Unconditional VDM (no encoder): the likelihood a latent has to beat."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())  # scikit-learn's 8x8 digits (CPU job)
  c.model.encoder = "none"
  return c
