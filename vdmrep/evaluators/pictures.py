"""Latent maps (PCA, t-SNE of the encoder means; trained vs random encoder) and the
usefulness-of-w curve, as PNGs under workdir/pictures and TensorBoard images."""
from __future__ import annotations

import os

from vdmrep import parallel, plots
from vdmrep.evaluators.base import Section, _head


def run(ctx) -> Section:
  mean, use = ctx.shared.get("mean"), ctx.shared.get("usefulness")
  rand_mean = ctx.shared.get("rand_mean")
  if mean is None or not parallel.is_main_process():
    return Section()
  e, step, labels = ctx.config.eval, ctx.step, ctx.labels
  n = e.tsne_max_points or len(mean)
  lab = _head(labels, n) if labels is not None else None
  cols = [("trained encoder", mean)] + ([("random encoder", rand_mean)]
                                        if rand_mean is not None else [])
  emb = {}
  for col, m in cols:
    emb[("PCA", col)] = (plots.pca_2d(m[:n]), "principal component 1", "principal component 2")
    emb[("t-SNE", col)] = (plots.tsne_2d(m[:n], ctx.config.seed, e.tsne_perplexity),
                           "t-SNE 1", "t-SNE 2")
  images, paths = {}, {}
  pic_dir = os.path.join(ctx.workdir, "pictures")
  fig = plots.latent_maps(emb, lab, f"encoder means E_q[w|x] of {len(mean[:n])} eval images, "
                                    f"step {step}")
  paths["latent_maps"] = os.path.join(pic_dir, f"latent_maps_step{step}.png")
  images["latent_maps"] = plots.save(fig, paths["latent_maps"])
  fig = plots.usefulness_curve(use["t"], use["own_bpd"], use["swapped_bpd"], use["gap_bpd_se"],
                               f"usefulness of w, {use['num_images']} eval images, step {step}")
  paths["usefulness_of_w"] = os.path.join(pic_dir, f"usefulness_of_w_step{step}.png")
  images["usefulness_of_w"] = plots.save(fig, paths["usefulness_of_w"])
  return Section(pictures=paths, images=images)
