"""mnist: InfoDiffusion's setting: deterministic encoder (w = mean), no KL (alpha = 1),
MMD to the prior weighted by lambda (inverse multiquadric kernel).
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.collapse.deterministic_encoder = True
  c.collapse.mmd_alpha = 1.0
  c.collapse.mmd_lambda = 1000.0
  c.collapse.mmd_kernel = "imq"
  return c
