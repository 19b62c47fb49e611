"""Data sources -> in-memory uint8 arrays -> deterministic batches.

Sources (`config.data.source`):
  digits       scikit-learn's bundled 8x8 digits (1,797 images, 0..16 mapped to 0..255)
  fashion_mnist[:<dir>]  Fashion-MNIST's idx files (60,000 train / 10,000 test, 10 labels);
               <dir> defaults to FASHION_MNIST_DIR, where Debian's `dataset-fashion-mnist`
               package installs them
  tfds:<name>  a tensorflow-datasets image dataset (mnist, fashion_mnist, cifar10, ...)
  idx:<dir>    MNIST-format idx(.gz) files; train-* and t10k-* if both exist, else the
               t10k files split into train/eval with `split_seed`
  npz:<file>   `images` uint8 [N, H, W, C] (or [N, H, W]), optional `labels` [N]

Every dataset fits in host memory (the largest, CIFAR-10, is 150 MB). The batch
at a step is a pure function of (seed, step): the training order is a fresh
permutation per epoch drawn from (seed, epoch), so resuming at step s reproduces
exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gzip
import os
import zipfile
import zlib
from typing import Callable, Iterable, Iterator, Optional

import numpy as np


class DataError(ValueError):
  """Bad or missing data; the message names the file or field."""


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"


@dataclasses.dataclass
class Dataset:
  name: str
  train_images: np.ndarray            # uint8 [N, H, W, C]
  eval_images: np.ndarray             # uint8 [M, H, W, C]
  train_labels: Optional[np.ndarray] = None  # int32 [N]
  eval_labels: Optional[np.ndarray] = None   # int32 [M]
  note: str = ""                      # e.g. how the eval split was made
  held_out_images: Optional[np.ndarray] = None  # eval images of a held-out class (OOD)

  @property
  def image_shape(self) -> tuple:
    return tuple(self.train_images.shape[1:])


def check_images(images, where: str) -> np.ndarray:
  """Validates integer pixels in [0, 255] of rank 4 (rank 3 gets one channel) -> uint8."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise DataError(f"{where}: images must be [N, H, W, C] (or [N, H, W]); got shape "
                    f"{images.shape}")
  if images.shape[0] == 0:
    raise DataError(f"{where}: no images")
  if not (np.issubdtype(images.dtype, np.integer) or images.dtype == np.bool_):
    raise DataError(f"{where}: images must be integer pixels in [0, 255]; got dtype "
                    f"{images.dtype}")
  lo, hi = int(images.min()), int(images.max())
  if lo < 0 or hi > 255:
    raise DataError(f"{where}: pixel values must be in [0, 255]; got range [{lo}, {hi}]")
  return images.astype(np.uint8)


def check_label_array(labels, num_images: int, where: str) -> np.ndarray:
  """Validates class labels: [N] (or [N, 1]) integers in [0, 2**31) -> int32 [N].

  Floats are accepted only when every value is a finite whole number (some tools save
  labels as float64); anything else would be silently rounded or wrapped.
  """
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    raise DataError(f"{where}: labels must be [N] (one class per image); got shape "
                    f"{labels.shape}")
  if len(labels) != num_images:
    raise DataError(f"{where}: {len(labels)} labels for {num_images} images")
  if labels.dtype == np.bool_ or not (np.issubdtype(labels.dtype, np.integer) or
                                      np.issubdtype(labels.dtype, np.floating)):
    raise DataError(f"{where}: labels must be integer classes; got dtype {labels.dtype}")
  if labels.size and np.issubdtype(labels.dtype, np.floating):
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
      raise DataError(f"{where}: labels must be whole numbers; got non-finite or fractional "
                      "values")
  if labels.size:
    lo, hi = labels.min(), labels.max()
    if lo < 0 or hi >= 2**31:
      raise DataError(f"{where}: labels must be classes in [0, 2**31); got range "
                      f"[{lo:g}, {hi:g}]")
  return labels.astype(np.int32)


def _split(images, labels, eval_fraction, seed):
  perm = np.random.default_rng(seed).permutation(len(images))
  n_eval = max(1, int(round(eval_fraction * len(images))))
  ev, tr = perm[:n_eval], perm[n_eval:]
  lab = (lambda idx: None) if labels is None else (lambda idx: labels[idx])
  return images[tr], lab(tr), images[ev], lab(ev)


