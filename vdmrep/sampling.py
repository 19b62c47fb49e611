"""VDM samplers (ancestral and DDIM-style, any step count), classifier-free guidance,
and the three modes: unconditional, guided, reconstruction.

Ancestral: from z_t the sampler draws z_s (s < t) from the diffusion posterior q(z_s | z_t, x) with
x replaced by the model's estimate x_hat = (z_t - sigma_t eps_hat) / alpha_t (Kingma et
al. 2021, section 3.2 and appendix A). With c = 1 - SNR(t) / SNR(s) = -expm1(gamma_s - gamma_t)
the posterior is N(mu, c sigma_s^2 I) and its mean simplifies to

  mu = (alpha_s / alpha_t) (z_t - c sigma_t eps_hat(z_t; gamma_t, w)).

DDIM-style (Song et al. 2021, eta = 0; in gamma form as in diffusion autoencoders): the
deterministic map z_s = alpha_s x_hat + sigma_s eps_hat, which keeps eps_hat as the
noise direction instead of drawing fresh noise. With a perfect eps_hat one step from
any t recovers x exactly.

Classifier-free guidance (Ho & Salimans 2022) for a class-conditional model: with weight
s, eps = (1 + s) eps_hat(z; y) - s eps_hat(z; null), both from one network evaluation
on a doubled batch; s = 0 is the plain conditional model.

N steps on the grid t_k = t_start (N - k) / N run as one `jax.lax.fori_loop`; the last
step lands on z_0, which the model's discretised decoder p(x | z_0) turns into integer
pixels ("sample": a draw from that categorical, the model's own distribution, default;
"argmax": its most likely value). Modes:

  unconditional   z_1 ~ N(0, I); w ~ p(w) (the model's prior) if it has an encoder.
  guided          z_1 ~ N(0, I); w ~ q(w | x) of given images.
  reconstruction  z_{t_start} ~ q(z_{t_start} | x), then denoised with w ~ q(w | x).

Any mode of a class-conditional model takes labels [B] (int; `model.null_label` or
None for its unconditional path).

The encoder is only ever called through `model.encode` (training's input scale). Every
function takes its PRNG key explicitly: the same key gives the same images.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import data as data_lib
from vdmrep import losses, parallel

MODES = ("unconditional", "guided", "reconstruction")
DECODERS = ("sample", "argmax")
INTERPOLATIONS = ("slerp", "linear")
SAMPLERS = ("ancestral", "ddim")


def validate(config, num_devices: int = 1) -> None:
  """Checks `config.sample`; raises ConfigError naming the key."""
  from vdmrep.errors import ConfigError
  s = config.sample
  for key in ("num_steps", "num_samples", "batch_size", "trajectory_frames", "num_trajectories",
              "grid_size", "num_guided", "num_interpolations", "interpolation_steps",
              "classifier_steps", "classifier_batch_size", "classifier_features"):
    if not isinstance(s[key], int) or s[key] <= 0:
      raise ConfigError(f"config.sample.{key}={s[key]!r} must be a positive integer")
  if s.trajectory_frames < 2 or s.interpolation_steps < 2:
    raise ConfigError("config.sample.trajectory_frames and config.sample.interpolation_steps "
                      "must be >= 2 (first and last frame)")
  if s.batch_size % num_devices:
    raise ConfigError(f"config.sample.batch_size={s.batch_size} is not divisible by the "
                      f"{num_devices} devices it is sharded over")
  if not 0.0 < s.t_start <= 1.0:
    raise ConfigError(f"config.sample.t_start={s.t_start} must be in (0, 1]")
  if s.decode not in DECODERS:
    raise ConfigError(f"config.sample.decode={s.decode!r} is not valid; choose one of "
                      f"{list(DECODERS)}")
  if s.sampler not in SAMPLERS:
    raise ConfigError(f"config.sample.sampler={s.sampler!r} is not valid; choose one of "
                      f"{list(SAMPLERS)}")
  if not s.guidance >= 0.0:
    raise ConfigError(f"config.sample.guidance={s.guidance} must be >= 0")
  if s.label >= 0 and not config.model.num_classes:
    raise ConfigError(f"config.sample.label={s.label} needs a class-conditional model "
                      "(config.model.num_classes > 0)")
  if s.label >= config.model.num_classes > 0:
    raise ConfigError(f"config.sample.label={s.label} must be < config.model.num_classes="
                      f"{config.model.num_classes}")
  if s.interpolation not in INTERPOLATIONS:
    raise ConfigError(f"config.sample.interpolation={s.interpolation!r} is not valid; choose "
                      f"one of {list(INTERPOLATIONS)}")
  if not s.classifier_lr > 0:
    raise ConfigError(f"config.sample.classifier_lr={s.classifier_lr} must be > 0")
  if s.inception_weights:
    from vdmrep import inception  # keeps TensorFlow out of every other import path
    inception.check_path(s.inception_weights, "config.sample.inception_weights")


# -- the update and the loop ------------------------------------------------------
def ancestral_step(z_t, eps_hat, gamma_s, gamma_t, noise):
  """z_s ~ q(z_s | z_t, x = x_hat(z_t)) for s < t.

  Args:
    z_t, eps_hat, noise: [B, ...]; noise ~ N(0, I).
    gamma_s, gamma_t: gamma at s and t (gamma_s < gamma_t): scalars, or arrays of z's
      shape for a per-pixel schedule (the update is elementwise).
  Returns:
    z_s [B, ...].
  """
  c = -jnp.expm1(gamma_s - gamma_t)
  sigma_t = jnp.sqrt(jax.nn.sigmoid(gamma_t))
  mean = jnp.sqrt(jax.nn.sigmoid(-gamma_s) / jax.nn.sigmoid(-gamma_t)) * (
      z_t - c * sigma_t * eps_hat)
  return mean + jnp.sqrt(c * jax.nn.sigmoid(gamma_s)) * noise


def ddim_step(z_t, eps_hat, gamma_s, gamma_t, noise=None):
  """The deterministic DDIM-style update z_s = alpha_s x_hat + sigma_s eps_hat.

  x_hat = (z_t - sigma_t eps_hat) / alpha_t, alpha^2 = sigmoid(-gamma), sigma^2 =
  sigmoid(gamma). Same arguments as `ancestral_step` (gammas scalars or broadcastable
  to z); `noise` is ignored.
  """
  del noise
  x_hat = (z_t - jnp.sqrt(jax.nn.sigmoid(gamma_t)) * eps_hat) * jnp.sqrt(
      1.0 + jnp.exp(gamma_t))  # 1 / alpha_t
  return jnp.sqrt(jax.nn.sigmoid(-gamma_s)) * x_hat + jnp.sqrt(jax.nn.sigmoid(gamma_s)) * eps_hat


_STEPS = {"ancestral": ancestral_step, "ddim": ddim_step}


def _broadcast_gamma(g, z):
  """gamma as given by gamma_fn (scalar, [B] or z's shape) -> (net input, update input).

  The network gets [B] (a per-pixel map's mean over pixels, as `VAEVDM.elbo_terms`
  feeds it in training); the update gets a shape that broadcasts against z.
  """
  g = jnp.asarray(g)
  b = z.shape[0]
  if g.ndim == 0:
    return jnp.broadcast_to(g, (b,)), g
  if g.ndim == 1:
    return g, g.reshape((b,) + (1,) * (z.ndim - 1))
  return jnp.mean(g.reshape(b, -1), axis=-1), g


def frame_steps(num_steps: int, num_frames: int) -> np.ndarray:
  """K step counts evenly spaced over [0, N] (0 = the starting z, N = z_0). int [K]."""
  return np.unique(np.round(np.linspace(0, num_steps, num_frames)).astype(np.int64))


def denoise(eps_fn, gamma_fn, z, key, *, num_steps: int, t_start: float = 1.0, frames=None,
            sampler: str = "ancestral"):
  """Runs `num_steps` updates from t = t_start down to t = 0 (one fori_loop).

  Args:
    eps_fn: (z [B, ...], gamma [B]) -> eps_hat [B, ...].
    gamma_fn: t (scalar) -> gamma(t): a scalar, [B], or z's shape (a per-pixel
      schedule); the updates are elementwise in gamma.
    z: [B, ...] the starting latent z_{t_start}.
    key: PRNG key; step k draws its noise from fold_in(key, k).
    num_steps: N >= 1 (static).
    t_start: the starting time in (0, 1] (static).
    frames: optional static sequence of step counts at which to record z
      (`frame_steps`); 0 records the starting z.
    sampler: "ancestral" (`ancestral_step`) or "ddim" (`ddim_step`, no noise drawn).
  Returns:
    (z_0 [B, ...], recorded [K, B, ...] or None).
  """
  if sampler not in _STEPS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
  update = _STEPS[sampler]
  n = int(num_steps)
  if frames is None:
    slot, recorded = np.full(n + 1, -1), jnp.zeros((1,) + z.shape, z.dtype)
  else:
    slot = np.full(n + 1, -1)
    slot[np.asarray(frames)] = np.arange(len(frames))
    recorded = jnp.zeros((len(frames),) + z.shape, z.dtype)
  slot = jnp.asarray(slot)

  def record(buf, k, z):
    j = slot[k]
    safe = jnp.maximum(j, 0)
    return buf.at[safe].set(jnp.where(j >= 0, z, buf[safe]))

  def body(k, carry):
    z_t, buf = carry
    t = t_start * (n - k) / n
    s = t_start * (n - k - 1) / n
    net_g, g_t = _broadcast_gamma(gamma_fn(t), z_t)
    _, g_s = _broadcast_gamma(gamma_fn(s), z_t)
    eps_hat = eps_fn(z_t, net_g)
    noise = None
    if sampler == "ancestral":
      noise = jax.random.normal(jax.random.fold_in(key, k), z_t.shape, z_t.dtype)
    z_s = update(z_t, eps_hat, g_s, g_t, noise)
    return z_s, record(buf, k + 1, z_s)

  z_0, recorded = jax.lax.fori_loop(0, n, body, (z, record(recorded, 0, z)))
  return z_0, (None if frames is None else recorded)


def decode(model, params, z_0, key, method: str = "sample", w=None):
  """Integer pixels [B, H, W, C] (int32) from z_0 via the discretised decoder p(x | z_0).

  Materialises vocab_size logits per pixel (B H W C V floats): lower the batch size for
  large images. `w` sets a per-pixel schedule's gamma_0.
  """
  g_0 = _gamma(model, params, 0.0, w, z_0.shape[0])
  logits = losses.reconstruction_logits(z_0 / losses.alpha(g_0), g_0, model.vocab_size)
  if method == "argmax":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _gamma(model, params, t, w, batch):
  """gamma at scalar t: a scalar, or [B, H, W, C] for a per-pixel schedule gamma(t, w)."""
  t = jnp.asarray(t, jnp.float32)
  if getattr(model, "per_pixel_schedule", False):
    return model.gamma(params, jnp.full((batch,), t), w)
  return model.gamma(params, t)


def posterior_w(model, params, x_int, key, labels=None, deterministic: bool = False):
  """w ~ q(w | x[, y]) through the model's encoder: [B, D] (categorical: the discrete code).

  `deterministic`: w = the encoder mean, the w a deterministic encoder
  (`config.collapse.deterministic_encoder`) was trained with; its log-variance head
  was never trained, so drawing from it would condition on noise training never saw.
  """
  if deterministic:
    return (model.encode(params, x_int) if labels is None
            else model.encode(params, x_int, labels))[0]
  return model.sample_posterior(params, x_int, key, labels)


def prior_w(model, params, key, batch: int):
  """w ~ p(w) [B, D] (the model's prior), or None for an unconditional model."""
  if not model.conditional:
    return None
  return model.sample_prior(params, key, batch)


def guided_eps_fn(model, params, w=None, labels=None, guidance: float = 0.0):
  """(z, gamma [B]) -> eps_hat with classifier-free guidance of weight `guidance` (static).

  eps = (1 + s) eps_hat(z; w, y) - s eps_hat(z; w, null): one network call on the
  doubled batch. s = 0, no labels, or a model without classes: the plain eps_hat.
  """
  if not guidance or labels is None or not getattr(model, "num_classes", 0):
    return lambda z, g: model.eps_hat(params, z, g, w, labels)

  def eps_fn(z, g):
    two = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)
    y2 = jnp.concatenate([labels, jnp.full_like(labels, model.null_label)])
    e = model.eps_hat(params, two(z), two(g), two(w), y2)
    e_cond, e_uncond = jnp.split(e, 2, axis=0)
    return (1.0 + guidance) * e_cond - guidance * e_uncond
  return eps_fn


