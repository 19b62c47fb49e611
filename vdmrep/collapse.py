"""The training objective and its posterior-collapse remedies, selected by `config.collapse`.

Every function is pure: a function of (step, per-example terms, latents, config, PRNG key).
Units: `objective` returns **nats per image**, averaged over the batch; training divides it
by (H W C ln 2) so the optimiser sees bits/dim. The reference study added beta * KL_bpd to
a bits/dim loss; since KL_bpd = KL_nats / (H W C ln 2) as well, its beta = 1e4 is exactly
`config.collapse.beta = 1e4` here (`tests/test_collapse.py` checks this on `train_step`).

The objective (one batch, nats/image):

  L = mean_b[recon + prior + w(gamma_t) * diffusion]              (VDM decoder term)
      + beta(step) * (1 - alpha) * R(KL)                            (encoder KL term)
      + (alpha + lambda - 1) * MMD(w_batch, w_prior)                (InfoVAE term)

with beta(step) a schedule (constant / linear warm-up / cyclical), R the KL statistic
(plain batch-mean KL, free bits, or the capacity penalty gamma |KL - C(step)|), alpha and
lambda the InfoVAE weights and w(gamma_t) a weighting over noise levels. The defaults
(beta = 1, plain KL, alpha = 0, lambda = 1, w = 1) give the negative ELBO.
`model.encoder = 'ue'` drops both encoder terms; `'none'` has no encoder at all.

The 'sigmoid' weighting re-weights only the diffusion term (to ~1e-6 at gamma_min with
bias 0), leaving recon, prior and the KL at weight 1: relative to the diffusion term it
raises the KL's weight, which pushes towards collapse. 'sigmoid_consistent' weights the
whole objective by the same w: recon by w(gamma_0), prior by w(gamma_1), diffusion by
w(gamma_t), and the encoder KL term by w(gamma_1). This is Kingma & Gao's (2023) view: a
monotone weighting equals an expectation over noise levels of ELBOs of noise-perturbed
data, each containing the encoder KL in full, so the KL's weight is the total weight
of that mixture, w at the highest noise level (~0.99 for bias 0).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import losses

SCHEDULES = ("constant", "linear", "cyclical")
FREE_BITS_MODES = ("batch", "example")
WEIGHTINGS = ("elbo", "sigmoid", "sigmoid_consistent")
NO_LATENT_PENALTY = ("ue", "none")  # encoders whose objective has no KL and no MMD

# Settings that only act on the encoder terms, with their neutral values; setting one for an
# encoder in NO_LATENT_PENALTY is an error (it would silently do nothing).
_ENCODER_TERM_DEFAULTS = {"schedule": "constant", "beta": 1.0, "free_bits": 0.0,
                          "stage_surrogate_steps": 0, "stage_frozen_steps": 0,
                          "aggressive_inner_steps": 0,
                          "capacity_gamma": 0.0, "mmd_alpha": 0.0, "mmd_lambda": 1.0,
                          "deterministic_encoder": False}


# -- validation ------------------------------------------------------------------
def validate(config) -> None:
  """Raises ConfigError naming the first bad `config.collapse.*` key."""
  from vdmrep.errors import ConfigError

  c = config.collapse

  def fail(key, msg):
    raise ConfigError(f"config.collapse.{key}={c[key]!r} {msg}")

  def number(key, lo=None, lo_open=False, hi=None, integer=False):
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      fail(key, "must be a finite number")
    if integer and int(v) != v:
      fail(key, "must be an integer")
    if lo is not None and (v <= lo if lo_open else v < lo):
      fail(key, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
      fail(key, f"must be <= {hi}")

  if c.schedule not in SCHEDULES:
    fail("schedule", f"is not valid; choose one of {list(SCHEDULES)}")
  number("beta", lo=0.0)
  number("warmup_start", lo=0.0)
  number("warmup_steps", lo=0, lo_open=c.schedule == "linear", integer=True)
  number("cycles", lo=1, integer=True)
  if c.schedule == "cyclical" and c.cycles > config.training.num_steps:
    fail("cycles", f"exceeds config.training.num_steps={config.training.num_steps}")
  number("cycle_ratio", lo=0.0, lo_open=True, hi=1.0)
  number("free_bits", lo=0.0)
  if c.free_bits_mode not in FREE_BITS_MODES:
    fail("free_bits_mode", f"is not valid; choose one of {list(FREE_BITS_MODES)}")
  number("capacity_gamma", lo=0.0)
  number("capacity_max", lo=0.0)
  number("capacity_steps", lo=0, lo_open=c.capacity_gamma > 0, integer=True)
  if c.capacity_gamma > 0 and c.free_bits > 0:
    fail("free_bits", "cannot be combined with config.collapse.capacity_gamma > 0; choose one")
  number("mmd_alpha", hi=1.0)
  number("mmd_lambda", lo=0.0, lo_open=True)
  if c.mmd_alpha + c.mmd_lambda - 1.0 < 0:
    fail("mmd_lambda", f"+ config.collapse.mmd_alpha={c.mmd_alpha} - 1 (the MMD weight) "
         "must be >= 0")
  if c.mmd_kernel not in losses.KERNELS:
    fail("mmd_kernel", f"is not valid; choose one of {sorted(losses.KERNELS)}")
  number("mmd_bandwidth", lo=0.0, lo_open=True)
  if c.mmd_estimator not in losses.MMD_ESTIMATORS:
    fail("mmd_estimator", f"is not valid; choose one of {list(losses.MMD_ESTIMATORS)}")
  if not isinstance(c.deterministic_encoder, bool):
    fail("deterministic_encoder", "must be True or False")
  if c.deterministic_encoder and c.mmd_alpha != 1.0:
    fail("deterministic_encoder", "needs config.collapse.mmd_alpha=1 (no KL term): a point-"
         f"mass posterior has no finite KL, but mmd_alpha={c.mmd_alpha}")
  if c.diffusion_weighting not in WEIGHTINGS:
    fail("diffusion_weighting", f"is not valid; choose one of {list(WEIGHTINGS)}")
  number("diffusion_weight_bias")
  number("aggressive_inner_steps", lo=0, integer=True)
  if c.aggressive_inner_steps and (config.model.get("latent", "gaussian") != "gaussian"
                                   or c.deterministic_encoder):
    fail("aggressive_inner_steps", "needs a stochastic gaussian latent (its MI estimate)")
  number("stage_surrogate_steps", lo=0, integer=True)
  number("stage_frozen_steps", lo=0, integer=True)
  if c.stage_surrogate_steps + c.stage_frozen_steps >= config.training.num_steps > 0 and (
      c.stage_surrogate_steps + c.stage_frozen_steps):
    fail("stage_frozen_steps", f"+ config.collapse.stage_surrogate_steps must leave steps "
         f"for joint fine-tuning (< config.training.num_steps={config.training.num_steps})")
  if config.model.encoder in NO_LATENT_PENALTY:
    for key, neutral in _ENCODER_TERM_DEFAULTS.items():
      if c[key] != neutral:
        fail(key, f"has no effect with config.model.encoder={config.model.encoder!r} (no KL, "
             f"no MMD); leave it at {neutral!r}")


# -- schedules: beta(step) and C(step) -------------------------------------------
def linear_warmup(step, start, end, warmup_steps):
  """beta(s) = start + (end - start) * min(1, s / S): linear KL warm-up.

  The "KL annealing" of Bowman et al. (2016) and Sonderby et al. (2016) in its linear
  form: beta rises from `start` at step 0 to `end` at step S = `warmup_steps`, then stays.
  Returns a float32 scalar (or the shape of `step`).
  """
  frac = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(1, warmup_steps))
  return jnp.asarray(start + (end - start) * frac, jnp.float32)


def cyclical(step, total_steps, cycles, ratio, beta_max):
  """Cyclical annealing (Fu et al. 2019, eq. 5 with the linear f).

  tau = mod(s, ceil(T / M)) / (T / M);  beta(s) = beta_max * min(1, tau / R),
  with T = `total_steps`, M = `cycles` and R = `ratio`: in each of the M cycles beta
  rises linearly from 0 to beta_max over the first proportion R, then stays flat.
  Steps s count from 0 (the paper's t - 1). Returns float32, the shape of `step`.
  """
  period = total_steps / cycles
  tau = jnp.mod(jnp.asarray(step, jnp.float32), math.ceil(period)) / period
  return jnp.asarray(beta_max * jnp.minimum(1.0, tau / ratio), jnp.float32)


def kl_weight(step, config):
  """beta(step), the schedule's weight on the encoder KL term (float32 scalar).

  'constant': beta; 'linear': `linear_warmup(step, warmup_start, beta, warmup_steps)`;
  'cyclical': `cyclical(step, training.num_steps, cycles, cycle_ratio, beta)`. Staged
  training (`stage`) sets it to 0 during the surrogate stage.
  """
  c = config.collapse
  if c.schedule == "linear":
    beta = linear_warmup(step, c.warmup_start, c.beta, c.warmup_steps)
  elif c.schedule == "cyclical":
    beta = cyclical(step, config.training.num_steps, c.cycles, c.cycle_ratio, c.beta)
  else:
    beta = jnp.full(jnp.shape(step), c.beta, jnp.float32)
  if c.get("stage_surrogate_steps", 0):
    beta = jnp.where(stage(step, config) == 0, 0.0, beta)
  return beta


def stage(step, config):
  """Staged training's stage at `step` (int32, the shape of `step`):

  0, the first `stage_surrogate_steps`: encoder and decoder train on a surrogate, the
     objective without its KL term (the encoder learns to carry information first);
  1, the next `stage_frozen_steps`: the encoder is frozen while the decoder and the prior
     train at the configured beta (1 for the ELBO);
  2, the rest: joint fine-tuning at that beta.
  Without staging (both 0) every step is stage 2.
  """
  c = config.collapse
  s1 = c.get("stage_surrogate_steps", 0)
  s2 = s1 + c.get("stage_frozen_steps", 0)
  step = jnp.asarray(step)
  return jnp.where(step < s1, 0, jnp.where(step < s2, 1, 2)).astype(jnp.int32)


def freeze_encoder(updates, step, config):
  """Zeroes the encoder's optimiser updates (weight decay included) in stage 1."""
  if not config.collapse.get("stage_frozen_steps", 0) or "encoder" not in updates:
    return updates
  frozen = stage(step, config) == 1
  enc = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), updates["encoder"])
  return dict(updates, encoder=enc)


