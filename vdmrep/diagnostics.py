"""Posterior-collapse diagnostics: encoder KL, active units, I_q(x; w), usefulness of w.

Everything except `batch_stats` and the usefulness pass works on host numpy arrays of
encoder means and log-variances ([N, D] for N eval images), so a reader can recompute
each number from `latents.npz` (see `tests/test_evaluate.py`, which does).

Definitions (N images x_i, D latent dimensions, q(w|x_i) = N(mu_i, diag exp(logvar_i))):
  * KL: KL(q(w|x_i) || N(0, I)) in nats, per image and per dimension (closed form).
  * Active units (Burda et al. 2016): dimension d is active when the variance over the
    eval split of E_q[w_d|x] = mu_id exceeds a threshold (0.01 by default); variance
    with ddof = 0.
  * Mutual information I_q(x; w) under the empirical data distribution (Hoffman & Johnson
    2016): E_i E_{w~q(w|x_i)} [log q(w|x_i) - log q(w)] with the aggregate posterior
    q(w) = (1/N) sum_j q(w|x_j) over the whole eval split. Monte Carlo over S draws of w
    per image; logsumexp over all N components. Each term is <= log N (the own
    component is one of the N), so the estimate never exceeds log N: a model whose
    true MI is above log N reads as ~log N.
  * Usefulness of w: the diffusion loss at fixed t with the image's own w versus the w
    of another image (same z_t, same eps); a decoder that ignores w shows no gap.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vdmrep import data as data_lib
from vdmrep import parallel


# -- during training (inside jit, no host sync) --------------------------------------
def batch_stats(terms, threshold: float) -> dict:
  """Cheap collapse statistics of one training batch (scalars, for the log-interval mean).

  Args:
    terms: `VAEVDM.elbo_terms` output (`ELBOTerms`; reads mean, kl, kl_per_dim).
    threshold: active-unit variance threshold.
  Returns:
    {} when unconditional, else: active_units_batch (dims whose encoder mean varies by
    more than `threshold` over this batch: a noisy, batch-size-dependent proxy of the
    eval-split count), kl_nats_per_dim (batch-mean KL / D), kl_max_dim_nats (largest
    batch-mean per-dimension KL; only where the KL factorises over dimensions).
  """
  if terms.mean is None:
    return {}
  mean = terms.mean
  d = mean.shape[-1]
  # One-pass variance: E[m^2] - E[m]^2 needs two independent batch sums, which XLA folds
  # into the gradients' all-reduce; jnp.var's two dependent passes cost a second one.
  var = jnp.maximum(jnp.mean(mean ** 2, axis=0) - jnp.mean(mean, axis=0) ** 2, 0.0)
  return {
      "active_units_batch": jnp.sum(var > threshold).astype(jnp.float32),
      "kl_nats_per_dim": jnp.mean(terms.kl) / d,
      **({} if terms.kl_per_dim is None
         else {"kl_max_dim_nats": jnp.max(jnp.mean(terms.kl_per_dim, axis=0))}),
  }


def batch_mutual_information(mean, logvar, w):
  """I_q(x; w) estimated on one batch (inside jit): scalar nats.

  mean_i [log q(w_i|x_i) - log (1/B) sum_j q(w_i|x_j)] with w_i ~ q(w|x_i), the batch
  as the empirical data distribution (He et al. 2019 track it to end aggressive
  inference); at most log B.
  """
  prec = jnp.exp(-logvar)
  # log N(w_i; mean_j, var_j) for all pairs: [B, B]
  logq = -0.5 * jnp.sum(jnp.log(2 * jnp.pi) + logvar[None] + jnp.square(w[:, None] - mean[None])
                        * prec[None], axis=-1)
  own = jnp.diagonal(logq)
  agg = jax.nn.logsumexp(logq, axis=1) - jnp.log(mean.shape[0])
  return jnp.mean(own - agg)


# -- encoder moments of a whole split --------------------------------------------------
@functools.lru_cache(maxsize=8)  # periodic evals reuse the compiled function
def make_encode_fn(model, mesh):
  repl = parallel.replicated(mesh)
  return jax.jit(model.encode, in_shardings=(repl, parallel.batch_sharded(mesh)),
                 out_shardings=(repl, repl))


def encode_split(encode_fn, params, images, batch_size, mesh):
  """(mean, logvar) of q(w|x) for every image: float32 [N, D] each (host numpy)."""
  means, logvars = [], []
  for batch, mask in data_lib.eval_batches(images, batch_size):
    m, lv = encode_fn(params, parallel.shard_full_batch(mesh, batch))
    keep = mask > 0
    means.append(np.asarray(m)[keep])
    logvars.append(np.asarray(lv)[keep])
  return np.concatenate(means), np.concatenate(logvars)


# -- statistics of encoder moments (host numpy, float64) ---------------------------------
def kl_per_dim(mean, logvar) -> np.ndarray:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per image and dimension: [N, D] nats."""
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  return 0.5 * (mean ** 2 + np.exp(logvar) - 1.0 - logvar)


