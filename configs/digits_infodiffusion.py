"""digits: InfoDiffusion's setting: deterministic encoder (w = mean), no KL (alpha = 1),
MMD to the prior weighted by lambda (inverse multiquadric kernel).
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())  # scikit-learn's 8x8 digits (CPU job)
  c.collapse.deterministic_encoder = True
  c.collapse.mmd_alpha = 1.0
  c.collapse.mmd_lambda = 100.0
  c.collapse.mmd_kernel = "imq"
  return c