def sample_from(model, params, key, w, z_start, *, num_steps, t_start=1.0, frames=None,
                decode_method="sample", sampler="ancestral", labels=None, guidance=0.0):
  """Denoises given latents with given w (and labels [B] or None, guidance weight):
  (x_int [B, H, W, C], recorded z or None)."""
  if model.score_net is None:  # a VAE decoder: p(x | w) directly, nothing to denoise
    return model.sample(params, w, z_start.shape[1:], key, decode_method), None
  k_loop, k_dec = jax.random.split(key)
  eps_fn = guided_eps_fn(model, params, w, labels, guidance)
  gamma_fn = lambda t: _gamma(model, params, t, w, z_start.shape[0])
  z_0, recorded = denoise(eps_fn, gamma_fn, z_start, k_loop, num_steps=num_steps,
                          t_start=t_start, frames=frames, sampler=sampler)
  return decode(model, params, z_0, k_dec, decode_method, w), recorded


def reconstruction_steps(num_steps: int, t_start: float) -> int:
  """Steps from t_start to 0 on the same grid spacing as an N-step sampler from t = 1."""
  return max(1, int(round(num_steps * t_start)))


def run_mode(model, params, key, x_int, *, mode, num_steps, t_start=1.0, frames=None,
             decode_method="sample", sampler="ancestral", labels=None, guidance=0.0,
             deterministic_encoder=False):
  """One batch of one mode; x_int [B, H, W, C] gives the inputs (only its shape for
  `unconditional`). Returns (x_int samples [B, H, W, C], recorded z [K, B, ...] or None).

  `num_steps` is the whole-path step count N; reconstruction takes round(N t_start)
  steps, so all modes share one grid spacing. `labels` [B] int conditions a
  class-conditional model (the encoder too, if it takes labels); `guidance` is the
  classifier-free guidance weight.
  """
  k_w, k_z, k_run = jax.random.split(key, 3)
  shape = x_int.shape
  if model.score_net is None and mode in MODES:  # a VAE: p(x | w) directly, no denoising
    w = (prior_w(model, params, k_w, shape[0]) if mode == "unconditional"
         else posterior_w(model, params, x_int, k_w, deterministic=deterministic_encoder))
    return model.sample(params, w, shape[1:], k_run, decode_method), None
  if mode == "unconditional":
    w, t0 = prior_w(model, params, k_w, shape[0]), 1.0
    z = jax.random.normal(k_z, shape)
  elif mode == "guided":
    w, t0 = (posterior_w(model, params, x_int, k_w, labels, deterministic_encoder)
             if model.conditional else None), 1.0
    z = jax.random.normal(k_z, shape)
  elif mode == "reconstruction":
    w = (posterior_w(model, params, x_int, k_w, labels, deterministic_encoder)
         if model.conditional else None)
    t0 = float(t_start)
    g = _gamma(model, params, t0, w, shape[0])
    f = losses.data_to_model_scale(x_int, model.vocab_size)
    z = losses.alpha(g) * f + jnp.sqrt(losses.sigma2(g)) * jax.random.normal(k_z, shape)
    num_steps = reconstruction_steps(num_steps, t0)
  else:
    raise ValueError(f"unknown sampling mode {mode!r}; choose one of {list(MODES)}")
  return sample_from(model, params, k_run, w, z, num_steps=num_steps, t_start=t0,
                     frames=frames, decode_method=decode_method, sampler=sampler,
                     labels=labels, guidance=guidance)


