"""The encoder-KL term of the training objective and its collapse-mitigation schedules.

All functions are pure functions of (step, per-example encoder terms, config). Units:
the objective returned by `objective` is **nats per image**, averaged over the batch;
training divides it by (H W C ln 2) so the optimiser sees bits/dim, as the reference
study did (which is why its beta = 1e4 on a bits/dim KL equals beta = 1e4 here).
"""
from __future__ import annotations

import jax.numpy as jnp

SCHEDULES = ("constant",)


def validate(config) -> None:
  from vdmrep.config_lib import ConfigError
  c = config.collapse
  if c.schedule not in SCHEDULES:
    raise ConfigError(f"config.collapse.schedule={c.schedule!r} is not valid; choose one of "
                      f"{list(SCHEDULES)}")
  if c.beta < 0:
    raise ConfigError(f"config.collapse.beta={c.beta} must be >= 0")


def kl_weight(step, collapse_cfg):
  """beta(step), the weight on the encoder KL (scalar). 'constant': beta."""
  del step
  return jnp.asarray(collapse_cfg.beta, jnp.float32)


def objective(terms, step, config):
  """Training loss (nats per image, batch mean) and what to log about it.

  Args:
    terms: `VAEVDM.elbo_terms` output ([B] nats each; kl_per_dim [B, D] if conditional).
    step: the current step (int array).
    config: the full config.
  Returns:
    (loss scalar in nats/image, dict of scalar logs: beta, weighted KL).
  """
  vdm = jnp.mean(terms["recon"] + terms["prior"] + terms["diffusion"])
  if config.model.encoder in ("none", "ue"):  # no KL in the objective
    return vdm, {"beta": jnp.zeros(())}
  beta = kl_weight(step, config.collapse)
  return vdm + beta * jnp.mean(terms["kl"]), {"beta": beta}


def is_bound(config) -> tuple[bool, str]:
  """Whether the trained objective is the ELBO (so its value is a likelihood bound)."""
  if config.model.encoder == "ue":
    return False, "encoder trained without its KL term (ue)"
  if config.model.encoder != "none" and config.collapse.beta != 1.0:
    return False, f"KL weight beta={config.collapse.beta} != 1"
  return True, ""