def capacity(step, c_max, ramp_steps):
  """C(s) = C_max * min(1, s / S): the KL target of Burgess et al. (2018), in nats/image.

  C rises linearly from 0 at step 0 to C_max at step S = `ramp_steps`, then stays.
  """
  return jnp.asarray(c_max * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(1, ramp_steps)),
                     jnp.float32)


# -- KL statistics R(KL) -----------------------------------------------------------
def free_bits_batch(kl_per_dim, lam):
  """Free bits (Kingma et al. 2016, IAF paper, eq. 15): sum_j max(lam, mean_b KL_bj).

  Args:
    kl_per_dim: [B, D] nats, KL(q(w_j|x_b) || N(0, 1)).
    lam: the floor lambda, nats per latent dimension.
  Returns:
    scalar, nats per image. A dimension whose batch-mean KL is below lam contributes the
    constant lam and so gets exactly zero gradient; above it the gradient is the KL's.
  """
  return jnp.sum(jnp.maximum(lam, jnp.mean(kl_per_dim, axis=0)))


def free_bits_example(kl_per_dim, lam):
  """Per-example free bits: mean_b sum_j max(lam, KL_bj). [B, D] nats -> scalar nats/image.

  The floor acts on each example's KL of each dimension rather than the batch mean.
  """
  return jnp.mean(jnp.sum(jnp.maximum(lam, kl_per_dim), axis=-1))