# -- host-side drivers: batched, jitted, sharded over the data mesh -----------------
# One compiled program per (model, mode, N, t_start, frames, decoder, sampler, guidance,
# labels given or not); the batch's
# sharding (from `parallel.global_batch`) decides how XLA splits the work.
_run_mode_jit = jax.jit(run_mode, static_argnums=(0,),
                        static_argnames=("mode", "num_steps", "t_start", "frames",
                                         "decode_method", "sampler", "guidance",
                                         "deterministic_encoder"))


def _to_host(x):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def generate(model, params, key, *, mode, images=None, num=None, image_shape=None,
             batch_size=256, num_steps=1000, t_start=1.0, num_frames=0,
             decode_method="sample", mesh=None, sampler="ancestral", labels=None,
             guidance=0.0, deterministic_encoder=False):
  """Samples of one mode over many batches (batch i uses fold_in(key, i)).

  Args:
    images: uint8 [N, H, W, C] inputs for `guided` / `reconstruction`.
    num, image_shape: how many unconditional samples, of shape (H, W, C).
    num_frames: K > 0 also returns K recorded latents per sample (the trajectory) for a
      diffusion decoder; a VAE decoder has no trajectory and returns none.
    sampler, guidance: see `denoise` and `guided_eps_fn`.
    labels: optional int [N] class labels (a class-conditional model).
    deterministic_encoder: guided / reconstruction modes condition on w = encoder mean.
  Returns:
    dict: "images" uint8/int [N, H, W, C]; with num_frames and a diffusion decoder,
    "frames" float [K, N, H, W, C] (z in model scale) and "frame_t" [K] their times.
  """
  if mode == "unconditional":
    inputs = np.zeros((num,) + tuple(image_shape), np.uint8)
  else:
    inputs = np.asarray(images)
  t0 = 1.0 if mode != "reconstruction" else float(t_start)
  n_run = num_steps if mode != "reconstruction" else reconstruction_steps(num_steps, t0)
  frames = tuple(frame_steps(n_run, num_frames).tolist()) if num_frames else None
  label_batches = None
  if labels is not None:
    labels = np.broadcast_to(np.asarray(labels, np.int32), (len(inputs),))
    label_batches = (lab for lab, _ in data_lib.eval_batches(labels, batch_size))
  outs, recs = [], []
  for i, (batch, mask) in enumerate(data_lib.eval_batches(inputs, batch_size)):
    keep = mask > 0
    lab = None if label_batches is None else next(label_batches)
    if mesh is not None:
      per = batch_size // jax.process_count()
      mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
      batch = parallel.global_batch(mesh, batch[mine])
      lab = None if lab is None else parallel.global_batch(mesh, lab[mine])
    x, rec = _run_mode_jit(model, params, jax.random.fold_in(key, i), batch, mode=mode,
                           num_steps=int(num_steps), t_start=float(t_start), frames=frames,
                           decode_method=decode_method, sampler=sampler, labels=lab,
                           guidance=float(guidance),
                           deterministic_encoder=bool(deterministic_encoder))
    outs.append(_to_host(x)[keep])
    if rec is not None:
      recs.append(_to_host(rec)[:, keep])
  dtype = np.uint8 if model.vocab_size <= 256 else np.int32
  out = {"images": np.concatenate(outs).astype(dtype)}
  if recs:
    out["frames"] = np.concatenate(recs, axis=1)
    out["frame_t"] = t0 * (1.0 - np.asarray(frames, np.float64) / n_run)
  return out


