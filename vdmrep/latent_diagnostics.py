"""Does the latent pay for itself? Rate, aggregate-posterior mismatch and per-band savings.

Pure host-numpy functions over arrays an evaluation already holds (N eval images, S
draws of w per image), plus the jitted prior log-density they need. Units: nats per image
unless a name says bits.

  * Rate: the bound's KL term, E_x E_q[log q(w|x) - log p(w)] (from the ELBO terms).
  * Aggregate-posterior mismatch KL(q(w) || p(w)), q(w) = (1/N) sum_j q(w|x_j) the
    empirical aggregate posterior of the eval split: estimated as the mean over draws
    w_i ~ q(w|x_i) of log q(w_i) - log p(w_i), log q(w_i) by a logsumexp over all N
    components (the estimator of `diagnostics.mutual_information`; rate = I_q(x; w) +
    mismatch holds term by term for these estimates). For the latent diffusion prior
    log p is its lower bound, so the figure is an upper estimate.
  * Per-band savings: the usefulness curve (diffusion loss at t with the image's own w
    and with another image's w) integrated over bands of t: band [a, b] contributes
    (b - a) * mean_t(swapped - own) nats to the diffusion term's gap. Their sum is the
    whole saving; "net" = saving - rate says whether the latent pays.
"""
from __future__ import annotations

import functools
import math

import jax
import numpy as np

from vdmrep import diagnostics, parallel


def _mean_se(v):
  v = np.asarray(v, np.float64)
  n = v.size
  return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"))


def gaussian_log_aggregate(mean, logvar, w, chunk: int = 1024) -> np.ndarray:
  """log q(w) = log (1/N) sum_j N(w; mean_j, exp(logvar_j)) for draws w [S, N, D]: [S, N]."""
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  w = np.asarray(w, np.float64)
  out = np.empty(w.shape[:2])
  for s in range(w.shape[0]):
    for a in range(0, w.shape[1], chunk):
      m = diagnostics._log_density_matrix(w[s, a:a + chunk], mean, logvar)
      top = m.max(axis=1, keepdims=True)
      out[s, a:a + chunk] = top[:, 0] + np.log(np.exp(m - top).sum(1)) - math.log(len(mean))
  return out


def categorical_log_aggregate(logq, codes, chunk: int = 128) -> np.ndarray:
  """log q(c) = log (1/N) sum_j prod_m q_j(c_m) for codes [S, N, M] (ints): [S, N].

  Args:
    logq: [N, M, K] log-probabilities of each image's posterior.
    codes: [S, N, M] category indices drawn from them.
    chunk: draws scored at once; memory is N x chunk x M float64 (all N draws at once
      would be N^2 M: 24 GiB for 10,000 images of 32 groups).
  """
  logq = np.asarray(logq, np.float64)
  n, m, k = logq.shape
  flat = logq.reshape(n, m * k)
  out = np.empty(codes.shape[:2])
  for s in range(codes.shape[0]):
    idx = codes[s] + np.arange(m)[None] * k  # [N, M] flat indices of the chosen categories
    for a in range(0, idx.shape[0], chunk):
      mat = flat[:, idx[a:a + chunk]].sum(-1).T  # [chunk draws, N components]
      top = mat.max(1, keepdims=True)
      out[s, a:a + chunk] = top[:, 0] + np.log(np.exp(mat - top).sum(1)) - math.log(n)
  return out


def categorical_own_log_prob(logq, codes) -> np.ndarray:
  """log q(c_i | x_i) for codes [S, N, M]: [S, N]."""
  logq = np.asarray(logq, np.float64)
  return np.take_along_axis(logq[None], codes[..., None], axis=-1)[..., 0].sum(-1)


def draw_codes(logq, num_samples: int, seed) -> np.ndarray:
  """S categorical codes per image from logq [N, M, K] (Gumbel-max, numpy): [S, N, M]."""
  g = np.random.default_rng(seed).gumbel(size=(num_samples,) + np.shape(logq))
  return np.argmax(np.asarray(logq)[None] + g, axis=-1)


@functools.lru_cache(maxsize=8)
def make_prior_log_prob_fn(model, mesh):
  repl = parallel.replicated(mesh)
  return jax.jit(model.prior_log_prob, in_shardings=(repl, repl, repl), out_shardings=repl)


def prior_log_prob(model, params, w, key, mesh, chunk: int = 1024) -> np.ndarray:
  """log p(w) (a lower bound for the diffusion prior) of draws w [S, N, D]: [S, N]."""
  fn = make_prior_log_prob_fn(model, mesh)
  flat = np.asarray(w, np.float32).reshape(-1, w.shape[-1])
  out = [np.asarray(fn(params, flat[a:a + chunk], jax.random.fold_in(key, a)), np.float64)
         for a in range(0, len(flat), chunk)]
  return np.concatenate(out).reshape(w.shape[:2])