def capacity_penalty(kl, c, gamma):
  """Burgess et al. (2018), eq. 8: gamma * |mean_b KL_b - C|. kl [B] nats -> scalar nats/image."""
  return gamma * jnp.abs(jnp.mean(kl) - c)


def kl_statistic(terms, step, collapse_cfg):
  """R(KL) of the objective (scalar, nats/image) and the capacity C(step) (0 when off).

  capacity_gamma > 0: `capacity_penalty`; else free_bits > 0: `free_bits_batch` or
  `free_bits_example` by free_bits_mode; else the batch-mean KL (the ELBO's term).
  """
  c = collapse_cfg
  if c.capacity_gamma > 0:
    cap = capacity(step, c.capacity_max, c.capacity_steps)
    return capacity_penalty(terms.kl, cap, c.capacity_gamma), cap
  zero = jnp.zeros((), jnp.float32)
  if c.free_bits > 0:
    fb = free_bits_batch if c.free_bits_mode == "batch" else free_bits_example
    return fb(terms.kl_per_dim, c.free_bits), zero
  return jnp.mean(terms.kl), zero


# -- InfoVAE -----------------------------------------------------------------------
def infovae_weights(collapse_cfg):
  """(KL weight 1 - alpha, MMD weight alpha + lambda - 1) of InfoVAE (Zhao et al. 2019, eq. 6).

  L = E[-log p(x|w)] + (1 - alpha) E_x KL(q(w|x) || p(w)) + (alpha + lambda - 1) D(q(w) || p(w));
  alpha = 0, lambda = 1 is the ELBO. With D the MMD, alpha = 1 and a deterministic encoder
  (w = encoder mean) this is the objective InfoDiffusion (Wang et al. 2023) trains.
  """
  a, lam = collapse_cfg.mmd_alpha, collapse_cfg.mmd_lambda
  return 1.0 - a, a + lam - 1.0


