"""Evaluators: one module per evaluation, one interface, chosen by config.

Each evaluator is a function `run(ctx: Context) -> Section`:

  elbo       held-out negative ELBO (bits/dim, per term, standard errors), the trained
             objective at the last trained step (elbo.py)
  baselines  trivial baselines of the same eval images: per-pixel histogram and uniform
             bpd over the grey levels the data uses (baselines.py)
  latents    the rate (KL), active units, I_q(x; w), aggregate-posterior mismatch, usefulness
             of w and its per-band saving against the rate (latents.py)
  probes     logistic (standardised, C by cross-validation) and k-NN probes, I(features;
             label) in bits, on encoder means, one draw of w, a random encoder and raw
             pixels (probes.py)
  ood        AUROC of the per-image ELBO against held-out sets (ood.py)
  samples    sample quality: Frechet distances, guided class match, sample pictures
  pictures   latent maps and the usefulness curve

`config.eval.evaluators` lists those a full evaluation runs (in order; later ones read
what earlier ones leave in `ctx.shared`), `config.eval.periodic_evaluators` those a
periodic one runs. `config.eval.sample_quality = False` and `config.eval.pictures = False`
drop `samples` and `pictures`. Adding an evaluator: a module with `run(ctx) -> Section`
(Context and Section in base.py) and one line in `_registry`.

Shared values (`ctx.shared`), set by the evaluator named in brackets: "per_image"
(dict of [N] nats per term), "per_image_bpd" ([N] the bound per image), "score_fn"
(images -> [M] bpd, the same estimator on other images) [elbo]; "mean", "logvar" ([N, D]
encoder moments of the eval images) [latents]; "usefulness" [latents]; "rand_mean" [probes].
Every random draw comes from the eval seed (`config.eval.seed`, -1 = `config.seed`).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import numpy as np

from vdmrep import console, parallel, report
from vdmrep.evaluators.base import (  # noqa: F401  (the evaluators' interface)
    ELBO, FIT, MI, OBJECTIVE, OOD, PROBE_FEATURES, PROBE_W, SAMPLES, USEFUL, Context,
    Section, _head, _parse, eval_seed)

PERIODIC_DEFAULT = "elbo,baselines,latents"
FULL_DEFAULT = "elbo,baselines,latents,probes,ood,samples,pictures"


def _registry() -> dict:
  from vdmrep.evaluators import baselines, elbo, latents, ood, pictures, probes, samples
  return {"elbo": elbo.run, "baselines": baselines.run, "latents": latents.run,
          "probes": probes.run, "ood": ood.run, "samples": samples.run,
          "pictures": pictures.run}


NAMES = ("elbo", "baselines", "latents", "probes", "ood", "samples", "pictures")


def validate(config) -> None:
  """Raises ConfigError naming the first bad `config.eval` key."""
  from vdmrep.errors import ConfigError
  e = config.eval
  for key in ("evaluators", "periodic_evaluators"):
    names = _parse(e[key])
    unknown = [n for n in names if n not in NAMES]
    if unknown:
      raise ConfigError(f"config.eval.{key}={e[key]!r}: unknown evaluator(s) {unknown}; "
                        f"choose from {list(NAMES)}")
    if names and names[0] != "elbo" and "elbo" in names:
      raise ConfigError(f"config.eval.{key}={e[key]!r}: 'elbo' must come first (the others "
                        "read its per-image values)")
    if any(n in names for n in ("ood", "baselines")) and "elbo" not in names:
      raise ConfigError(f"config.eval.{key}={e[key]!r}: 'ood' and 'baselines' need 'elbo'")
    if "pictures" in names and "latents" not in names:
      raise ConfigError(f"config.eval.{key}={e[key]!r}: 'pictures' needs 'latents'")
  unknown = [n for n in _parse(e.get("probe_features", "")) if n not in PROBE_FEATURES]
  if unknown:
    raise ConfigError(f"config.eval.probe_features={e.probe_features!r}: unknown feature "
                      f"set(s) {unknown}; choose from {list(PROBE_FEATURES)}")
  for key in ("mi_samples", "usefulness_num_t", "probe_max_iter", "knn_k", "probe_cv_folds",
              "tsne_perplexity", "histogram_k"):
    if not e[key] > 0:
      raise ConfigError(f"config.eval.{key}={e[key]!r} must be > 0")
  for key in ("usefulness_max_examples", "probe_max_train", "tsne_max_points",
              "posterior_fit_examples"):
    if e[key] < 0:
      raise ConfigError(f"config.eval.{key}={e[key]!r} must be >= 0 (0 = all)")
  if not e.active_threshold > 0:
    raise ConfigError(f"config.eval.active_threshold={e.active_threshold!r} must be > 0")
  try:
    stds = [float(s) for s in _parse(e.posterior_std_grid)]
  except ValueError:
    raise ConfigError(f"config.eval.posterior_std_grid={e.posterior_std_grid!r}: expected "
                      "comma-separated positive numbers") from None
  if any(not s > 0 for s in stds):
    raise ConfigError(f"config.eval.posterior_std_grid={e.posterior_std_grid!r}: every "
                      "standard deviation must be > 0")
  try:
    cs = [float(s) for s in _parse(e.probe_cs)]
  except ValueError:
    cs = [0.0]
  if not cs or any(not c > 0 for c in cs):
    raise ConfigError(f"config.eval.probe_cs={e.probe_cs!r}: expected comma-separated "
                      "positive inverse regularisation strengths")
  if e.ood_holdout_class < -1:
    raise ConfigError(f"config.eval.ood_holdout_class={e.ood_holdout_class} must be -1 (off) "
                      "or a class label >= 0")
  if e.ood_source and not (e.ood_source in ("digits", "fashion_mnist") or any(
      e.ood_source.startswith(p) and len(e.ood_source) > len(p)
      for p in ("fashion_mnist:", "tfds:", "idx:", "npz:"))):
    raise ConfigError(f"config.eval.ood_source={e.ood_source!r} is not valid; use '' (none), "
                      "'digits', 'fashion_mnist[:<dir>]', 'tfds:<name>', 'idx:<dir>' or "
                      "'npz:<file>'")


def selected(config, full: bool) -> list:
  """Evaluator names a full (or periodic) evaluation runs, in order."""
  e = config.eval
  names = _parse(e.evaluators if full or e.periodic_full else e.periodic_evaluators)
  if not e.sample_quality:
    names = [n for n in names if n != "samples"]
  if not e.pictures:
    names = [n for n in names if n != "pictures"]
  return names


def run_evaluation(model, params, ds, config, mesh, *, step: int, workdir: str, writer=None,
                   full: bool = True, names: Optional[list] = None) -> dict:
  """Runs the selected evaluators on `params` (the EMA parameters) and writes the report.

  Args:
    step: optimiser steps taken by `params` (the trained objective is evaluated at
      step - 1, the last step training applied).
    names: evaluators to run (default: `selected(config, full)`).
  Returns the report dict (see `vdmrep/report.py`); `report["metrics"]` holds the flat
  columns.
  """
  e = config.eval
  ctx = Context(model=model, params=params, ds=ds, config=config, mesh=mesh, step=int(step),
                workdir=workdir, key=jax.random.key(eval_seed(config)),
                images=_head(ds.eval_images, e.max_examples),
                labels=_head(ds.eval_labels, e.max_examples), full=full, writer=writer)
  rep = report.new(step, config, ds, full=full)
  metrics, arrays, pictures, images = {}, {}, {}, {}
  registry = _registry()
  names = selected(config, full) if names is None else names
  for name in names:
    sec = registry[name](ctx)
    metrics.update(sec.metrics)
    for k, v in sec.report.items():  # dict sections merge (e.g. "per_image")
      rep[k] = {**rep[k], **v} if isinstance(v, dict) and isinstance(rep.get(k), dict) else v
    arrays.update(sec.arrays)
    pictures.update(sec.pictures)
    images.update(sec.images)
  rep["evaluators"] = list(names)
  rep["metrics"] = metrics
  rep["pictures"] = {k: os.path.relpath(v, workdir) for k, v in pictures.items()}
  if parallel.is_main_process():
    if full and "mean" in arrays:
      np.savez(os.path.join(workdir, "latents.npz"), step=step,
               labels=ctx.labels if ctx.labels is not None else np.zeros((0,), np.int32),
               **arrays)
    report.write(workdir, rep)
  if writer is not None:
    writer.write_scalars(step, {f"eval/{k}": float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float, bool, np.number))
                                and v is not None})
    if images:
      writer.write_images(step, {f"eval/{k}": v[None] for k, v in images.items()})
  if console.verbose():
    parallel.main_print(report.markdown(rep))
  name = "report.md" if full else os.path.join("reports", f"step{step}.md")
  where = f"; report: {os.path.join(workdir, name)}" if workdir else ""
  parallel.main_print(console.wrap(report.one_line(rep) + where))
  return rep


EvaluatorFn = Callable[[Context], Section]
