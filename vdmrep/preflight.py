"""Checks run before any work: numeric config domains, the data against the model, the
resume policy, and a memory estimate. Each failure is one line naming the problem.

The config checks return a message (or None) and import nothing from `config_lib`, so
the one validation place can raise its own ConfigError with it. The data, resume and
memory checks need the loaded dataset or a checkpoint record and run in `train.setup`
and before the first compile.
"""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np

from vdmrep.data import DataError

# Integer keys that may be negative, with their documented sentinel values.
INT_SENTINELS = {
    "eval.ood_holdout_class": {-1: "off"},
    "eval.seed": {-1: "config.seed"},
    "distributed.process_id": {-1: "from the environment"},
    "sample.label": {-1: "every class in turn"},
}
# Float keys whose domain is narrower than "finite": (low, low excluded, high, high excluded).
# Keys checked by their own module (collapse, eval, sampling) are not repeated here.
FLOAT_DOMAINS = {
    "optim.lr": (0.0, True, None, False),
    "optim.eps": (0.0, True, None, False),
    "optim.weight_decay": (0.0, False, None, False),
    "optim.grad_clip": (0.0, True, None, False),
    "sample.t_start": (0.0, True, 1.0, False),
    "sample.classifier_lr": (0.0, True, None, False),
}


def _flat(d, prefix=""):
  for k, v in d.items():
    if hasattr(v, "items"):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def config_problem(config) -> str | None:
  """The first numeric key that is not finite or outside its domain, as one line.

  Every float must be finite; every integer >= 0 unless it is a documented sentinel
  (INT_SENTINELS); FLOAT_DOMAINS narrows some floats further. None if all are fine.
  """
  for key, v in _flat(config):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      continue
    if isinstance(v, float) and not math.isfinite(v):
      return f"config.{key}={v!r} must be a finite number"
    if isinstance(v, int) and v < 0 and v not in INT_SENTINELS.get(key, {}):
      extra = "".join(f" or {s} ({what})" for s, what in INT_SENTINELS.get(key, {}).items())
      return f"config.{key}={v} must be >= 0{extra}"
    if key in FLOAT_DOMAINS:
      lo, lo_open, hi, hi_open = FLOAT_DOMAINS[key]
      if lo is not None and (v <= lo if lo_open else v < lo):
        return f"config.{key}={v!r} must be {'>' if lo_open else '>='} {lo}"
      if hi is not None and (v >= hi if hi_open else v > hi):
        return f"config.{key}={v!r} must be {'<' if hi_open else '<='} {hi}"
  return None


# -- the data against the config -------------------------------------------------------


def check_dataset(ds, config) -> None:
  """Raises DataError if the loaded data cannot train or evaluate with `config`.

  Checks at least one training and one evaluation image, pixel values below
  `config.model.vocab_size`, and (when labels exist, so the probes of the final
  evaluation will fit classifiers on them) at least two classes and enough examples
  for the k-NN probe.
  """
  name, e = ds.name, config.eval
  if len(ds.train_images) == 0:
    raise DataError(f"{name}: no training images left (config.data.max_train_examples="
                    f"{config.data.max_train_examples}, eval_fraction={config.data.eval_fraction}"
                    ", held-out class included); the data must give at least one")
  if len(ds.eval_images) == 0:
    raise DataError(f"{name}: no evaluation images; the data must give at least one")
  vocab = config.model.vocab_size
  hi = max(int(a.max()) for a in (ds.train_images, ds.eval_images, ds.held_out_images)
           if a is not None and a.size)
  if hi >= vocab:
    raise DataError(f"{name}: pixel values reach {hi} but config.model.vocab_size={vocab} "
                    f"(pixels must be < vocab_size); set config.model.vocab_size="
                    f"{max(256, hi + 1)}")
  if ds.train_labels is None or ds.eval_labels is None:
    return
  n = e.probe_max_train or len(ds.train_labels)
  classes = np.unique(ds.train_labels[:n])
  if len(classes) < 2:
    raise DataError(f"{name}: the training labels used by the probes (the first {n}) hold "
                    f"one class ({classes.tolist()}); the probes need at least two; drop "
                    "the labels from the data or add other classes")
  if min(n, len(ds.train_labels)) < e.knn_k:
    raise DataError(f"{name}: {min(n, len(ds.train_labels))} labelled training images are "
                    f"fewer than config.eval.knn_k={e.knn_k} neighbours")


def data_digest(ds) -> str:
  """SHA-256 of the training images and labels (what the batches are drawn from)."""
  h = hashlib.sha256()
  for a in (ds.train_images, ds.train_labels):
    if a is not None:
      h.update(f"{a.dtype}{a.shape}".encode())
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# -- resume policy ------------------------------------------------------------------------

