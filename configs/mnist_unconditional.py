"""mnist: Unconditional VDM (no encoder): the likelihood a latent has to beat."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.model.encoder = "none"
  return c