def mmd_to_prior(w, rng, kernel="rbf", bandwidth=1.0, estimator="unbiased"):
  """MMD^2 between the batch of latents w [B, D] and B fresh samples of N(0, I).

  `losses.mmd` (kernel "rbf", "infovae" or "imq"; unbiased or biased estimator); a
  scalar per batch, unitless. The prior samples come from `rng`, so the same key gives
  the same value. InfoVAE's own MMD is kernel "infovae" with the biased estimator; the
  default ("rbf", unbiased) is a Gaussian kernel with squared length scale 2 D.
  """
  return losses.mmd(w, jax.random.normal(rng, w.shape, w.dtype), kernel, bandwidth,
                    estimator)


# -- weighting over noise levels ----------------------------------------------------
def diffusion_weight(gamma_t, weighting="elbo", bias=0.0):
  """w(gamma_t), the weight of each example's diffusion term; gamma_t [B] -> [B].

  'elbo': w = 1 (the VDM ELBO, Kingma et al. 2021). 'sigmoid': w = sigmoid(gamma_t + bias),
  the sigmoid weighting of Kingma & Gao (2023), w(lambda) = sigmoid(bias - lambda) with
  lambda = -gamma the log-SNR. It is monotone, near 1 at high noise (large gamma) and
  near 0 at low noise, so it emphasises the noise levels where only global information,
  which a latent can carry, is left in z_t. Any weighting but 'elbo' is not a bound.
  'sigmoid_consistent' uses the same w (see `objective` for how it treats the other terms).
  """
  if weighting in ("sigmoid", "sigmoid_consistent"):
    return jax.nn.sigmoid(jnp.asarray(gamma_t, jnp.float32) + bias)
  return jnp.ones_like(jnp.asarray(gamma_t, jnp.float32))


def kl_balance(config):
  """alpha of DreamerV2's KL balancing (`VAEVDM.elbo_terms(kl_balance=...)`), or None.

  The KL term keeps its value (so every objective and the bound are unchanged); only its
  gradient is split: alpha * grad KL(sg(q) || p) + (1 - alpha) * grad KL(q || sg(p))
  (Hafner et al. 2021): the prior moves towards the posteriors faster than they collapse
  onto it. A fixed N(0, I) prior has no parameters, so there alpha only scales the
  encoder's KL gradient by 1 - alpha.
  """
  a = config.collapse.get("kl_balance", -1.0)
  return None if a < 0 else float(a)


# -- the objective -------------------------------------------------------------------
def objective(terms, step, config, rng=None):
  """Training loss (nats per image, batch mean) and what to log about it.

  Args:
    terms: `ELBOTerms` from `VAEVDM.elbo_terms`: [B] nats recon, prior, diffusion, kl;
      [B] gamma_t, gamma_0, gamma_1 (read only by a non-ELBO weighting); kl_per_dim [B, D] (free bits)
      and w [B, D] (MMD) when conditional.
    step: the current step (int scalar array).
    config: the full config (`config.collapse` selects the remedies).
    rng: PRNG key for the MMD's prior samples; may be None when the MMD weight is 0.
  Returns:
    (loss scalar in nats/image, dict of scalar logs): beta (the schedule's value),
    kl_weight (beta * (1 - alpha), the weight on R(KL)), capacity (C(step), nats),
    kl_unweighted_nats (batch-mean encoder KL, nats/image), kl_term_nats (the KL term
    added to the loss), mmd (MMD^2, unitless), mmd_term_nats, diffusion_weighted_nats.
  """
  c = config.collapse
  diffusion, recon, prior = terms.diffusion, terms.recon, terms.prior
  kl_scale_w = 1.0
  if c.diffusion_weighting != "elbo":
    wfn = lambda g: diffusion_weight(g, c.diffusion_weighting, c.diffusion_weight_bias)
    diffusion = wfn(terms.gamma_t) * diffusion
    if c.diffusion_weighting == "sigmoid_consistent":
      recon, prior = wfn(terms.gamma_0) * recon, wfn(terms.gamma_1) * prior
      kl_scale_w = jnp.mean(wfn(terms.gamma_1))
  loss = jnp.mean(recon + prior + diffusion)
  zero = jnp.zeros((), jnp.float32)
  logs = dict(beta=zero, kl_weight=zero, capacity=zero, kl_unweighted_nats=jnp.mean(terms.kl),
              kl_term_nats=zero, mmd=zero, mmd_term_nats=zero,
              diffusion_weighted_nats=jnp.mean(diffusion))
  if config.model.encoder in NO_LATENT_PENALTY:
    return loss, logs
  kl_scale, mmd_scale = infovae_weights(c)
  beta = kl_weight(step, config)
  stat, cap = kl_statistic(terms, step, c)
  logs.update(beta=beta, kl_weight=beta * kl_scale, capacity=cap)
  if kl_scale != 0:  # static: deterministic encoders have no finite KL to add
    logs["kl_term_nats"] = kl_scale_w * beta * kl_scale * stat
    loss = loss + logs["kl_term_nats"]
  if mmd_scale != 0:
    if rng is None:
      raise ValueError("collapse.objective: the MMD term (config.collapse.mmd_alpha + "
                       "mmd_lambda - 1 != 0) needs an rng for its prior samples")
    logs["mmd"] = mmd_to_prior(terms.w, rng, c.mmd_kernel, c.mmd_bandwidth,
                               c.get("mmd_estimator", "unbiased"))
    logs["mmd_term_nats"] = mmd_scale * logs["mmd"]
    loss = loss + logs["mmd_term_nats"]
  return loss, logs


