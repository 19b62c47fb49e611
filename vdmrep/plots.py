"""Evaluation pictures (matplotlib, Agg backend): latent maps and the usefulness-of-w curve.

Each figure function returns a matplotlib Figure; `save` writes it as PNG and returns
the RGB pixels [H, W, 3] uint8 for TensorBoard (`writer.write_images`).
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def save(fig, path: str) -> np.ndarray:
  """Writes `fig` to `path` (PNG), closes it and returns its pixels [H, W, 3] uint8."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.canvas.draw()
  pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  fig.savefig(path, dpi=fig.dpi)
  plt.close(fig)
  return pixels


def pca_2d(x) -> np.ndarray:
  """First two principal-component scores of x [N, F] -> [N, 2] (signs fixed by the largest
  loading, so the picture does not flip between runs)."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  comps = vt[:2]
  signs = np.sign(comps[np.arange(len(comps)), np.argmax(np.abs(comps), axis=1)])
  out = x @ (comps * signs[:, None]).T
  return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def tsne_2d(x, seed: int, perplexity: float = 30.0) -> np.ndarray:
  """scikit-learn t-SNE (Barnes-Hut, PCA init, fixed seed) of x [N, F] -> [N, 2].

  Runs on one thread: the result is then reproducible, and OpenMP threads competing with
  other processes made it 15x slower on a shared 2-core machine (42 s vs 2.8 s, 240 points).
  """
  from sklearn.manifold import TSNE
  from threadpoolctl import threadpool_limits
  x = np.asarray(x, np.float64)
  perplexity = min(perplexity, max(1.0, (len(x) - 1) / 3.0))
  with threadpool_limits(1):
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _scatter(ax, xy, labels, title, xlabel, ylabel):
  if labels is None:
    ax.scatter(xy[:, 0], xy[:, 1], s=6, c="tab:blue")
  else:
    ax.scatter(xy[:, 0], xy[:, 1], s=6, c=np.asarray(labels) % 10, cmap="tab10",
               vmin=-0.5, vmax=9.5)
  ax.set_title(title, fontsize=11)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)


def latent_maps(embeddings: dict, labels, suptitle: str):
  """A grid of 2-D embeddings coloured by label.

  Args:
    embeddings: {(row name, column name): (xy [N, 2], x-axis label, y-axis label)}, e.g.
      rows "PCA"/"t-SNE" and columns "trained encoder"/"random encoder".
    labels: int [N] class labels (or None).
    suptitle: the figure title.
  """
  rows = list(dict.fromkeys(r for r, _ in embeddings))
  cols = list(dict.fromkeys(c for _, c in embeddings))
  fig, axes = plt.subplots(len(rows), len(cols), figsize=(5.0 * len(cols) + 1.0,
                                                        4.5 * len(rows)),
                           dpi=100, squeeze=False, layout="constrained")
  for i, r in enumerate(rows):
    for j, c in enumerate(cols):
      xy, xl, yl = embeddings[(r, c)]
      _scatter(axes[i, j], xy, labels, f"{r}: {c}", xl, yl)
  if labels is not None:
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10")
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(int(k) % 10), label=str(k))
               for k in classes]
    fig.legend(handles=handles, title="label", loc="outside right center")
  fig.suptitle(suptitle, fontsize=12)
  return fig


def usefulness_curve(t, own, swapped, gap_se, title: str):
  """Diffusion loss per noise level with the image's own w and with another image's w.

  t [T]; own, swapped [T] bits/dim; gap_se [T] the paired standard error of their gap
  (drawn as a band around the swapped curve: where own lies outside it, w helps).
  """
  fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
  ax.plot(t, own, "o-", label="own w (w ~ q(w|x))")
  ax.plot(t, swapped, "s--", label="w of another image")
  ax.set_yscale("log")
  ax.set_xlabel("diffusion time t")
  ax.set_ylabel("diffusion loss at t (bits/dim)")
  ax.legend()
  ax.set_title("diffusion loss by noise level")
  gap = np.asarray(swapped) - np.asarray(own)
  ax_gap.errorbar(t, gap, yerr=2 * np.asarray(gap_se), fmt="o-", capsize=3)
  ax_gap.axhline(0.0, color="gray", lw=1)
  ax_gap.set_xlabel("diffusion time t")
  ax_gap.set_ylabel("swapped - own (bits/dim, +-2 s.e.)")
  ax_gap.set_title("usefulness of w (0 = decoder ignores w)")
  fig.suptitle(title, fontsize=12)
  fig.tight_layout()
  return fig
