"""The evaluation report: one JSON + one markdown file per eval, so tables can be built
from workdirs.

Layout of `report.json` (a study script reads `metrics`, flat name -> number):
  step, full (whether probes/OOD/pictures ran), config (the whole config), dataset
  (source, note, num_train, num_eval), metrics, notes (what each number is),
  per_dim (kl_nats [D], mean_variance [D]), usefulness (t and curves, lists),
  probes (per feature set), ood (per OOD set), pictures (paths relative to the workdir).
Metric columns (units in the names): bpd, bpd_se and {recon,prior,diffusion,kl}_bpd(_se)
(the beta = 1 ELBO, always a bound); objective_bpd(_se), objective_is_bound,
objective_not_bound_reason (what training optimised); kl_nats(_se), kl_nats_per_dim,
latent_dim, active_units, active_threshold; mi_nats(_se), mi_upper_nats, mi_samples;
usefulness_gap_bpd; {encoder,random_encoder,pixels}_{logreg,knn}_acc; ood_auroc/<set>.
Written to `workdir/reports/step<N>.{json,md}`; a full eval also to `workdir/report.*`.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

NOTES = {
    "bpd": "negative ELBO with the encoder KL weighted by 1 (recon + prior + diffusion + "
           "KL), bits/dim, mean over eval images of K Monte Carlo draws each; an upper bound "
           "on -log2 p(x)/dim whatever the training objective. *_se: standard error over images.",
    "objective_bpd": "the objective training optimised, evaluated on the eval split at this "
                     "step (bits/dim); equal to bpd when it is the ELBO. When "
                     "objective_is_bound is false this number is NOT a bound on -log p(x).",
    "kl_nats": "encoder KL(q(w|x) || N(0, I)), nats per image (closed form), eval mean.",
    "active_units": "dimensions d with Var_x(E_q[w_d|x]) > active_threshold over the eval split.",
    "mi_nats": "I_q(x; w) under the empirical eval distribution: mean over images i and "
               "draws w ~ q(w|x_i) of log q(w|x_i) - log((1/N) sum_j q(w|x_j)), the logsumexp "
               "over all N eval images; it cannot exceed mi_upper_nats = log N.",
    "usefulness_gap_bpd": "diffusion loss with another image's w minus with the image's own "
                          "w (same t, eps, z_t), averaged over the t grid, bits/dim; ~0 when "
                          "the decoder ignores w.",
    "probes": "logistic regression (lbfgs, L2) and k-NN fit on train-split features, "
              "accuracy on the eval split; features: encoder means, the same architecture "
              "at random init, raw pixels / 255.",
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


def markdown(rep: dict) -> str:
  """A human-readable summary of `rep`: every metric, with the "not a bound" flag inline."""
  m = rep["metrics"]
  lines = [f"# Evaluation at step {rep['step']} ({'full' if rep['full'] else 'periodic'})", "",
           f"Data: {rep['dataset']['source']}: {rep['dataset']['note']} "
           f"({rep['dataset']['num_train']} train, {m['num_images']} eval images used). "
           f"Model: vdm={rep['config']['model']['vdm']}, "
           f"encoder={rep['config']['model']['encoder']}.", "",
           "## Likelihood (bits/dim)", "", "| quantity | value | s.e. | note |", "|---|---|---|---|"]
  for k in ("bpd", "recon_bpd", "prior_bpd", "diffusion_bpd", "kl_bpd"):
    note = "true ELBO (beta = 1): a bound" if k == "bpd" else ""
    lines.append(f"| {k} | {_fmt(m[k])} | {_fmt(m[k + '_se'])} | {note} |")
  flag = ("the ELBO itself" if m["objective_is_bound"] else
          f"**not a bound** ({m['objective_not_bound_reason']}); true ELBO: {_fmt(m['bpd'])}")
  lines.append(f"| trained objective | {_fmt(m['objective_bpd'])} | "
               f"{_fmt(m['objective_bpd_se'])} | {flag} |")
  if not m["objective_is_bound"]:
    lines += ["", "The ELBO (beta = 1) above is a bound on -log2 p(x) per dimension for any "
              "parameters; the trained objective's value is NOT a bound (training optimised "
              f"something else: {m['objective_not_bound_reason']}). It is measured on "
              f"{m.get('objective_num_images', '?')} eval images in training-size batches."]
  if "kl_nats" in m:
    lines += ["", "## Collapse diagnostics", "",
              f"- encoder KL: {_fmt(m['kl_nats'])} +- {_fmt(m['kl_nats_se'])} nats/image, "
              f"{_fmt(m['kl_nats_per_dim'])} nats/dimension (D = {m['latent_dim']})",
              f"- active units: {m['active_units']} / {m['latent_dim']} "
              f"(Var_x E[w_d|x] > {m['active_threshold']})",
              f"- I_q(x; w): {_fmt(m['mi_nats'])} +- {_fmt(m['mi_nats_se'])} nats "
              f"(aggregate-posterior logsumexp estimator, {m['mi_samples']} draw(s)/image; "
              f"ceiling log N = {_fmt(m['mi_upper_nats'])})",
              f"- usefulness of w: swapping w raises the diffusion loss by "
              f"{_fmt(m['usefulness_gap_bpd'])} bits/dim (mean over the t grid)", "",
              "| t | own w (bpd) | other w (bpd) | gap | gap s.e. |", "|---|---|---|---|---|"]
    u = rep["usefulness"]
    for i, t in enumerate(u["t"]):
      lines.append(f"| {t:.3f} | {_fmt(u['own_bpd'][i])} | {_fmt(u['swapped_bpd'][i])} | "
                   f"{_fmt(u['gap_bpd'][i])} | {_fmt(u['gap_bpd_se'][i])} |")
  if rep.get("probes"):
    p = rep["probes"]
    lines += ["", f"## Probes (fit on {p['num_train']} train, scored on {p['num_eval']} eval)",
              "", "| features | logistic regression acc | k-NN acc |", "|---|---|---|"]
    for name, r in p["results"].items():
      conv = "" if r["logreg_converged"] else " (lbfgs not converged)"
      lines.append(f"| {name} | {_fmt(r['logreg_acc'])}{conv} | {_fmt(r['knn_acc'])} |")
  if rep.get("ood"):
    lines += ["", "## OOD (per-image ELBO as score)", "",
              "| OOD set | AUROC | n OOD | bpd OOD (s.e.) | bpd in |", "|---|---|---|---|---|"]
    for name, r in rep["ood"].items():
      lines.append(f"| {name} | {_fmt(r['auroc'])} | {r['num_ood']} | {_fmt(r['ood_bpd'])} ({_fmt(r['ood_bpd_se'])}) | "
                   f"{_fmt(r['in_bpd'])} |")
  if rep.get("pictures"):
    lines += ["", "## Pictures", ""] + [f"- {k}: `{v}`" for k, v in rep["pictures"].items()]
  return "\n".join(lines) + "\n"


def one_line(rep: dict) -> str:
  """The console summary line: 'eval step N: bpd X +- SE (terms); encoder KL K nats/image'."""
  m = rep["metrics"]
  line = (f"eval step {rep['step']}: bpd {m['bpd']:.4f} +- {m['bpd_se']:.4f} "
          f"(recon {m['recon_bpd']:.4f}, prior {m['prior_bpd']:.5f}, "
          f"diffusion {m['diffusion_bpd']:.4f}, kl {m['kl_bpd']:.4f}); "
          f"encoder KL {m.get('kl_nats', 0.0):.3f} nats/image")
  if "active_units" in m:
    line += f", {m['active_units']}/{m['latent_dim']} active units, MI {m['mi_nats']:.3f} nats"
  if not m["objective_is_bound"]:
    line += (f"  [trained objective {m['objective_bpd']:.4f} bpd is not a bound: "
             f"{m['objective_not_bound_reason']}]")
  return line


def write(workdir: str, rep: dict) -> None:
  """Writes reports/step<N>.{json,md}; a full eval also report.{json,md} (the latest)."""
  text, md = json.dumps(_jsonable(rep), indent=1), markdown(rep)
  targets = [os.path.join(workdir, "reports", f"step{rep['step']}")]
  if rep["full"]:
    targets.append(os.path.join(workdir, "report"))
  for base in targets:
    os.makedirs(os.path.dirname(base), exist_ok=True)
    for ext, content in ((".json", text), (".md", md)):
      with open(base + ext + ".tmp", "w") as fh:
        fh.write(content)
      os.replace(base + ext + ".tmp", base + ext)