# What must match for a resumed run to continue the same run; the model is compared
# separately (checkpoints.check_compatible: parameter shapes).
RESUME_KEYS = ("seed", "training.batch_size")
RESUME_SECTIONS = ("optim",)
DATA_KEYS = ("data.source", "data.eval_fraction", "data.split_seed", "data.max_train_examples")


def resume_differences(saved: dict, config, saved_data: str | None, data: str) -> list[str]:
  """'key: saved -> now' for each setting that differs from the checkpoint's record.

  `saved` is the checkpoint's config (a dict); `saved_data`/`data` are data digests
  (`data_digest`); without a saved digest the data config keys are compared instead.
  """
  if not saved:
    return []
  old = dict(_flat(saved))
  new = dict(_flat(config.to_dict()))
  keys = list(RESUME_KEYS) + [k for k in new if k.split(".")[0] in RESUME_SECTIONS]
  if saved_data is None:
    keys += DATA_KEYS
  diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys
           if k in old and k in new and old[k] != new[k]]
  if saved_data is not None and saved_data != data:
    diffs.append("the training data (images or labels) differ from the saved run's")
  return diffs


def check_resume(meta: dict | None, config, data: str, directory: str) -> list[str]:
  """Refuses (CheckpointError) to resume a checkpoint saved with other settings unless
  `config.training.allow_config_change`; returns the differences (logged by the caller)."""
  from vdmrep.checkpoints import CheckpointError  # late: keeps config validation light
  if meta is None:
    return []
  diffs = resume_differences(meta.get("config"), config, meta.get("data_sha256"), data)
  if diffs and not config.training.get("allow_config_change", False):
    raise CheckpointError(
        f"{directory} holds a run saved with other settings ({'; '.join(diffs)}); rerun with "
        "the saved settings, use another --workdir, or pass "
        "--config.training.allow_config_change=True to continue with the new ones")
  return diffs


# -- memory -------------------------------------------------------------------------------


def machine_bytes() -> int | None:
  """Memory this process may use: physical memory, or a smaller cgroup limit (bytes)."""
  try:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    return None
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        text = f.read().strip()
      if text.isdigit():
        total = min(total, int(text))
    except OSError:
      pass
  return total


def device_bytes() -> int | None:
  """Memory of one accelerator (bytes), or None on CPU (host memory then applies)."""
  import jax
  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    return None
  stats = dev.memory_stats() or {}
  return stats.get("bytes_limit")


def estimate_train_bytes(config, image_shape, num_params: int, num_devices: int = 1) -> int:
  """A lower-bound estimate of one device's memory for a training step (bytes).

  Parameters, EMA, gradients and two Adam moments (5 float32 copies), plus the score
  network's activations kept for the backward pass: every ResNet block at the top
  resolution stores at least its input and output, [B, H, W, channels] float32 each,
  and the attention block a [chunk, P, P] matrix and its gradient, P the pixels at
  its resolution. The true
  figure is larger (XLA temporaries), so a refusal never rests on an overestimate.
  """
  from vdmrep.models import score_net
  from vdmrep.models.unet import UNET_SIZES
  m = config.model
  h, w, c = image_shape
  b = max(1, config.training.batch_size // num_devices)
  if m.get("decoder", "vdm") != "vdm":  # a conv decoder: parameters only
    return 5 * 4 * num_params
  if m.vdm in UNET_SIZES:  # the top level only; attention at the lowest level
    size = UNET_SIZES[m.vdm]
    levels = len(m.get("channel_mult") or size.channel_mult)
    attn_pixels = (h >> (levels - 1)) * (w >> (levels - 1))
  else:
    size = score_net.VDM_SIZES[m.vdm]
    attn_pixels = h * w
  blocks, ch = m.n_blocks or size.n_blocks, m.channels or size.channels
  act = b * h * w * max(ch, c) * 4 * 2 * (2 * blocks + 4)
  chunk_cfg = m.get("attention_chunk", 0)  # examples per attention chunk; 0 = all
  if chunk_cfg == -1:  # auto: one example at a time on CPU
    import jax
    chunk = 1 if jax.default_backend() == "cpu" else b
  else:
    chunk = min(b, chunk_cfg) if chunk_cfg else b
  attn = chunk * attn_pixels ** 2 * 4 * 2
  return 5 * 4 * num_params + act + attn


def memory_problem(config, image_shape, num_params: int, num_devices: int = 1) -> str | None:
  """One line if the estimated training memory exceeds the machine's, else None."""
  if not config.training.get("memory_check", True):
    return None
  need = estimate_train_bytes(config, image_shape, num_params, num_devices)
  have = device_bytes() or machine_bytes()
  if have is None or need <= have:
    return None
  return (f"training needs at least {need / 2**30:.1f} GiB per device (batch "
          f"{config.training.batch_size} of {'x'.join(map(str, image_shape))} images, "
          f"{num_params:,} parameters) but this machine has {have / 2**30:.1f} GiB; lower "
          "config.training.batch_size (or the model size), or set "
          "config.training.memory_check=False to try anyway")