def load_digits(data_cfg) -> Dataset:
  from sklearn.datasets import load_digits as sk_digits
  d = sk_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  tr, trl, ev, evl = _split(images, labels, data_cfg.eval_fraction, data_cfg.split_seed)
  return Dataset("digits", tr, ev, trl, evl,
                 note=f"scikit-learn digits, random {1 - data_cfg.eval_fraction:.0%}/"
                      f"{data_cfg.eval_fraction:.0%} split (split_seed={data_cfg.split_seed})")


def read_idx(path: str) -> np.ndarray:
  """Reads an idx(.gz) file (MNIST format) into a uint8/int array."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as fh:
      raw = fh.read()
  except (OSError, EOFError, zlib.error) as err:  # gzip: EOFError when truncated
    raise DataError(f"cannot read idx file {path}: {type(err).__name__}: {err}") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise DataError(f"{path} is not an idx file (bad magic number)")
  if raw[2] != 0x08:
    raise DataError(f"{path}: only unsigned-byte idx files are supported (type {raw[2]:#x})")
  ndim = raw[3]
  if len(raw) < 4 + 4 * ndim:
    raise DataError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
  dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise DataError(f"{path}: truncated (header says {dims}, found {data.size} bytes)")
  return data.reshape(dims)


def _find(directory, stem):
  for name in (stem, stem + ".gz"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_idx(directory: str, data_cfg) -> Dataset:
  if not os.path.isdir(directory):
    raise DataError(f"idx source: directory {directory!r} does not exist")
  files = {f"{k}-{kind}": _find(directory, f"{k}-{kind}-idx{n}-ubyte")
           for k in ("train", "t10k") for kind, n in (("images", 3), ("labels", 1))}
  def pair(k):
    imgs = check_images(read_idx(files[f"{k}-images"]), files[f"{k}-images"])
    labs = files[f"{k}-labels"]
    if labs is not None:
      labs = check_label_array(read_idx(labs), len(imgs), labs)
    return imgs, labs
  if files["train-images"] and files["t10k-images"]:
    tr, trl = pair("train")
    ev, evl = pair("t10k")
    return Dataset(f"idx:{directory}", tr, ev, trl, evl, note="idx train/t10k files")
  only = "t10k" if files["t10k-images"] else "train" if files["train-images"] else None
  if only is None:
    raise DataError(f"idx source: no train-images-idx3-ubyte[.gz] or "
                    f"t10k-images-idx3-ubyte[.gz] in {directory!r}")
  imgs, labs = pair(only)
  tr, trl, ev, evl = _split(imgs, labs, data_cfg.eval_fraction, data_cfg.split_seed)
  return Dataset(f"idx:{directory}", tr, ev, trl, evl,
                 note=f"only the {only} idx split exists: split {1 - data_cfg.eval_fraction:.0%}/"
                      f"{data_cfg.eval_fraction:.0%} into train/eval with split_seed="
                      f"{data_cfg.split_seed} (not the standard training set)")


def load_fashion_mnist(directory: str, data_cfg) -> Dataset:
  """Fashion-MNIST (Xiao et al. 2017): the standard 60,000/10,000 split, labels 0..9."""
  directory = directory or FASHION_MNIST_DIR
  missing = [f"{k}-{kind}-idx{n}-ubyte" for k in ("train", "t10k")
             for kind, n in (("images", 3), ("labels", 1))
             if _find(directory, f"{k}-{kind}-idx{n}-ubyte") is None]
  if missing:
    raise DataError(f"fashion_mnist source: {', '.join(missing)}[.gz] not found in "
                    f"{directory!r}; install the Debian package {FASHION_MNIST_PACKAGE} "
                    "or name the directory as fashion_mnist:<dir>")
  ds = load_idx(directory, data_cfg)
  return dataclasses.replace(ds, name=f"fashion_mnist:{directory}",
                             note="Fashion-MNIST train/t10k idx files")


def check_npz_archive(path: str, max_expansion: float) -> None:
  """Raises DataError unless `path` is a zip archive (an .npz) whose arrays expand to at
  most `max_expansion` times the file's size (0 = no cap): a small file must not fill
  the memory when decompressed."""
  try:
    is_zip = zipfile.is_zipfile(path)
  except OSError as err:
    raise DataError(f"npz source: cannot read {path!r}: {err.strerror or err}") from None
  if not is_zip:
    raise DataError(f"npz source: {path!r} is not an .npz (zip) archive; write it with "
                    "numpy.savez or numpy.savez_compressed")
  try:
    with zipfile.ZipFile(path) as zf:
      expanded = sum(i.file_size for i in zf.infolist())
  except (OSError, zipfile.BadZipFile) as err:
    raise DataError(f"npz source: cannot read {path!r}: {err}") from None
  size = max(1, os.path.getsize(path))
  if max_expansion and expanded > max_expansion * size:
    raise DataError(f"npz source: {path!r} expands from {size:,} to {expanded:,} bytes, more "
                    f"than config.data.npz_max_expansion={max_expansion:g} times its size; "
                    "raise that (0 = no cap) if the data is meant to be this large")


def load_npz(path: str, data_cfg) -> Dataset:
  if not os.path.exists(path):
    raise DataError(f"npz source: file {path!r} does not exist")
  check_npz_archive(path, data_cfg.get("npz_max_expansion", 0))
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as err:  # zipfile/pickle errors come in many types
    raise DataError(f"npz source: cannot read {path!r}: {type(err).__name__}: "
                    f"{' '.join(str(err).split())}") from None
  if "images" not in arrays:
    raise DataError(f"npz source: {path!r} has no 'images' array (found {sorted(arrays)})")
  images = check_images(arrays["images"], f"{path}['images']")
  labels = arrays.get("labels")
  if labels is not None:
    labels = check_label_array(labels, len(images), f"{path}['labels']")
  tr, trl, ev, evl = _split(images, labels, data_cfg.eval_fraction, data_cfg.split_seed)
  return Dataset(f"npz:{path}", tr, ev, trl, evl,
                 note=f"npz split {1 - data_cfg.eval_fraction:.0%}/{data_cfg.eval_fraction:.0%}"
                      f" (split_seed={data_cfg.split_seed})")


def load_tfds(name: str, data_cfg) -> Dataset:
  import tensorflow_datasets as tfds
  kwargs = {"data_dir": data_cfg.tfds_data_dir} if data_cfg.tfds_data_dir else {}
  def split(s):
    try:
      # Batched reads rather than batch_size=-1, which aborts inside TF on datasets of
      # unknown cardinality (tfds' mock data among them).
      chunks = list(tfds.as_numpy(tfds.load(name, split=s, **kwargs).batch(4096)))
    except Exception as err:  # DatasetNotFoundError, download errors, ...
      raise DataError(f"tfds:{name} split {s!r} could not be loaded: {err}") from None
    images = np.concatenate([c["image"] for c in chunks])
    labels = np.concatenate([c["label"] for c in chunks]) if "label" in chunks[0] else None
    return (check_images(images, f"tfds:{name}[{s}]"),
            None if labels is None else check_label_array(labels, len(images),
                                                              f"tfds:{name}[{s}]"))
  tr, trl = split("train")
  ev, evl = split("test")
  return Dataset(f"tfds:{name}", tr, ev, trl, evl, note=f"tfds {name} train/test")


def load(data_cfg) -> Dataset:
  """The dataset named by `data_cfg.source`, validated."""
  src = data_cfg.source
  if src == "digits":
    ds = load_digits(data_cfg)
  elif src == "fashion_mnist" or src.startswith("fashion_mnist:"):
    ds = load_fashion_mnist(src[len("fashion_mnist:"):], data_cfg)
  elif src.startswith("tfds:"):
    ds = load_tfds(src[5:], data_cfg)
  elif src.startswith("idx:"):
    ds = load_idx(src[4:], data_cfg)
  elif src.startswith("npz:"):
    ds = load_npz(src[4:], data_cfg)
  else:
    raise DataError(f"unknown data source {src!r}")
  if data_cfg.get("max_train_examples", 0):
    n = data_cfg.max_train_examples
    ds.train_images = ds.train_images[:n]
    ds.train_labels = None if ds.train_labels is None else ds.train_labels[:n]
  if ds.train_images.shape[1:] != ds.eval_images.shape[1:]:
    raise DataError(f"{src}: train images {ds.train_images.shape[1:]} and eval images "
                    f"{ds.eval_images.shape[1:]} differ in shape")
  return ds


def hold_out_class(ds: Dataset, label: int) -> Dataset:
  """Drops class `label` from both splits; its eval images become `held_out_images` (OOD).

  The model then never sees the class in training, so scoring those images is a real
  out-of-distribution test. `label` < 0 returns `ds` unchanged.
  """
  if label < 0:
    return ds
  if ds.train_labels is None or ds.eval_labels is None:
    raise DataError(f"config.eval.ood_holdout_class={label}: {ds.name} has no labels")
  if not np.any(ds.eval_labels == label):
    raise DataError(f"config.eval.ood_holdout_class={label}: no eval image of that class in "
                    f"{ds.name} (labels {sorted(set(ds.eval_labels.tolist()))})")
  tr, ev = ds.train_labels != label, ds.eval_labels != label
  return dataclasses.replace(
      ds, train_images=ds.train_images[tr], train_labels=ds.train_labels[tr],
      eval_images=ds.eval_images[ev], eval_labels=ds.eval_labels[ev],
      held_out_images=ds.eval_images[~ev],
      note=ds.note + f"; class {label} removed from training and eval (it is the OOD set)")


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the global training batch at `step`: a function of (seed, step) only.

  Example number k = step * batch_size + i of the stream is position k % N of the
  permutation for epoch k // N, drawn from (seed, epoch).
  """
  k = step * batch_size + np.arange(batch_size)
  epochs, pos = np.divmod(k, num_examples)
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e)]).permutation(num_examples)
    sel = epochs == e
    out[sel] = perm[pos[sel]]
  return out


