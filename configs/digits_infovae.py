"""digits: InfoVAE / MMD-VAE (Zhao et al. 2019) at its published mutual-information setting
alpha = 1 (no KL term; with alpha = 0 the objective keeps the full KL and cannot counter
collapse by construction), the MMD between the batch of latents and prior samples weighted
by alpha + lambda - 1 = lambda, with InfoVAE's own kernel exp(-||d||^2 / D^2) and biased
(V-statistic) estimator. Stochastic encoder; not a bound when trained.
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.digits(base_config())  # scikit-learn's 8x8 digits (CPU job)
  c.collapse.mmd_alpha = 1.0
  c.collapse.mmd_lambda = 100.0
  c.collapse.mmd_kernel = "infovae"
  c.collapse.mmd_estimator = "biased"
  return c
