"""The evaluation report: one JSON + one markdown file per eval, so tables can be built
from workdirs.

Layout of `report.json` (a study script reads `metrics`, flat name -> number):
  step, full (whether probes/OOD/pictures ran), evaluators (which ran), config (the whole
  config), dataset (source, note, num_train, num_eval), metrics, notes (what each number
  is), eval_key (what identifies the eval images), per_image (bpd [N] and histogram_bpd
  [N], bits/dim, in eval-image order: `paired_difference` pairs two reports with them),
  baselines, per_dim (kl_nats [D], mean_variance [D]), usefulness (t and curves, lists),
  probes (per feature set), ood (per OOD set), samples, pictures (paths relative to the
  workdir).
Metric columns (units in the names): bpd, bpd_se and {recon,prior,diffusion,kl}_bpd(_se)
(the beta = 1 ELBO, a bound; bound_kind says which q(w|x) it uses), eval_num_time_samples
(K), eval_seed; objective_bpd(_se), objective_step, objective_is_bound,
objective_not_bound_reason (the objective of the last trained step);
histogram_bpd(_se), histogram_k, uniform_bpd, levels_used, bpd_minus_histogram(_se);
kl_nats(_se), kl_nats_per_dim, latent_dim, active_units, active_threshold; mi_nats(_se),
mi_upper_nats, mi_samples; usefulness_gap_bpd; {encoder,random_encoder,pixels}_{logreg_acc,
logreg_acc_se,knn_acc,label_info_bits}; ood_auroc/<set>; sample-quality numbers.
Written to `workdir/reports/step<N>.{json,md}`; a full eval also to `workdir/report.*`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile

import numpy as np

NOTES = {
    "bpd": "negative ELBO with the encoder KL weighted by 1 (recon + prior + diffusion + "
           "KL), bits/dim, mean over eval images of K Monte Carlo draws each; an upper bound "
           "on -log2 p(x)/dim whatever the training objective. *_se: standard error over images.",
    "objective_bpd": "the objective training optimised, evaluated on the eval split at this "
                     "step (bits/dim); equal to bpd when it is the ELBO. When "
                     "objective_is_bound is false this number is NOT a bound on -log p(x).",
    "kl_nats": "the rate E_q[log q(w|x) - log p(w)], nats per image, eval mean: closed form "
               "for N(0, I) and categorical latents, else the ELBO evaluation's Monte Carlo "
               "estimate (its s.e. includes the Monte Carlo error).",
    "active_units": "dimensions d with Var_x(E_q[w_d|x]) > active_threshold over the eval split.",
    "mi_nats": "I_q(x; w) under the empirical eval distribution: mean over images i and "
               "draws w ~ q(w|x_i) of log q(w|x_i) - log((1/N) sum_j q(w|x_j)), the logsumexp "
               "over all N eval images; it cannot exceed mi_upper_nats = log N.",
    "aggregate_mismatch_nats": "KL(q(w) || p(w)), q(w) the aggregate posterior of the eval "
                               "images: mean over draws w_i ~ q(w|x_i) of log q(w_i) - "
                               "log p(w_i), log q by logsumexp over all N posteriors "
                               "(an upper estimate for the diffusion prior, whose log p is "
                               "a lower bound).",
    "net_nats": "saving_nats (decoder-loss rise when w is swapped, integrated over t, "
                "nats/image) minus the rate kl_nats: > 0 when the latent pays for itself.",
    "usefulness_gap_bpd": "decoder loss (the diffusion term; a VAE decoder: its p(x | w) "
                          "term) with another image's w minus with the image's own w (same "
                          "t, eps, z_t), averaged over the t grid, bits/dim; ~0 when the "
                          "decoder ignores w.",
    "probes": "logistic regression on standardised features (scaler fit on train; L2 "
              "strength C chosen by stratified cross-validation on train) and k-NN on the "
              "raw features, fit on train-split features, accuracy on the eval split; "
              "label_info_bits = H(y) - held-out cross-entropy of the logistic probe, bits "
              "(a lower-bound estimate of I(features; label)); features: encoder means, one draw "
              "w ~ q(w|x) per image (encoder_w: its I(w; label) <= I_q(x; w)), the same "
              "architecture at random init, raw pixels / 255.",
    "histogram_bpd": "per-pixel categorical fitted on the training split (add-k smoothing, "
                     "k = histogram_k), bits/dim of the same eval images; uniform_bpd = "
                     "log2(levels_used), the uniform model over the levels the data uses.",
    "bound_kind": "elbo: q(w|x) as trained; fitted_posterior_std: a deterministic encoder's "
                  "means with q(w|x) = N(mean, s^2 I), s fitted after training on training "
                  "images (a bound of the trained decoder, not what training optimised); "
                  "none: a point-mass posterior has no finite KL, so no bound.",
    "eval_noise": "bpd_se is over eval images for one eval seed and K draws per image; it "
                  "omits the spread between eval seeds and between training seeds. Compare "
                  "rows of one eval split with report.paired_difference (paired over images), "
                  "across training seeds with the seed sd.",
    "ood": "AUROC of the per-image ELBO (bits/dim) separating the OOD set from the eval split.",
}


def new(step: int, config, ds, *, full: bool) -> dict:
  return {"step": int(step), "full": bool(full),
          "config": json.loads(config.to_json_best_effort()),
          "dataset": {"source": ds.name, "note": ds.note, "num_train": len(ds.train_images),
                      "num_eval": len(ds.eval_images)},
          "notes": dict(NOTES)}


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.bool_, bool)):
    return bool(x)
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return None if not math.isfinite(float(x)) else float(x)
  return x


def _fmt(v, digits=4):
  if isinstance(v, bool) or v is None:
    return str(v)
  if isinstance(v, (int, np.integer)):
    return str(v)
  return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def _num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def markdown(rep: dict) -> str:
  """A human-readable summary of `rep`: every metric, with the "not a bound" flag inline."""
  m = rep["metrics"]
  cfg = rep["config"]
  lines = [f"# Evaluation at step {rep['step']} ({'full' if rep['full'] else 'periodic'})", "",
           f"Data: {rep['dataset']['source']}: {rep['dataset']['note']} "
           f"({rep['dataset']['num_train']} train, {m.get('num_images', '?')} eval images "
           f"used). Model: vdm={cfg['model']['vdm']}, encoder={cfg['model']['encoder']}.", ""]
  if "bpd" in m or "at_mean_bpd" in m:
    lines += ["## Likelihood (bits/dim)", "",
              f"K = {m.get('eval_num_time_samples')} Monte Carlo draws per image, eval seed "
              f"{m.get('eval_seed')}; s.e. over images (not over eval or training seeds).", "",
              "| quantity | value | s.e. | note |", "|---|---|---|---|"]
    kind = m.get("bound_kind", "elbo")
    if kind == "fitted_posterior_std":
      bound_note = (f"a bound with q(w|x) = N(mean, {m['fitted_posterior_std']:g}^2 I), s "
                    f"fitted after training on {m['posterior_fit_images']} train images "
                    "(deterministic encoder: not the trained posterior)")
    elif kind == "none":
      bound_note = "**no bound**: a point-mass posterior has no finite KL"
    else:
      bound_note = "true ELBO (beta = 1): a bound"
    for k in ("bpd", "recon_bpd", "prior_bpd", "diffusion_bpd", "kl_bpd"):
      if k in m:
        lines.append(f"| {k} | {_fmt(m[k])} | {_fmt(m[k + '_se'])} | "
                     f"{bound_note if k == 'bpd' else ''} |")
    if "at_mean_bpd" in m:
      lines.append(f"| decoder at w = mean (recon + prior + diffusion) | "
                   f"{_fmt(m['at_mean_bpd'])} | {_fmt(m['at_mean_bpd_se'])} | the w training "
                   "used; no KL: **not a bound** |")
    if "histogram_bpd" in m:
      lines.append(f"| per-pixel histogram (baseline) | {_fmt(m['histogram_bpd'])} | "
                   f"{_fmt(m['histogram_bpd_se'])} | fitted on the training split, add-k "
                   f"k = {m['histogram_k']:g} |")
      lines.append(f"| uniform over the {m['levels_used']} levels used | "
                   f"{_fmt(m['uniform_bpd'])} | 0 | "
                   + (f"the data uses {m['levels_used']} of {m['vocab_size']} levels: not "
                      "comparable with 8-bit bpd |" if m["levels_used"] < m["vocab_size"]
                      else "|"))
      if "bpd_minus_histogram" in m:
        lines.append(f"| model - histogram (paired over images) | "
                     f"{_fmt(m['bpd_minus_histogram'])} | {_fmt(m['bpd_minus_histogram_se'])} "
                     "| negative: the model beats pixel marginals |")
    if "objective_bpd" in m:
      flag = ("the ELBO itself" if m["objective_is_bound"] else
              f"**not a bound** ({m['objective_not_bound_reason']}); true ELBO: {_fmt(m['bpd'])}")
      lines.append(f"| trained objective (step {m.get('objective_step')}) | "
                   f"{_fmt(m['objective_bpd'])} | {_fmt(m['objective_bpd_se'])} | {flag} |")
      if not m["objective_is_bound"]:
        lines += ["", "The ELBO (beta = 1) above is a bound on -log2 p(x) per dimension for "
                  "any parameters; the trained objective's value is NOT a bound (training "
                  f"optimised something else: {m['objective_not_bound_reason']}). It is "
                  f"measured on {m.get('objective_num_images', '?')} eval images in "
                  "training-size batches, at the last trained step."]
      elif not m.get("run_trained_elbo_throughout", True):
        lines += ["", f"At the last trained step the objective is the ELBO; earlier in the "
                  f"run it was not ({m['run_not_elbo_reason']})."]
  if "active_units" in m:
    kl = (f"{_fmt(m['kl_nats'])} +- {_fmt(m['kl_nats_se'])} nats/image, "
          f"{_fmt(m['kl_nats_per_dim'])} nats/dimension" if _num(m.get("kl_nats"))
          else "infinite (point-mass posterior)")
    lines += ["", "## Collapse diagnostics", "",
              f"- encoder KL: {kl} (D = {m['latent_dim']}; q(w|x): {m.get('kl_kind')})",
              f"- active units: {m['active_units']} / {m['latent_dim']} "
              f"(Var_x E[w_d|x] > {m['active_threshold']})",
              f"- I_q(x; w): {_fmt(m['mi_nats'])} +- {_fmt(m['mi_nats_se'])} nats "
              f"(aggregate-posterior logsumexp estimator, {m['mi_samples']} draw(s)/image; "
              f"ceiling log N = {_fmt(m['mi_upper_nats'])})",
              f"- usefulness of w: swapping w raises the decoder loss by "
              f"{_fmt(m['usefulness_gap_bpd'])} bits/dim (mean over the t grid)", "",
              "| t | own w (bpd) | other w (bpd) | gap | gap s.e. |", "|---|---|---|---|---|"]
    u = rep["usefulness"]
    for i, t in enumerate(u["t"]):
      lines.append(f"| {t:.3f} | {_fmt(u['own_bpd'][i])} | {_fmt(u['swapped_bpd'][i])} | "
                   f"{_fmt(u['gap_bpd'][i])} | {_fmt(u['gap_bpd_se'][i])} |")
  if rep.get("bands"):
    from vdmrep import latent_diagnostics
    lines += latent_diagnostics.markdown(rep["bands"])
    if "aggregate_mismatch_nats" in m:  # absent for a point-mass posterior
      lines.append(f"- aggregate-posterior mismatch KL(q(w) || p(w)): "
                   f"{_fmt(m['aggregate_mismatch_nats'])} +- "
                   f"{_fmt(m['aggregate_mismatch_nats_se'])} nats (draws of the MI estimate; "
                   "logsumexp aggregate over the eval images)")
    if "committed_rate_nats" in m:
      lines.append(f"- committed rate (capped posterior std): delta = "
                   f"{_fmt(m['committed_rate_nats'])} nats/image")
  if rep.get("probes"):
    p = rep["probes"]
    lines += ["", f"## Probes (fit on {p['num_train']} train, scored on {p['num_eval']} eval)",
              "", "Logistic: standardised features, C by cross-validation on train. "
              "I(features; label): label entropy minus the logistic probe's held-out "
              "cross-entropy, bits (a lower-bound estimate). encoder: the means of q(w|x); "
              "encoder_w: one draw w ~ q(w|x) per image, whose I(w; label) <= I_q(x; w).", "",
              "| features | logistic acc (s.e.) | C | k-NN acc | I(features; label) bits |",
              "|---|---|---|---|---|"]
    for name, r in p["results"].items():
      conv = "" if r["logreg_converged"] else " (lbfgs not converged)"
      lines.append(f"| {name} | {_fmt(r['logreg_acc'])} ({_fmt(r['logreg_acc_se'])}){conv} | "
                   f"{_fmt(r['logreg_c'])} | {_fmt(r['knn_acc'])} | "
                   f"{_fmt(r['label_info_bits'])} |")
  if rep.get("ood"):
    lines += ["", "## OOD (per-image bound as score)", "",
              "| OOD set | AUROC | n OOD | bpd OOD (s.e.) | bpd in |", "|---|---|---|---|---|"]
    for name, r in rep["ood"].items():
      lines.append(f"| {name} | {_fmt(r['auroc'])} | {r['num_ood']} | {_fmt(r['ood_bpd'])} "
                   f"({_fmt(r['ood_bpd_se'])}) | {_fmt(r['in_bpd'])} |")
  if "fd_classifier" in m:
    lines += ["", "## Samples", "",
              f"- Frechet distance (classifier features) of samples vs train: "
              f"{_fmt(m['fd_classifier'])}; floor (eval vs train, the one that matters): "
              f"{_fmt(m['fd_classifier_eval_vs_train'])}; two train halves: "
              f"{_fmt(m['fd_classifier_floor_real_halves'])}"]
  if rep.get("pictures"):
    lines += ["", "## Pictures", ""] + [f"- {k}: `{v}`" for k, v in rep["pictures"].items()]
  return "\n".join(lines) + "\n"


def one_line(rep: dict) -> str:
  """The console summary line: 'eval step N: bpd X +- SE (terms); encoder KL K nats/image'."""
  m = rep["metrics"]
  if "bpd" not in m:
    return f"eval step {rep['step']}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()
                                                    if _num(v))
  if "recon_bpd" in m:
    line = (f"eval step {rep['step']}: bpd {_fmt(m['bpd'])} +- {_fmt(m['bpd_se'])} "
            f"(recon {_fmt(m['recon_bpd'])}, prior {_fmt(m['prior_bpd'])}, "
            f"diffusion {_fmt(m['diffusion_bpd'])}, kl {_fmt(m['kl_bpd'])})")
  else:  # a point-mass posterior: no bound, the decoder at w = mean
    line = (f"eval step {rep['step']}: no bound (point-mass posterior); decoder at w = mean "
            f"{_fmt(m.get('at_mean_bpd'))} +- {_fmt(m.get('at_mean_bpd_se'))} bpd (not a bound)")
  if m.get("bound_kind") not in (None, "elbo"):
    line += f" [{m['bound_kind']}]"
  if "histogram_bpd" in m:
    line += f"; histogram baseline {_fmt(m['histogram_bpd'])}"
  if _num(m.get("kl_nats")):
    line += f"; encoder KL {m['kl_nats']:.3f} nats/image"
  if "active_units" in m:
    line += f", {m['active_units']}/{m['latent_dim']} active units, MI {m['mi_nats']:.3f} nats"
  if "objective_is_bound" in m and not m["objective_is_bound"]:
    line += (f"  [trained objective {m['objective_bpd']:.4f} bpd is not a bound: "
             f"{m['objective_not_bound_reason']}]")
  return line


# -- comparing two reports -------------------------------------------------------------
def paired_difference(rep_a, rep_b, key: str = "bpd") -> dict:
  """Mean and standard error of per-image `key` of report A minus report B.

  rep_a, rep_b: report dicts or paths of report.json files whose `eval_key` agrees (the
  same eval images in the same order). Each image's difference is one draw: the
  standard error is sd(differences) / sqrt(N), which removes the image-to-image spread
  both share (an unpaired s.e. of the difference, sqrt(se_a^2 + se_b^2), does not).
  It is the eval noise of one pair of trained models only; a claim about training
  configurations needs the spread over training seeds.
  Returns {"diff", "se", "n", "key"}; raises ValueError when the eval keys differ or
  per-image values are missing.
  """
  reps = []
  for r in (rep_a, rep_b):
    if isinstance(r, str):
      with open(r) as fh:
        r = json.load(fh)
    reps.append(r)
  a, b = reps
  if a.get("eval_key") is None or a.get("eval_key") != b.get("eval_key"):
    raise ValueError(f"paired_difference: the reports were evaluated on different images "
                     f"(eval_key {a.get('eval_key')} vs {b.get('eval_key')})")
  try:
    xa = np.asarray(a["per_image"][key], np.float64)
    xb = np.asarray(b["per_image"][key], np.float64)
  except KeyError:
    raise ValueError(f"paired_difference: per_image.{key} missing from a report") from None
  d = xa - xb
  n = len(d)
  return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1
          else float("nan"), "n": n, "key": key}


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write(workdir: str, rep: dict) -> None:
  """Writes reports/step<N>.{json,md}; a full eval also report.{json,md} (the latest)."""
  text, md = json.dumps(_jsonable(rep), indent=1), markdown(rep)
  targets = [os.path.join(workdir, "reports", f"step{rep['step']}")]
  if rep["full"]:
    targets.append(os.path.join(workdir, "report"))
  for base in targets:
    os.makedirs(os.path.dirname(base), exist_ok=True)
    for ext, content in ((".json", text), (".md", md)):
      # A private temporary name: two writers of one report never share a half file.
      fd, tmp = tempfile.mkstemp(prefix=os.path.basename(base) + ext + ".",
                                 suffix=".tmp", dir=os.path.dirname(base))
      try:
        with os.fdopen(fd, "w") as fh:
          fh.write(content)
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would have made it
        os.replace(tmp, base + ext)
      except BaseException:
        with contextlib.suppress(OSError):
          os.unlink(tmp)
        raise
