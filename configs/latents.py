"""Latent mechanisms at the true ELBO (beta = 1), one config argument each.

  --config configs/latents.py:data=digits,mechanism=vamp
  --config configs/latents.py:data=fashion_mnist,mechanism=categorical

data: digits (8x8, the CPU job) | fashion_mnist (28x28: study C's recipe, `common.fashion_mnist`).
mechanism:
  standard      N(0, I) prior on the encoder size's latent (the baseline)
  capped        N(0, I) on an 8-dimensional latent
  mixture       a learned mixture of 16 diagonal Gaussians
  vamp          VampPrior, 16 pseudo-inputs
  flow          an affine-coupling flow on N(0, I)
  diffusion     a latent diffusion prior (its negative ELBO replaces -log p(w))
  categorical   4 groups of 10 categories, uniform prior (straight-through Gumbel)
  categorical_learned   the same with a learned categorical prior
  per_pixel     gamma(t, w) per pixel (MuLAN-style) with a 16-dimensional latent
  kl_balance    mixture prior, KL balancing alpha = 0.8 (same value, split gradient)
  committed     delta-VAE: posterior std capped at 0.9 (a committed rate per dimension)
  aggressive    aggressive inference: 5 encoder-only steps per step until I_q(x; w) stalls
  staged        a quarter of the steps without KL, a quarter with the encoder frozen at
                beta = 1, then joint fine-tuning at beta = 1
Every mechanism trains and reports the beta = 1 ELBO; the learned priors' latent size is
16 (set `latent_dim=N` in the argument to change it, e.g. `mechanism=flow,latent_dim=4`).
`steps=N` sets training.num_steps here, so the staged fractions follow it (an override
--config.training.num_steps alone leaves the stages at the default length's quarters).
"""
from configs import common

MECHANISMS = {
    "standard": {},
    "capped": {"model.latent_dim": 8},
    "mixture": {"model.prior": "mixture", "model.latent_dim": 16},
    "vamp": {"model.prior": "vamp", "model.latent_dim": 16},
    "flow": {"model.prior": "flow", "model.latent_dim": 16},
    "diffusion": {"model.prior": "diffusion", "model.latent_dim": 16},
    "categorical": {"model.latent": "categorical", "model.latent_dim": 4,
                    "model.latent_categories": 10},
    "categorical_learned": {"model.latent": "categorical", "model.latent_dim": 4,
                            "model.latent_categories": 10, "model.prior": "learned"},
    "per_pixel": {"model.gamma_type": "per_pixel", "model.latent_dim": 16},
    "kl_balance": {"model.prior": "mixture", "model.latent_dim": 16,
                   "collapse.kl_balance": 0.8},
    "committed": {"model.posterior_std_max": 0.9, "model.latent_dim": 16},
    "aggressive": {"model.latent_dim": 16, "collapse.aggressive_inner_steps": 5},
    "staged": {"model.latent_dim": 16, "collapse.stage_surrogate_steps": 0.25,
               "collapse.stage_frozen_steps": 0.25},  # fractions of training.num_steps
}


def get_config(arg=None):
  a = common.parse_arg("configs/latents.py", arg, data="digits", mechanism="standard",
                       latent_dim=-1, steps=0)
  if a.mechanism not in MECHANISMS:
    raise ValueError(f"configs/latents.py: mechanism={a.mechanism!r}; choose one of "
                     f"{sorted(MECHANISMS)}")
  c = common.base_config()
  if a.data == "digits":
    common.digits(c)
  elif a.data == "fashion_mnist":
    common.fashion_mnist(c)
  else:
    raise ValueError(f"configs/latents.py: data={a.data!r}; use digits or fashion_mnist")
  if a.steps:
    c.training.num_steps = a.steps
  for key, value in MECHANISMS[a.mechanism].items():
    section, name = key.split(".")
    if name.startswith("stage_"):
      value = int(value * c.training.num_steps)
    c[section][name] = value
  if a.latent_dim >= 0:
    c.model.latent_dim = a.latent_dim
  return c
