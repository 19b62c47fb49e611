"""Pictures (matplotlib, Agg backend) written as PNG to the workdir and to TensorBoard.

Evaluation: latent maps (t-SNE / PCA) and the usefulness-of-w curve; each returns a Figure
that `save` writes, returning its RGB pixels [H, W, 3] uint8. Sampling: sample grids,
denoising trajectories and latent interpolations, each saved at once and returned as RGB
pixels; `to_tensorboard` hands such pixels to a clu metric writer.
"""
from __future__ import annotations

import math
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
  other processes on a shared machine slow it down by an order of magnitude.
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


# -- samples ---------------------------------------------------------------------
def _display(img, vocab_size=256):
  """[H, W, C] pixels -> what imshow wants: [H, W] for one channel, floats in [0, 1]."""
  img = np.asarray(img, np.float64) / (vocab_size - 1)
  return img[..., 0] if img.shape[-1] == 1 else np.clip(img, 0.0, 1.0)


def _latent_display(z):
  """A latent z_t in model scale (about [-1, 1] plus noise) -> [0, 1] for display."""
  z = np.clip((np.asarray(z, np.float64) + 1.0) / 2.0, 0.0, 1.0)
  return z[..., 0] if z.shape[-1] == 1 else z


def tile(images, ncols: int):
  """[N, H, W, C] -> one [rows*(H+1)-1, ncols*(W+1)-1, C] mosaic with 1-pixel gaps."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  rows = math.ceil(n / ncols)
  out = np.full((rows * (h + 1) - 1, ncols * (w + 1) - 1, c), images.max(initial=0),
                images.dtype)
  for i in range(n):
    r, q = divmod(i, ncols)
    out[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = images[i]
  return out


def sample_grid(images, path: str, title: str, inputs=None, vocab_size: int = 256):
  """A square-ish grid of integer-pixel samples [N, H, W, C] with a title; with `inputs`
  (the images that conditioned them, same order) the inputs' grid is drawn on the left."""
  ncols = max(1, math.ceil(math.sqrt(len(images))))
  panels = [("samples", images)] if inputs is None else [("inputs", inputs), ("samples", images)]
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6.6), squeeze=False)
  for ax, (name, imgs) in zip(axes[0], panels):
    ax.imshow(_display(tile(imgs, ncols), vocab_size), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(name if inputs is not None else "", fontsize=11)
    ax.axis("off")
  fig.suptitle(title, fontsize=12)
  fig.tight_layout()
  return save(fig, path)


def trajectory(inputs, frames, frame_t, samples, path: str, title: str, vocab_size: int = 256):
  """Rows: examples. Columns: the input, z_t at the recorded times (left to right, t
  falling), then the decoded sample.

  Args:
    inputs: [B, H, W, C] integer pixels.
    frames: [K, B, H, W, C] latents z_t in model scale.
    frame_t: [K] their times.
    samples: [B, H, W, C] the decoded result.
  """
  b, k = inputs.shape[0], frames.shape[0]
  cols = k + 2
  fig, axes = plt.subplots(b, cols, figsize=(1.1 * cols, 1.1 * b + 0.6), squeeze=False)
  for i in range(b):
    panels = [_display(inputs[i], vocab_size)]
    panels += [_latent_display(frames[j, i]) for j in range(k)]
    panels.append(_display(samples[i], vocab_size))
    for j, img in enumerate(panels):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        label = ("input" if j == 0 else "x (decoded)" if j == cols - 1
                 else f"t={frame_t[j - 1]:.2f}")
        ax.set_title(label, fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save(fig, path)


def interpolation(inputs_a, inputs_b, rows, alphas, path: str, title: str,
                  vocab_size: int = 256):
  """Rows: pairs. Columns: input A, samples at each coefficient, input B.

  Args:
    inputs_a, inputs_b: [P, H, W, C] the two endpoints' images.
    rows: [P, S, H, W, C] samples along the path.
    alphas: [S] interpolation coefficients (0 = A).
  """
  p, s = rows.shape[:2]
  cols = s + 2
  fig, axes = plt.subplots(p, cols, figsize=(1.1 * cols, 1.1 * p + 0.6), squeeze=False)
  for i in range(p):
    panels = [inputs_a[i]] + [rows[i, j] for j in range(s)] + [inputs_b[i]]
    for j, img in enumerate(panels):
      ax = axes[i, j]
      ax.imshow(_display(img, vocab_size), cmap="gray", vmin=0, vmax=1,
                interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        label = ("input A" if j == 0 else "input B" if j == cols - 1
                 else f"a={alphas[j - 1]:.2f}")
        ax.set_title(label, fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save(fig, path)


def labelled_rows(rows, row_labels, col_labels, path: str, title: str, vocab_size: int = 256):
  """A table of images: rows [R, S, H, W, C] with a label per row and per column
  (e.g. step counts x classes, or classes x attribute scales)."""
  r, s = rows.shape[:2]
  fig, axes = plt.subplots(r, s, figsize=(0.9 * s + 1.2, 0.9 * r + 0.6), squeeze=False)
  for i in range(r):
    for j in range(s):
      ax = axes[i, j]
      ax.imshow(_display(rows[i, j], vocab_size), cmap="gray", vmin=0, vmax=1,
                interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(str(col_labels[j]), fontsize=8)
      if j == 0:
        ax.set_ylabel(str(row_labels[i]), fontsize=8, rotation=0, ha="right", va="center")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save(fig, path)


def to_tensorboard(writer, step: int, pictures: dict) -> None:
  """Writes {name: RGB uint8 [H, W, 3]} as images through a clu metric writer."""
  if writer is None or not pictures:
    return
  writer.write_images(step, {name: np.asarray(img)[None] for name, img in pictures.items()})
