"""Sample quality: Frechet distance and Inception-style score in a trained classifier's
feature space, the eval-vs-train floor, guided class agreement, and the sample pictures.

The Frechet distance between Gaussians fitted to two feature sets is
  FD = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2}),
where tr((S_1 S_2)^{1/2}) = tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2}): the right-hand matrix is
symmetric positive semi-definite, so a symmetric eigendecomposition gives its root with
no complex round-off (the usual failure of a general sqrtm on S_1 S_2). FD is biased
upwards at small sample sizes, so the report states every set's size. The floor a sample
FD is compared with is the eval split against the training split (held-out real images,
the same reference set as the samples'); two random halves of the training split give a
second, lower number (same-set halves), reported beside it.

The Inception-style score is exp(E_x KL(p(y|x) || p(y))) with the classifier's softmax,
mean and standard deviation over 10 splits (Salimans et al. 2016).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from vdmrep import classifier as classifier_lib
from vdmrep import parallel, plots, sampling


# -- the statistics ----------------------------------------------------------------
def sqrtm_psd(a):
  """Square root of a symmetric PSD matrix [D, D] (float64), negative round-off clipped."""
  a = 0.5 * (np.asarray(a, np.float64) + np.asarray(a, np.float64).T)
  vals, vecs = np.linalg.eigh(a)
  return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def gaussian_stats(features):
  """Mean [D] and unbiased covariance [D, D] of features [N, D] (float64)."""
  f = np.asarray(features, np.float64)
  return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (squared feature units)."""
  r = sqrtm_psd(sigma1)
  m = r @ np.asarray(sigma2, np.float64) @ r
  tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)))
  diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fd_from_features(f1, f2) -> float:
  return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def inception_score(logits, splits: int = 10):
  """(mean, std) over `splits` of exp(mean_x KL(p(y|x) || p(y))); logits [N, classes]."""
  logits = np.asarray(logits, np.float64)
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  scores = []
  for part in np.array_split(logp, min(splits, len(logp))):
    log_py = np.log(np.mean(np.exp(part), axis=0))
    scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_py), axis=-1))))
  return float(np.mean(scores)), float(np.std(scores))


def real_floor(features, key) -> float:
  """FD between two random halves of one real feature set."""
  perm = np.asarray(jax.random.permutation(key, len(features)))
  half = len(features) // 2
  return fd_from_features(features[perm[:half]], features[perm[half:2 * half]])


