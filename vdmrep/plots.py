"""Pictures written to the workdir (PNG) and TensorBoard: sample grids, denoising
trajectories, latent interpolations.

Each function saves one figure and returns it rendered as an RGB uint8 array [H, W, 3],
which `to_tensorboard` hands to a clu metric writer unchanged.
"""
from __future__ import annotations

import math
import os

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only; never needs a display
  import matplotlib.pyplot as plt
  return plt


def _display(img, vocab_size=256):
  """[H, W, C] pixels -> what imshow wants: [H, W] for one channel, floats in [0, 1]."""
  img = np.asarray(img, np.float64) / (vocab_size - 1)
  return img[..., 0] if img.shape[-1] == 1 else np.clip(img, 0.0, 1.0)


def _latent_display(z):
  """A latent z_t in model scale (about [-1, 1] plus noise) -> [0, 1] for display."""
  z = np.clip((np.asarray(z, np.float64) + 1.0) / 2.0, 0.0, 1.0)
  return z[..., 0] if z.shape[-1] == 1 else z


def _save(fig, path):
  plt = _pyplot()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  fig.canvas.draw()
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return rgb


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
  plt = _pyplot()
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
  return _save(fig, path)


def trajectory(inputs, frames, frame_t, samples, path: str, title: str, vocab_size: int = 256):
  """Rows: examples. Columns: the input, z_t at the recorded times (left to right, t
  falling), then the decoded sample.

  Args:
    inputs: [B, H, W, C] integer pixels.
    frames: [K, B, H, W, C] latents z_t in model scale.
    frame_t: [K] their times.
    samples: [B, H, W, C] the decoded result.
  """
  plt = _pyplot()
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
  return _save(fig, path)


def interpolation(inputs_a, inputs_b, rows, alphas, path: str, title: str,
                  vocab_size: int = 256):
  """Rows: pairs. Columns: input A, samples at each coefficient, input B.

  Args:
    inputs_a, inputs_b: [P, H, W, C] the two endpoints' images.
    rows: [P, S, H, W, C] samples along the path.
    alphas: [S] interpolation coefficients (0 = A).
  """
  plt = _pyplot()
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
  return _save(fig, path)


def to_tensorboard(writer, step: int, pictures: dict) -> None:
  """Writes {name: RGB uint8 [H, W, 3]} as images through a clu metric writer."""
  if writer is None or not pictures:
    return
  writer.write_images(step, {name: np.asarray(img)[None] for name, img in pictures.items()})