def mismatch(log_q_aggregate, log_p) -> dict:
  """KL(q(w) || p(w)) estimate from [S, N] arrays; s.e. over images."""
  m, se = _mean_se(np.mean(log_q_aggregate - log_p, axis=0))
  return {"aggregate_mismatch_nats": m, "aggregate_mismatch_nats_se": se}


def categorical_mi(logq, codes, log_aggregate=None) -> dict:
  """I_q(x; w) in nats for a categorical latent (the aggregate logsumexp estimator);
  `log_aggregate`: categorical_log_aggregate(logq, codes) when the caller has it."""
  if log_aggregate is None:
    log_aggregate = categorical_log_aggregate(logq, codes)
  per = np.mean(categorical_own_log_prob(logq, codes) - log_aggregate, axis=0)
  m, se = _mean_se(per)
  return {"mi_nats": m, "mi_nats_se": se, "mi_upper_nats": math.log(len(per)),
          "mi_samples": int(codes.shape[0])}


def band_savings(use: dict, rate_nats: float, num_dims: int, gamma=None, bands: int = 0,
                 term: str = "diffusion") -> dict:
  """Per-band decoder-loss saving of the own w over a swapped w, beside the rate.

  Args:
    use: `diagnostics.usefulness` output (t [T] bin midpoints of [0, 1], gap_bpd [T],
      gap_bpd_se [T], in bits/dim).
    rate_nats: the KL term, nats/image.
    num_dims: H W C.
    gamma: optional t -> scalar gamma(t) to label each band with its log-SNR range.
    bands: groups of consecutive t bins (0 = one band per bin).
    term: the decoder term `use` measured: "diffusion", or "recon" for a VAE decoder
      (one band: its loss does not depend on t).
  Returns:
    t_lo, t_hi, logsnr_hi, logsnr_lo, saving_nats, saving_nats_se (lists over bands),
    saving_total_nats, rate_nats, net_nats = saving_total - rate, and term.
  """
  t = np.asarray(use["t"], np.float64)
  n_t = len(t)
  per_bin = np.asarray(use["gap_bpd"], np.float64) * num_dims * math.log(2.0) / n_t
  se_bin = np.asarray(use["gap_bpd_se"], np.float64) * num_dims * math.log(2.0) / n_t
  groups = np.array_split(np.arange(n_t), bands if 0 < bands < n_t else n_t)
  out = {k: [] for k in ("t_lo", "t_hi", "logsnr_hi", "logsnr_lo", "saving_nats",
                         "saving_nats_se")}
  for g in groups:
    lo, hi = g[0] / n_t, (g[-1] + 1) / n_t
    out["t_lo"].append(lo)
    out["t_hi"].append(hi)
    out["logsnr_hi"].append(-float(gamma(lo)) if gamma else float("nan"))
    out["logsnr_lo"].append(-float(gamma(hi)) if gamma else float("nan"))
    out["saving_nats"].append(float(per_bin[g].sum()))
    # bins are paired over the same images: an upper bound (bins treated as independent
    # would be smaller or larger; this adds their s.e. linearly, a conservative figure)
    out["saving_nats_se"].append(float(se_bin[g].sum()))
  total = float(per_bin.sum())
  out.update(saving_total_nats=total, rate_nats=float(rate_nats),
             net_nats=total - float(rate_nats), term=term)
  return out


def markdown(bands: dict) -> list:
  """Markdown lines of the per-band table."""
  diffusion = bands.get("term", "diffusion") == "diffusion"
  what = ("the diffusion term rises when w is swapped for another image's, per band of t "
          "(log-SNR range where the schedule is scalar)" if diffusion else
          "the decoder's -log p(x | w) rises when w is swapped for another image's (no t)")
  lines = ["", "## Does w pay? (nats/image)", "",
           f"Saving: how much {what}; rate: the bound's KL "
           "term; net = total saving - rate (> 0: the latent pays for itself).", "",
           "| t | log-SNR | saving | s.e. |", "|---|---|---|---|"]
  for i in range(len(bands["t_lo"])):
    snr = (f"{bands['logsnr_hi'][i]:.2f} .. {bands['logsnr_lo'][i]:.2f}"
           if math.isfinite(bands["logsnr_hi"][i]) else "per pixel" if diffusion else "-")
    lines.append(f"| {bands['t_lo'][i]:.2f}-{bands['t_hi'][i]:.2f} | {snr} | "
                 f"{bands['saving_nats'][i]:.4g} | {bands['saving_nats_se'][i]:.2g} |")
  lines.append(f"| total | | {bands['saving_total_nats']:.4g} | |")
  lines += ["", f"- rate {bands['rate_nats']:.4g}, net {bands['net_nats']:.4g} nats/image"]
  return lines
