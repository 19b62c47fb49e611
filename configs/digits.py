"""The default job: a tiny VAE-VDM (MVDM + TE) on scikit-learn's 8x8 digits.

Finishes in minutes on 2 CPU cores; the settings are `vdmrep.recipes.digits`.
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  return recipes.digits(base_config())