def kl_summary(mean, logvar) -> dict:
  """Encoder KL: nats/image (mean, standard error), nats per dimension, [D] per-dim means."""
  kl = kl_per_dim(mean, logvar)
  per_image = kl.sum(axis=1)
  n, d = kl.shape
  return {"kl_nats": float(per_image.mean()),
          "kl_nats_se": float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
          "kl_nats_per_dim": float(per_image.mean() / d),
          "kl_per_dim_nats": kl.mean(axis=0)}


def active_units(mean, threshold: float):
  """(number of active dimensions, [D] variances over images of the encoder mean)."""
  var = np.var(np.asarray(mean, np.float64), axis=0)
  return int(np.sum(var > threshold)), var


def draw_latents(mean, logvar, num_samples: int, seed: int) -> np.ndarray:
  """S draws w ~ q(w|x_i) for every image: float64 [S, N, D] (numpy PCG64 from `seed`)."""
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  noise = np.random.default_rng(seed).standard_normal((num_samples,) + mean.shape)
  return mean + np.exp(0.5 * logvar) * noise


def _log_density_matrix(w, mean, logvar):
  """log N(w_i; mean_j, exp(logvar_j)) for all pairs: [M, N] (expanded square, matmuls)."""
  prec = np.exp(-logvar)
  const = -0.5 * (mean.shape[1] * math.log(2 * math.pi) + logvar.sum(1)
                  + (mean ** 2 * prec).sum(1))
  return const[None, :] - 0.5 * (w ** 2) @ prec.T + w @ (mean * prec).T


def mutual_information(mean, logvar, w, chunk: int = 1024) -> dict:
  """I_q(x; w) in nats with the aggregate-posterior logsumexp estimator (module docstring).

  Args:
    mean, logvar: [N, D] encoder moments of the whole eval split.
    w: [S, N, D] draws, w[s, i] ~ q(w|x_i).
    chunk: rows of the [chunk, N] log-density matrix held at once.
  Returns:
    mi_nats (mean over S x N terms), mi_nats_se (standard error over images of the
    per-image mean), mi_upper_nats = log N (the estimator's ceiling), mi_samples = S.
  """
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  w = np.asarray(w, np.float64)
  s, n, d = w.shape
  terms = np.empty((s, n))
  for k in range(s):
    for start in range(0, n, chunk):
      wi = w[k, start:start + chunk]
      mi, lvi = mean[start:start + chunk], logvar[start:start + chunk]
      own = -0.5 * np.sum(math.log(2 * math.pi) + lvi + (wi - mi) ** 2 * np.exp(-lvi), axis=1)
      logq = _log_density_matrix(wi, mean, logvar)
      top = logq.max(axis=1, keepdims=True)
      agg = top[:, 0] + np.log(np.exp(logq - top).sum(axis=1)) - math.log(n)
      terms[k, start:start + chunk] = own - agg
  per_image = terms.mean(axis=0)
  return {"mi_nats": float(per_image.mean()),
          "mi_nats_se": float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
          "mi_upper_nats": math.log(n), "mi_samples": s}