# -- samples and pictures (shared by --mode sample and the eval section) -----------
def draw_samples(model, params, ds, config, mesh, key, *, num_unconditional):
  """Every sample set the pictures and numbers use, as host numpy arrays.

  Returns a dict: unconditional [N] (for a class-conditional model drawn for
  `unconditional_labels` [N]: config.sample.label, or the classes in turn, with
  guidance weight config.sample.guidance); for the first min(num_guided, M) eval images
  `inputs`, `guided` (w ~ q(w|x), w = mean for a deterministic encoder, from z_1 ~
  N(0, I)) with its trajectory
  (`guided_frames` [K, n, ...], `guided_frame_t`), `reconstruction` (from t_start) with
  its trajectory; and `interp` [P, S, ...] with `interp_a`, `interp_b`, `interp_alpha`.
  A VAE decoder has no trajectories (its frame entries are absent). Guided and
  interpolation are absent for an unconditional model; guided and
  reconstruction of a class-conditional model take the inputs' labels.
  """
  s = config.sample
  k_unc, k_guid, k_rec, k_int = jax.random.split(key, 4)
  common = dict(batch_size=s.batch_size, num_steps=s.num_steps, decode_method=s.decode,
                mesh=mesh, sampler=s.sampler, guidance=s.guidance)
  labels = None
  if getattr(model, "num_classes", 0):
    labels = (np.full(num_unconditional, s.label, np.int32) if s.label >= 0 else
              np.arange(num_unconditional, dtype=np.int32) % model.num_classes)
  out = {"unconditional": sampling.generate(
      model, params, k_unc, mode="unconditional", num=num_unconditional,
      image_shape=ds.image_shape, labels=labels, **common)["images"]}
  out["unconditional_labels"] = labels
  inputs = ds.eval_images[:min(s.num_guided, len(ds.eval_images))]
  out["inputs"] = inputs
  out["input_labels"] = None if ds.eval_labels is None else ds.eval_labels[:len(inputs)]
  modes = (("guided", k_guid), ("reconstruction", k_rec)) if model.conditional else \
      (("reconstruction", k_rec),)
  for mode, k in modes:
    r = sampling.generate(model, params, k, mode=mode, images=inputs, t_start=s.t_start,
                          num_frames=s.trajectory_frames,
                          labels=out["input_labels"] if labels is not None else None,
                          deterministic_encoder=config.collapse.deterministic_encoder,
                          **common)
    out[mode] = r["images"]
    if "frames" in r:  # a VAE decoder draws x from p(x | w) directly: no trajectory
      out[f"{mode}_frames"] = r["frames"][:, :s.num_trajectories]
      out[f"{mode}_frame_t"] = r["frame_t"]
  p = min(s.num_interpolations, len(ds.eval_images) // 2)
  if model.conditional and p > 0:
    a, b = ds.eval_images[:p], ds.eval_images[p:2 * p]
    out["interp"] = sampling.generate_interpolation(
        model, params, k_int, a, b, steps=s.interpolation_steps, num_steps=s.num_steps,
        method=s.interpolation, decode_method=s.decode).astype(out["unconditional"].dtype)
    out["interp_a"], out["interp_b"] = a, b
    out["interp_alpha"] = np.linspace(0.0, 1.0, s.interpolation_steps)
  return out


def write_pictures(samples, config, directory, *, writer=None, step=0) -> dict:
  """PNGs of the sample sets in `directory`; returns {name: path}. Also to TensorBoard."""
  s, v = config.sample, config.model.vocab_size
  n, nt = s.grid_size, s.num_trajectories
  paths, rgb = {}, {}

  def put(name, image):
    rgb[f"samples/{name}"] = image
    paths[name] = os.path.join(directory, f"{name}.png")

  how = f"{s.num_steps} {s.sampler} steps, decode={s.decode}"
  what = "unconditional samples"
  if samples.get("unconditional_labels") is not None:
    what = (f"class {s.label}" if s.label >= 0 else "classes in turn") + \
        f", guidance {s.guidance:g}"
  put("grid_unconditional", plots.sample_grid(
      samples["unconditional"][:n], os.path.join(directory, "grid_unconditional.png"),
      f"{what} (w ~ N(0, I), {how})", vocab_size=v))
  if "guided" in samples:
    put("grid_guided", plots.sample_grid(
        samples["guided"][:n], os.path.join(directory, "grid_guided.png"),
        f"guided samples: z_1 ~ N(0, I), w ~ q(w|x) of the inputs ({how})",
        inputs=samples["inputs"][:n], vocab_size=v))
  put("grid_reconstruction", plots.sample_grid(
      samples["reconstruction"][:n], os.path.join(directory, "grid_reconstruction.png"),
      f"reconstructions: inputs noised to t={s.t_start}, denoised with their own w",
      inputs=samples["inputs"][:n], vocab_size=v))
  for mode in ("guided", "reconstruction"):
    if f"{mode}_frames" not in samples:
      continue
    start = "z_1 ~ N(0, I)" if mode == "guided" else f"z_t ~ q(z_t|x) at t={s.t_start}"
    put(f"trajectory_{mode}", plots.trajectory(
        samples["inputs"][:nt], samples[f"{mode}_frames"], samples[f"{mode}_frame_t"],
        samples[mode][:nt], os.path.join(directory, f"trajectory_{mode}.png"),
        f"{mode}: {start}, w ~ q(w|input); z_t shown as pixels", vocab_size=v))
  if "interp" in samples:
    put("interpolation", plots.interpolation(
        samples["interp_a"], samples["interp_b"], samples["interp"], samples["interp_alpha"],
        os.path.join(directory, "interpolation.png"),
        f"{s.interpolation} interpolation between encoder means (all sampler noise shared "
        "along a row)",
        vocab_size=v))
  plots.to_tensorboard(writer, step, rgb)
  return paths


def save_samples(samples, path: str) -> None:
  np.savez_compressed(path, **{k: v for k, v in samples.items() if v is not None})


# -- the numbers -------------------------------------------------------------------
def _agreement(pred_out, pred_in, labels, key):
  """Class agreement of outputs with inputs, with true labels, and with shuffled inputs."""
  out = {"match": float(np.mean(pred_out == pred_in)),
         "match_shuffled": float(np.mean(
             pred_out == pred_in[np.asarray(jax.random.permutation(key, len(pred_in)))]))}
  if labels is not None:
    out["label_match"] = float(np.mean(pred_out == labels))
  return out


def sample_quality_section(model, params, ds, config, workdir, mesh, key, *, writer=None,
                           step=0, log=print) -> dict:
  """Samples, sample-quality numbers and pictures of one set of (EMA) parameters.

  Returns a JSON-serialisable dict: classifier test accuracy; FD (squared units of the
  classifier's features) of `num_samples` unconditional samples vs the training split,
  the real-vs-real floor (two halves of the training split) and eval-vs-train (the floor
  to compare a sample FD with: held-out real images against the same training set); the
  Inception-style score of samples and of real data; guided/reconstruction class
  agreement (with a shuffled-pairs chance level); standard Inception FID when
  `config.sample.inception_weights` is set; and `pictures` {name: PNG path}.
  """
  s = config.sample
  k_clf, k_draw, k_floor, k_shuf = jax.random.split(key, 4)
  samples = draw_samples(model, params, ds, config, mesh, k_draw,
                         num_unconditional=s.num_samples)
  pic_dir = os.path.join(workdir, "pictures")
  res = {"num_samples": int(s.num_samples), "num_steps": int(s.num_steps),
         "decode": s.decode, "t_start": float(s.t_start), "num_train": len(ds.train_images),
         "num_eval": len(ds.eval_images), "num_guided": len(samples["inputs"])}
  res["pictures"] = {}
  if parallel.is_main_process():
    res["pictures"] = write_pictures(samples, config, pic_dir, writer=writer, step=step)
    save_samples(samples, os.path.join(workdir, "samples.npz"))
  if ds.train_labels is None or ds.eval_labels is None:
    res["classifier_note"] = f"{ds.name} has no labels: no classifier-based numbers"
  else:
    clf = classifier_lib.get_classifier(
        ds, k_clf, workdir=workdir, steps=s.classifier_steps, batch_size=s.classifier_batch_size,
        lr=s.classifier_lr, features=s.classifier_features, log=log)
    res["classifier_test_accuracy"] = clf.meta["test_accuracy"]
    lg_gen, f_gen = clf.apply(samples["unconditional"])
    lg_tr, f_tr = clf.apply(ds.train_images)
    lg_ev, f_ev = clf.apply(ds.eval_images)
    res["fd_classifier"] = fd_from_features(f_gen, f_tr)
    res["fd_classifier_floor_real_halves"] = real_floor(f_tr, k_floor)
    res["fd_classifier_eval_vs_train"] = fd_from_features(f_ev, f_tr)
    res["is_classifier"], res["is_classifier_std"] = inception_score(lg_gen)
    res["is_classifier_real_train"], _ = inception_score(lg_tr)
    if samples.get("unconditional_labels") is not None:  # class-conditional samples
      res["class_conditional_match"] = float(np.mean(
          np.argmax(lg_gen, -1) == samples["unconditional_labels"]))
      res["guidance"], res["sampler"] = float(s.guidance), s.sampler
    pred_in = clf.predict(samples["inputs"])
    for mode in ("guided", "reconstruction"):
      if mode in samples:
        agree = _agreement(clf.predict(samples[mode]), pred_in, samples["input_labels"],
                           jax.random.fold_in(k_shuf, len(mode)))
        res.update({f"{mode}_class_{k}": v for k, v in agree.items()})
    log(f"sample quality ({s.num_samples} samples, {s.num_steps} steps): classifier "
        f"accuracy {res['classifier_test_accuracy']:.4f}; FD {res['fd_classifier']:.4f} "
        f"(floor: eval vs train {res['fd_classifier_eval_vs_train']:.4f}; train halves "
        f"{res['fd_classifier_floor_real_halves']:.4f}); score {res['is_classifier']:.3f} "
        f"(real {res['is_classifier_real_train']:.3f})"
        + (f"; guided class match {res['guided_class_match']:.3f} (shuffled "
           f"{res['guided_class_match_shuffled']:.3f})" if "guided" in samples else "")
        + (f"; samples of class k classified as k {res['class_conditional_match']:.3f} "
           f"(guidance {s.guidance:g})" if "class_conditional_match" in res else ""))
  if s.inception_weights:
    from vdmrep import inception
    feats = inception.feature_fn(inception.load_network(s.inception_weights))
    f_gen, f_tr = feats(samples["unconditional"]), feats(ds.train_images)
    res["fd_inception"] = fd_from_features(f_gen, f_tr)
    res["fd_inception_floor_real_halves"] = real_floor(f_tr, k_floor)
    res["inception_weights"] = s.inception_weights
    log(f"Inception FD {res['fd_inception']:.3f} (real floor "
        f"{res['fd_inception_floor_real_halves']:.3f})")
  return res
