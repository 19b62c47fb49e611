"""digits: Unregularised encoder (the study's UE): the OE network trained with no KL and no MMD."""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())  # scikit-learn's 8x8 digits (CPU job)
  c.model.encoder = "ue"
  return c