# -- usefulness of w to the decoder ---------------------------------------------------
def _usefulness_batch(params, x, other, key, ts, *, model, deterministic=False):
  """Decoder loss [T, B] nats at each t in `ts` with w of image i and with w of `other[i]`.

  The decoder loss is the diffusion term; a decoder without one (the classic VAE) has
  only its p(x | w) term, the same at every t. Both passes share w's draw, t, eps and
  z_t; only the conditioning latent differs. `deterministic`: w = the encoder mean (the
  w a deterministic encoder was trained with).
  """
  term = model.decoder_term
  k_w, k_t = jax.random.split(key)
  w = model.encode(params, x)[0] if deterministic else model.sample_posterior(params, x, k_w)
  w_other = w[other]
  b = x.shape[0]

  def at(args):
    t, k = args  # the same key k in both passes: same eps, a paired comparison
    tt = jnp.full((b,), t, jnp.float32)
    own = getattr(model.elbo_terms(params, x, k, t=tt, w=w), term)
    swapped = getattr(model.elbo_terms(params, x, k, t=tt, w=w_other), term)
    return own, swapped
  return jax.lax.map(at, (ts, jax.random.split(k_t, ts.shape[0])))


@functools.lru_cache(maxsize=8)
def make_usefulness_fn(model, mesh, deterministic=False):
  repl = parallel.replicated(mesh)
  return jax.jit(functools.partial(_usefulness_batch, model=model, deterministic=deterministic),
                 in_shardings=(repl, parallel.batch_sharded(mesh), repl, repl, repl),
                 out_shardings=(repl, repl))


def t_grid(num_t: int) -> np.ndarray:
  """Midpoints (i + 0.5) / T of T equal bins of [0, 1]: their mean is a midpoint-rule integral."""
  return (np.arange(num_t) + 0.5) / num_t


def usefulness(fn, params, images, key, *, num_t, batch_size, mesh, num_dims) -> dict:
  """The usefulness-of-w curve over `images` (units bits/dim, like the diffusion term).

  "Another image" is the next image in the same batch (a cyclic shift over the batch's
  real images, never a padded duplicate), so every image is paired with a different one.
  Returns t [T], own_bpd [T], swapped_bpd [T], gap_bpd [T] (swapped - own), gap_bpd_se
  [T] (paired standard error over images), and gap_mean_bpd: the gap averaged over the
  grid, a midpoint-rule estimate of how much the diffusion term rises when w is swapped.
  """
  ts = t_grid(num_t)
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  own_all, swap_all = [], []
  for i, (batch, mask) in enumerate(data_lib.eval_batches(images, batch_size)):
    n_real = int(mask.sum())
    other = np.arange(batch_size)
    other[:n_real] = (np.arange(n_real) + 1) % n_real
    own, swapped = fn(params, parallel.shard_full_batch(mesh, batch), other,
                      jax.random.fold_in(key, i), jnp.asarray(ts, jnp.float32))
    own_all.append(np.asarray(own, np.float64)[:, :n_real])
    swap_all.append(np.asarray(swapped, np.float64)[:, :n_real])
  own, swapped = np.concatenate(own_all, 1) * to_bpd, np.concatenate(swap_all, 1) * to_bpd
  gap = swapped - own
  n = gap.shape[1]
  se = gap.std(axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.full(num_t, np.nan)
  return {"t": ts, "own_bpd": own.mean(1), "swapped_bpd": swapped.mean(1),
          "gap_bpd": gap.mean(1), "gap_bpd_se": se, "gap_mean_bpd": float(gap.mean()),
          "num_images": n}
