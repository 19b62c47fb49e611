"""digits: InfoVAE / MMD-VAE (Zhao et al.): alpha = 0 keeps the KL, lambda weights the MMD
between the batch of latents and prior samples (RBF kernel).
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())  # scikit-learn's 8x8 digits (CPU job)
  c.collapse.mmd_alpha = 0.0
  c.collapse.mmd_lambda = 100.0
  c.collapse.mmd_kernel = "rbf"
  return c