def train_batch(ds: Dataset, step: int, batch_size: int, seed: int,
                process_index: int = 0, process_count: int = 1, with_labels: bool = False):
  """This process's slice of the global batch at `step`: uint8 [batch_size / P, H, W, C]
  (with_labels: a tuple (images, int32 labels [batch_size / P]))."""
  idx = batch_indices(len(ds.train_images), batch_size, step, seed)
  per = batch_size // process_count
  mine = idx[process_index * per:(process_index + 1) * per]
  if with_labels:
    return ds.train_images[mine], ds.train_labels[mine]
  return ds.train_images[mine]


def check_labels(ds: Dataset, num_classes: int, key: str) -> None:
  """A class-conditional model (num_classes > 0) needs labels in [0, num_classes)."""
  if not num_classes:
    return
  if ds.train_labels is None or ds.eval_labels is None:
    raise DataError(f"{key}={num_classes}: {ds.name} has no labels")
  hi = int(max(ds.train_labels.max(), ds.eval_labels.max()))
  if hi >= num_classes or min(ds.train_labels.min(), ds.eval_labels.min()) < 0:
    raise DataError(f"{key}={num_classes}: {ds.name} has labels up to {hi}; they must be "
                    f"in [0, {num_classes})")


def prefetch(make_batch: Callable[[int], np.ndarray], steps: Iterable[int],
             depth: int = 2) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (step, make_batch(step)) for each step, computed `depth` steps ahead.

  A background thread builds the next batches while the device runs the current
  step. The batches are exactly those of calling `make_batch` in order (it must be a
  pure function of the step, like `train_batch`), so prefetching never changes what
  a run sees; closing the generator stops the thread.
  """
  if depth < 1:
    raise ValueError(f"prefetch depth must be >= 1, got {depth}")
  steps = iter(steps)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
  queue = collections.deque()
  try:
    def fill():
      while len(queue) < depth:
        step = next(steps, None)
        if step is None:
          return
        queue.append((step, pool.submit(make_batch, step)))
    fill()
    while queue:
      step, future = queue.popleft()
      fill()
      yield step, future.result()
  finally:
    for _, future in queue:
      future.cancel()
    pool.shutdown(wait=False)


def eval_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Fixed-size batches over all of `images`, the last padded: yields (batch, mask [B])."""
  n = len(images)
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    mask = np.ones(batch_size, np.float32)
    if len(batch) < batch_size:
      mask[len(batch):] = 0.0
      batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - len(batch), 0)], 0)
    yield batch, mask
