"""Held-out evaluation: the ELBO, collapse diagnostics, probes, OOD score, pictures, report.

The ELBO reported here always weights the encoder KL by 1 (whatever beta training
used), so for any parameters it is an upper bound on -log2 p(x) per dimension, up to
Monte Carlo error (K draws of (w, z_0, t, eps) per image, `config.eval.num_time_samples`,
with t stratified per image: see `eval_times`).
When training optimised something else (`collapse.is_bound(config)` is False), the value
of *that* objective on the eval split is reported too, flagged "not a bound".

`run_evaluation` is the entry point (train.py calls it periodically, at the end of
training and in `--mode eval`). Periodic evals run the cheap part (ELBO, trained
objective, KL / active units / MI / usefulness of w); full evals add the probes, the
OOD score, `latents.npz` and the pictures. Every random draw comes from `config.seed`.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdmrep import collapse, diagnostics, plots, probes, report
from vdmrep import data as data_lib
from vdmrep import parallel

TERMS = ("recon", "prior", "diffusion", "kl")
# fold_in tags of config.seed for each random quantity of an eval
_ELBO, _OBJECTIVE, _MI, _USEFUL, _OOD, _SAMPLES = range(6)


def validate(config) -> None:
  """Raises ConfigError naming the first bad `config.eval` key."""
  from vdmrep.config_lib import ConfigError
  e = config.eval
  for key in ("mi_samples", "usefulness_num_t", "probe_max_iter", "knn_k", "probe_c",
              "tsne_perplexity"):
    if not e[key] > 0:
      raise ConfigError(f"config.eval.{key}={e[key]!r} must be > 0")
  for key in ("usefulness_max_examples", "probe_max_train", "tsne_max_points"):
    if e[key] < 0:
      raise ConfigError(f"config.eval.{key}={e[key]!r} must be >= 0 (0 = all)")
  if not e.active_threshold > 0:
    raise ConfigError(f"config.eval.active_threshold={e.active_threshold!r} must be > 0")
  if e.ood_holdout_class < -1:
    raise ConfigError(f"config.eval.ood_holdout_class={e.ood_holdout_class} must be -1 (off) "
                      "or a class label >= 0")
  if e.ood_source and not (e.ood_source in ("digits", "fashion_mnist") or any(
      e.ood_source.startswith(p) and len(e.ood_source) > len(p)
      for p in ("fashion_mnist:", "tfds:", "idx:", "npz:"))):
    raise ConfigError(f"config.eval.ood_source={e.ood_source!r} is not valid; use '' (none), "
                      "'digits', 'fashion_mnist[:<dir>]', 'tfds:<name>', 'idx:<dir>' or "
                      "'npz:<file>'")


# Sample-quality numbers copied into the report's flat metrics (vdmrep/quality.py).
SAMPLE_METRICS = ("classifier_test_accuracy", "fd_classifier", "fd_classifier_floor_real_halves",
                  "fd_classifier_eval_vs_train", "is_classifier", "is_classifier_real_train",
                  "guided_class_match", "guided_class_match_shuffled",
                  "reconstruction_class_match", "fd_inception", "fd_inception_floor_real_halves")


# -- the ELBO --------------------------------------------------------------------------
def eval_times(key, batch: int, num_samples: int):
  """[K, B] diffusion times: for each image its own K stratified times (u_i + k/K) mod 1.

  Training's antithetic sampling spreads one uniform over the *batch*, which makes the
  times of neighbouring images dependent: the few real images of a padded last batch (or
  a small OOD set) would all get nearly the same t. Here u_i are independent, so
  per-image estimates are independent (the standard error over images is valid, and an
  image's score does not depend on its batch position) and each is stratified over its K draws.
  """
  u = jax.random.uniform(key, (batch,))
  return jnp.mod(u[None, :] + jnp.arange(num_samples)[:, None] / num_samples, 1.0)


def _eval_terms(params, batch, key, *, model, num_samples):
  """Per-image terms averaged over K draws of (w, z_0, t, eps): dict of [B] nats."""
  k_t, k_rest = jax.random.split(key)
  times = eval_times(k_t, batch.shape[0], num_samples)

  def one(args):
    t, k = args
    terms = model.elbo_terms(params, batch, k, train=False, t=t)
    return {name: terms[name] for name in TERMS}
  terms = jax.lax.map(one, (times, jax.random.split(k_rest, num_samples)))
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), terms)


@functools.lru_cache(maxsize=8)  # periodic evals reuse the compiled function
def make_eval_fn(model, mesh, num_samples):
  return jax.jit(functools.partial(_eval_terms, model=model, num_samples=num_samples),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh),
                               parallel.replicated(mesh)),
                 out_shardings=parallel.replicated(mesh))


def per_image_terms(eval_fn, params, images, key, batch_size, mesh):
  """Per-image ELBO terms over all `images`: dict of float64 [N] nats (host numpy)."""
  out = {k: [] for k in TERMS}
  for i, (batch, mask) in enumerate(data_lib.eval_batches(images, batch_size)):
    terms = eval_fn(params, parallel.shard_full_batch(mesh, batch), jax.random.fold_in(key, i))
    keep = mask > 0
    for k in TERMS:
      out[k].append(np.asarray(terms[k], np.float64)[keep])
  return {k: np.concatenate(v) for k, v in out.items()}


def summarize(per_image: dict, num_dims: int) -> dict:
  """Means and standard errors (over images) of every term and of the total, in bits/dim."""
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  per_image = dict(per_image)
  per_image["total"] = sum(per_image[k] for k in TERMS)
  n = len(per_image["total"])
  out = {"num_images": n}
  for k, v in per_image.items():
    out[f"{k}_bpd"] = float(np.mean(v) * to_bpd)
    out[f"{k}_bpd_se"] = float(np.std(v, ddof=1) / math.sqrt(n) * to_bpd) if n > 1 else float("nan")
  out["bpd"], out["bpd_se"] = out["total_bpd"], out["total_bpd_se"]
  return out


def per_image_bpd(per_image: dict, num_dims: int) -> np.ndarray:
  """The negative ELBO of each image in bits/dim: [N] (the OOD score)."""
  return sum(per_image[k] for k in TERMS) / (num_dims * math.log(2.0))


def evaluate_elbo(model, params, images, *, seed, num_samples, batch_size, mesh):
  """Test-set negative ELBO (bits/dim, beta = 1), each term alone, and standard errors."""
  eval_fn = make_eval_fn(model, mesh, num_samples)
  per_image = per_image_terms(eval_fn, params, images, jax.random.key(seed), batch_size, mesh)
  return summarize(per_image, int(np.prod(images.shape[1:])))


# -- the trained objective, when it is not the ELBO ---------------------------------------
def _objective_batch(params, batch, key, step, *, model, config, num_samples):
  """The training objective (nats/image, batch mean, K-draw mean) on one eval batch."""
  def one(k):
    k_terms, k_obj = jax.random.split(k)  # k_obj: the MMD's prior samples, if any
    terms = model.elbo_terms(params, batch, k_terms, train=False,
                             deterministic_encoder=config.collapse.deterministic_encoder)
    return collapse.objective(terms, step, config, k_obj)[0]
  return jnp.mean(jax.lax.map(one, jax.random.split(key, num_samples)))


@functools.lru_cache(maxsize=8)
def _make_objective_fn(model, mesh, frozen_config):
  repl = parallel.replicated(mesh)
  return jax.jit(functools.partial(_objective_batch, model=model, config=frozen_config,
                                   num_samples=frozen_config.eval.num_time_samples),
                 in_shardings=(repl, parallel.batch_sharded(mesh), repl, repl),
                 out_shardings=repl)


def trained_objective(model, params, images, key, step, config, mesh) -> dict:
  """The trained objective's value on `images` in bits/dim, with its standard error.

  Batch-level terms (MMD, batch free bits, capacity) depend on the batch, so batches
  have the training batch size and only whole batches are used (the remainder is
  dropped; `num_images` says how many were used). The standard error is over batches.
  """
  ndev = jax.device_count()
  bsz = min(config.training.batch_size, len(images) - len(images) % ndev)
  fn = _make_objective_fn(model, mesh, ml_collections.FrozenConfigDict(config))
  vals = [float(fn(params, parallel.shard_full_batch(mesh, images[s:s + bsz]),
                   jax.random.fold_in(key, i), jnp.asarray(step, jnp.int32)))
          for i, s in enumerate(range(0, len(images) - bsz + 1, bsz))]
  to_bpd = 1.0 / (int(np.prod(images.shape[1:])) * math.log(2.0))
  se = np.std(vals, ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
  return {"bpd": float(np.mean(vals) * to_bpd), "bpd_se": float(se * to_bpd),
          "num_images": len(vals) * bsz, "batch_size": bsz}


# -- OOD -------------------------------------------------------------------------------
def auroc(in_scores, out_scores) -> float:
  """Area under the ROC curve for "out-of-distribution" = positive, higher score = more OOD."""
  from sklearn.metrics import roc_auc_score
  y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
  return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def ood_sets(ds, config) -> dict:
  """name -> uint8 images scored as out-of-distribution (held-out class, second source)."""
  e, out = config.eval, {}
  if e.ood_holdout_class >= 0:
    out[f"class_{e.ood_holdout_class}"] = ds.held_out_images
  if e.ood_source:
    other = data_lib.load(_with_source(config.data, e.ood_source))
    if other.eval_images.shape[1:] != ds.eval_images.shape[1:]:
      raise data_lib.DataError(
          f"config.eval.ood_source={e.ood_source!r}: images {other.eval_images.shape[1:]} differ "
          f"in shape from the model's {ds.eval_images.shape[1:]}")
    out[e.ood_source] = other.eval_images
  if e.max_examples:
    out = {k: v[:e.max_examples] for k, v in out.items()}
  return out


def _with_source(data_cfg, source):
  cfg = data_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.source = source
  return cfg


# -- orchestration ----------------------------------------------------------------------
def _head(x, n):
  return x if x is None or not n else x[:n]


def random_encoder_params(model, config, image_shape) -> dict:
  """The encoder's parameters at initialisation (`config.eval.random_encoder_seed`): the
  random-features baseline of the probes and latent maps. Only the encoder is built."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  init = jax.jit(lambda k: model.encoder.init(k, x)["params"])
  return {"encoder": init(jax.random.key(config.eval.random_encoder_seed))}


def latent_section(model, params, images, config, mesh, key) -> dict:
  """KL, active units, MI and the usefulness of w on the eval images (conditional models)."""
  e = config.eval
  mean, logvar = diagnostics.encode_split(diagnostics.make_encode_fn(model, mesh), params,
                                          images, e.batch_size, mesh)
  kl = diagnostics.kl_summary(mean, logvar)
  au, var = diagnostics.active_units(mean, e.active_threshold)
  w = diagnostics.draw_latents(mean, logvar, e.mi_samples, seed=(config.seed, _MI))
  mi = diagnostics.mutual_information(mean, logvar, w)
  use = diagnostics.usefulness(
      diagnostics.make_usefulness_fn(model, mesh), params,
      _head(images, e.usefulness_max_examples), jax.random.fold_in(key, _USEFUL),
      num_t=e.usefulness_num_t, batch_size=e.batch_size, mesh=mesh,
      num_dims=int(np.prod(images.shape[1:])))
  metrics = {k: kl[k] for k in ("kl_nats", "kl_nats_se", "kl_nats_per_dim")}
  metrics.update(latent_dim=int(mean.shape[1]), active_units=au,
                 active_threshold=e.active_threshold, **mi,
                 usefulness_gap_bpd=use["gap_mean_bpd"])
  return {"metrics": metrics, "mean": mean, "logvar": logvar, "w_mi": w, "usefulness": use,
          "per_dim": {"kl_nats": kl["kl_per_dim_nats"], "mean_variance": var}}


def probe_section(model, params, ds, images, labels, mean, config, mesh) -> dict:
  """Probes on encoder means, raw pixels and a random encoder; also the random eval means."""
  e = config.eval
  tr_imgs = _head(ds.train_images, e.probe_max_train)
  tr_y = _head(ds.train_labels, e.probe_max_train)
  feats = {"pixels": (probes.pixel_features(tr_imgs), probes.pixel_features(images))}
  rand_mean = None
  if model.conditional:
    enc = diagnostics.make_encode_fn(model, mesh)
    rand = random_encoder_params(model, config, ds.image_shape)
    rand_mean = diagnostics.encode_split(enc, rand, images, e.batch_size, mesh)[0]
    feats["encoder"] = (diagnostics.encode_split(enc, params, tr_imgs, e.batch_size, mesh)[0],
                        mean)
    feats["random_encoder"] = (diagnostics.encode_split(enc, rand, tr_imgs, e.batch_size,
                                                        mesh)[0], rand_mean)
  res = probes.run_probes(feats, tr_y, labels, e)
  return {"results": res, "num_train": len(tr_imgs), "num_eval": len(images),
          "rand_mean": rand_mean}


def picture_section(workdir, step, mean, rand_mean, labels, use, config) -> dict:
  """Latent maps (PCA, t-SNE; trained vs random encoder) and the usefulness curve -> pixels."""
  e, pics = config.eval, {}
  n = e.tsne_max_points or len(mean)
  lab = _head(labels, n)
  emb = {}
  for col, m in (("trained encoder", mean), ("random encoder", rand_mean)):
    emb[("PCA", col)] = (plots.pca_2d(m[:n]), "principal component 1", "principal component 2")
    emb[("t-SNE", col)] = (plots.tsne_2d(m[:n], config.seed, e.tsne_perplexity),
                           "t-SNE 1", "t-SNE 2")
  fig = plots.latent_maps(emb, lab, f"encoder means E_q[w|x] of {len(lab)} eval images, "
                                    f"step {step}")
  pics["latent_maps"] = plots.save(fig, os.path.join(workdir, "pictures",
                                                     f"latent_maps_step{step}.png"))
  fig = plots.usefulness_curve(use["t"], use["own_bpd"], use["swapped_bpd"], use["gap_bpd_se"],
                               f"usefulness of w, {use['num_images']} eval images, step {step}")
  pics["usefulness_of_w"] = plots.save(fig, os.path.join(workdir, "pictures",
                                                         f"usefulness_of_w_step{step}.png"))
  return pics


def ood_section(eval_fn, params, in_bpd, ds, config, mesh, key) -> dict:
  """AUROC of the per-image ELBO (bits/dim) as an OOD score, for each configured OOD set."""
  out = {}
  for i, (name, imgs) in enumerate(sorted(ood_sets(ds, config).items())):
    per = per_image_terms(eval_fn, params, imgs, jax.random.fold_in(key, i),
                          config.eval.batch_size, mesh)
    bpd = per_image_bpd(per, int(np.prod(imgs.shape[1:])))
    out[name] = {"auroc": auroc(in_bpd, bpd), "num_ood": len(bpd), "num_in": len(in_bpd),
                 "ood_bpd": float(bpd.mean()), "in_bpd": float(in_bpd.mean()),
                 "ood_bpd_se": float(bpd.std(ddof=1) / math.sqrt(len(bpd)))
                 if len(bpd) > 1 else float("nan")}
  return out


def run_evaluation(model, params, ds, config, mesh, *, step: int, workdir: str, writer=None,
                   full: bool = True) -> dict:
  """Evaluates `params` (the EMA parameters) on the eval split and writes the report.

  Returns the report dict (see `vdmrep/report.py`); `report["metrics"]` holds the flat
  columns (bpd, bpd_se, kl_nats, active_units, mi_nats, probe accuracies, ...).
  """
  e = config.eval
  key = jax.random.key(config.seed)
  images, labels = _head(ds.eval_images, e.max_examples), _head(ds.eval_labels, e.max_examples)
  num_dims = int(np.prod(images.shape[1:]))
  eval_fn = make_eval_fn(model, mesh, e.num_time_samples)
  per = per_image_terms(eval_fn, params, images, jax.random.fold_in(key, _ELBO),
                        e.batch_size, mesh)
  metrics = summarize(per, num_dims)
  bound, why = collapse.is_bound(config)
  if bound:
    metrics.update(objective_bpd=metrics["bpd"], objective_bpd_se=metrics["bpd_se"])
  else:
    obj = trained_objective(model, params, images, jax.random.fold_in(key, _OBJECTIVE), step,
                            config, mesh)
    metrics.update(objective_bpd=obj["bpd"], objective_bpd_se=obj["bpd_se"],
                   objective_num_images=obj["num_images"])
  metrics.update(objective_is_bound=bound, objective_not_bound_reason=why)
  rep = report.new(step, config, ds, full=full)
  arrays, pics = {}, {}
  if model.conditional:
    lat = latent_section(model, params, images, config, mesh, key)
    metrics.update(lat["metrics"])
    rep["per_dim"] = lat["per_dim"]
    rep["usefulness"] = lat["usefulness"]
    arrays = {"mean": lat["mean"], "logvar": lat["logvar"], "w_mi": lat["w_mi"]}
  if full:
    if labels is not None and ds.train_labels is not None:
      pr = probe_section(model, params, ds, images, labels, arrays.get("mean"), config, mesh)
      rep["probes"] = {k: pr[k] for k in ("results", "num_train", "num_eval")}
      for name, r in pr["results"].items():
        metrics[f"{name}_logreg_acc"], metrics[f"{name}_knn_acc"] = r["logreg_acc"], r["knn_acc"]
      if model.conditional and e.pictures and parallel.is_main_process():
        pics = picture_section(workdir, step, arrays["mean"], pr["rand_mean"], labels,
                               rep["usefulness"], config)
    rep["ood"] = ood_section(eval_fn, params, per_image_bpd(per, num_dims), ds, config, mesh,
                             jax.random.fold_in(key, _OOD))
    for name, r in rep["ood"].items():
      metrics[f"ood_auroc/{name}"] = r["auroc"]
    if e.sample_quality:
      from vdmrep import quality  # samples: the slowest section, so opt-out by config
      sq = quality.sample_quality_section(model, params, ds, config, workdir, mesh,
                                          jax.random.fold_in(key, _SAMPLES), writer=writer,
                                          step=step, log=parallel.main_print)
      rep["samples"] = {k: v for k, v in sq.items() if k != "pictures"}
      pics_sq = sq.get("pictures", {})
      metrics.update({k: v for k, v in sq.items() if k in SAMPLE_METRICS})
  rep["metrics"] = metrics
  rep["pictures"] = {k: f"pictures/{k}_step{step}.png" for k in pics}
  if full and e.sample_quality:
    rep["pictures"].update({k: os.path.relpath(v, workdir) for k, v in pics_sq.items()})
  if parallel.is_main_process():
    if full and arrays:
      np.savez(os.path.join(workdir, "latents.npz"), mean=arrays["mean"],
               logvar=arrays["logvar"], w_mi=arrays["w_mi"], step=step,
               labels=labels if labels is not None else np.zeros((0,), np.int32))
    report.write(workdir, rep)
  if writer is not None:
    writer.write_scalars(step, {f"eval/{k}": float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float, bool, np.number))})
    if pics:
      writer.write_images(step, {f"eval/{k}": v[None] for k, v in pics.items()})
  parallel.main_print(report.markdown(rep) + "\n" + report.one_line(rep))
  return rep
