"""mnist: ELBO KL, diffusion term weighted by sigmoid(gamma_t + bias) (Kingma & Gao 2023),
which emphasises high noise levels, where a global latent helps most. Not a bound.
This re-weights the diffusion term only (to ~1e-6 at gamma_min), so relative to it the KL
weighs more; `--config.collapse.diffusion_weighting=sigmoid_consistent` weights every
term consistently (vdmrep/collapse.py).
"""
from vdmrep import recipes
from vdmrep.config_lib import base_config


def get_config():
  c = recipes.mnist(base_config())  # MNIST (the study's recipe)
  c.collapse.diffusion_weighting = "sigmoid"
  c.collapse.diffusion_weight_bias = 0.0
  return c
