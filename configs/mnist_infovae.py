"""mnist: InfoVAE / MMD-VAE (Zhao et al.): alpha = 0 keeps the KL, lambda weights the MMD
between the batch of latents and prior samples (RBF kernel).
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.collapse.mmd_alpha = 0.0
  c.collapse.mmd_lambda = 1000.0
  c.collapse.mmd_kernel = "rbf"
  return c