def _not_elbo_reasons(config, betas, where: str) -> list:
  c, enc = config.collapse, config.model.encoder
  reasons = []
  if enc == "ue":
    reasons.append("encoder trained without its KL term (ue)")
  elif enc != "none":
    if c.schedule == "constant" and c.beta != 1.0:
      reasons.append(f"KL weight beta={c.beta:g} != 1")
    elif not np.all(betas == 1.0):
      what = "staged: no KL in the surrogate stage" if c.stage_surrogate_steps else c.schedule
      reasons.append(f"KL weight beta ({what}) is not 1 {where} "
                     f"(mean {betas.mean():.4g})")
    if c.free_bits > 0:
      reasons.append(f"free bits lambda={c.free_bits} nats ({c.free_bits_mode})")
    if c.capacity_gamma > 0:
      reasons.append(f"KL capacity gamma={c.capacity_gamma}, C_max={c.capacity_max}")
    if (c.mmd_alpha, c.mmd_lambda) != (0.0, 1.0):
      reasons.append(f"InfoVAE alpha={c.mmd_alpha}, lambda={c.mmd_lambda} "
                     f"({c.mmd_kernel} MMD)")
    if c.deterministic_encoder:
      reasons.append("deterministic encoder (w = mean)")
  if c.diffusion_weighting != "elbo":
    reasons.append(f"diffusion weighting {c.diffusion_weighting!r}")
  return reasons


def is_bound(config) -> tuple[bool, str]:
  """Whether the run trained the negative ELBO at every step; (False, reason) when not.

  The rule: it is the ELBO iff at *every* step of the run the KL weight beta(step) is 1
  (checked on all `training.num_steps` steps, so a warm-up or cyclical schedule never is,
  even one whose average happens to be 1), the KL is the plain KL (no free bits, no
  capacity), the InfoVAE weights are alpha = 0, lambda = 1, the encoder is stochastic,
  and the diffusion term has the ELBO weighting. `ue` never is; `none` is (its ELBO has
  no KL). `is_bound_at` asks the same of the objective of one step.
  """
  betas = np.asarray(kl_weight(np.arange(config.training.num_steps), config))
  reasons = _not_elbo_reasons(config, betas, "at every step of the run")
  return (not reasons), "; ".join(reasons)


def encoder_gradient_note(config) -> str:
  """'' when the encoder follows the gradient of its loss's value, else why not (one line).

  `is_bound` judges the value trained; KL balancing keeps that value (the ELBO) and scales
  the encoder's share of the KL gradient by 1 - alpha, so for the encoder it trains at
  beta = 1 - alpha whatever the prior. A claim "at beta = 1" must check both.
  """
  a = kl_balance(config)
  if a is None or a == 0.0 or config.model.encoder in ("none", "ue"):
    return ""
  return (f"KL balancing alpha={a:g}: the encoder's KL gradient is scaled by {1 - a:g} "
          f"(beta = {1 - a:g} for the encoder)")


def is_bound_at(config, step: int) -> tuple[bool, str]:
  """Whether the objective of step `step` (counting from 0) is the negative ELBO.

  As `is_bound`, with beta checked at this step only: a warm-up that has reached
  beta = 1, or a cyclical schedule at a step where beta = 1, trains the ELBO there.
  """
  betas = np.asarray(kl_weight(np.asarray([step]), config))
  reasons = _not_elbo_reasons(config, betas, f"at step {step}")
  return (not reasons), "; ".join(reasons)