def interpolate(w_a, w_b, alphas, method: str = "slerp"):
  """Latents between w_a and w_b ([P, D] each) at coefficients alphas [S] -> [P, S, D].

  slerp keeps the norm profile of Gaussian latents (a straight line through the middle
  of N(0, I) passes through atypically short vectors); it falls back to the line when
  the two are (anti)parallel.
  """
  w_a, w_b = jnp.asarray(w_a), jnp.asarray(w_b)
  a = jnp.asarray(alphas, jnp.float32)[None, :, None]
  lin = (1.0 - a) * w_a[:, None] + a * w_b[:, None]
  if method == "linear":
    return lin
  na, nb = jnp.linalg.norm(w_a, axis=-1), jnp.linalg.norm(w_b, axis=-1)
  cos = jnp.clip(jnp.sum(w_a * w_b, -1) / jnp.maximum(na * nb, 1e-12), -1.0, 1.0)
  omega = jnp.arccos(cos)[:, None, None]
  so = jnp.sin(omega)
  safe = jnp.where(so > 1e-6, so, 1.0)
  sl = (jnp.sin((1.0 - a) * omega) * w_a[:, None] + jnp.sin(a * omega) * w_b[:, None]) / safe
  return jnp.where(so > 1e-6, sl, lin)


def interpolation_samples(model, params, key, x_a, x_b, *, steps, num_steps, method="slerp",
                          decode_method="sample"):
  """Samples along a path in w between the encoder means of x_a and x_b ([P, H, W, C]).

  Every image of a row shares all the sampler's randomness (z_1, the noise of every
  step and of the decoder), so only w changes along the row.
  Returns int [P, steps, H, W, C] (the endpoints are samples too, not the inputs).
  """
  k_z, k_run = jax.random.split(key)
  mean_a, _ = model.encode(params, x_a)
  mean_b, _ = model.encode(params, x_b)
  w = interpolate(mean_a, mean_b, jnp.linspace(0.0, 1.0, steps), method)  # [P, S, D]
  z = jax.random.normal(k_z, x_a.shape)
  one = lambda w_j: sample_from(model, params, k_run, w_j, z, num_steps=num_steps,
                                decode_method=decode_method)[0]
  return jnp.swapaxes(jax.vmap(one)(jnp.swapaxes(w, 0, 1)), 0, 1)


_interpolation_jit = jax.jit(interpolation_samples, static_argnums=(0,),
                             static_argnames=("steps", "num_steps", "method", "decode_method"))


def generate_interpolation(model, params, key, x_a, x_b, *, steps, num_steps, method="slerp",
                           decode_method="sample"):
  """`interpolation_samples` compiled once per setting; host numpy [P, steps, H, W, C]."""
  return _to_host(_interpolation_jit(model, params, key, x_a, x_b, steps=steps,
                                     num_steps=num_steps, method=method,
                                     decode_method=decode_method))
