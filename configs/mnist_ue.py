"""mnist: Unregularised encoder (the study's UE): the OE network trained with no KL and no MMD."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.model.encoder = "ue"
  return c
