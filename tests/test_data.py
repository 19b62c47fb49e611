"""Data sources and the deterministic, shardable batch order."""
import gzip
import os

import numpy as np
import pytest

from vdmrep import data
from vdmrep.config_lib import base_config

from conftest import MNIST_DIR


def _cfg(source, **kw):
  c = base_config().data
  c.source = source
  for k, v in kw.items():
    c[k] = v
  return c


def test_digits_split_and_scale():
  from sklearn.datasets import load_digits
  ds = data.load(_cfg("digits"))
  assert ds.image_shape == (8, 8, 1) and ds.train_images.dtype == np.uint8
  assert len(ds.train_images) + len(ds.eval_images) == 1797
  # 0..16 mapped to 0..255: the pixel values are exactly round(v * 255 / 16).
  levels = set(np.unique(ds.train_images).tolist())
  assert levels <= {int(round(v * 255 / 16)) for v in range(17)} and 255 in levels
  # Labels travel with their images.
  raw = load_digits()
  img = ds.eval_images[0, ..., 0]
  match = np.where((np.round(raw.images * 255 / 16) == img).all((1, 2)))[0]
  assert ds.eval_labels[0] in raw.target[match]


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as fh:
    fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_train_and_test_files(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 30), ("t10k", 10)):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 5, 6)))
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
  ds = data.load(_cfg(f"idx:{tmp_path}"))
  assert ds.train_images.shape == (30, 5, 6, 1) and ds.eval_images.shape == (10, 5, 6, 1)
  assert ds.train_labels.shape == (30,)


def test_idx_truncated_file_is_named(tmp_path):
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 5, 5)))
  with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb") as fh:
    raw = fh.read()
  with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
    fh.write(raw[:-7])
  with pytest.raises(data.DataError, match="truncated"):
    data.load(_cfg(f"idx:{tmp_path}"))


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="shared MNIST test split absent")
def test_real_mnist_test_split_is_split_by_seed():
  ds = data.load(_cfg(f"idx:{MNIST_DIR}", eval_fraction=0.2, split_seed=3))
  assert ds.image_shape == (28, 28, 1)
  assert (len(ds.train_images), len(ds.eval_images)) == (8000, 2000)
  assert "not the standard training set" in ds.note
  assert sorted(np.unique(ds.eval_labels).tolist()) == list(range(10))
  again = data.load(_cfg(f"idx:{MNIST_DIR}", eval_fraction=0.2, split_seed=3))
  np.testing.assert_array_equal(ds.eval_images, again.eval_images)


def test_npz_source(tmp_path):
  imgs = np.random.default_rng(0).integers(0, 256, (40, 4, 4, 3)).astype(np.uint8)
  np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(40) % 3)
  ds = data.load(_cfg(f"npz:{tmp_path / 'd.npz'}", eval_fraction=0.25))
  assert ds.image_shape == (4, 4, 3) and len(ds.eval_images) == 10
  # The split is a partition of the file's images.
  all_rows = {r.tobytes() for r in imgs}
  got = [r.tobytes() for r in np.concatenate([ds.train_images, ds.eval_images])]
  assert len(got) == 40 and set(got) == all_rows


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load(_cfg("tfds:mnist"))
  assert ds.image_shape == (28, 28, 1) and ds.train_images.dtype == np.uint8
  assert len(ds.train_images) == 12 and ds.train_labels.shape == (12,)


def test_batch_order_is_a_function_of_seed_and_step():
  a = [data.batch_indices(10, 4, s, seed=7) for s in range(6)]
  b = [data.batch_indices(10, 4, s, seed=7) for s in reversed(range(6))][::-1]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # Each epoch visits every example exactly once.
  stream = np.concatenate([data.batch_indices(10, 5, s, seed=7) for s in range(4)])
  for epoch in range(2):
    assert sorted(stream[10 * epoch:10 * (epoch + 1)].tolist()) == list(range(10))
  assert not np.array_equal(data.batch_indices(10, 4, 0, 7), data.batch_indices(10, 4, 0, 8))


def test_process_slices_partition_the_global_batch():
  ds = data.load(_cfg("digits"))
  full = data.train_batch(ds, 5, 16, seed=0)
  parts = [data.train_batch(ds, 5, 16, 0, process_index=p, process_count=4) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), full)


def test_eval_batches_pad_and_mask():
  imgs = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
  batches = list(data.eval_batches(imgs, 4))
  assert [b.shape[0] for b, _ in batches] == [4, 4, 4]
  kept = np.concatenate([b[m > 0] for b, m in batches])
  np.testing.assert_array_equal(kept, imgs)


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR),
                    reason="dataset-fashion-mnist not installed (.ci/run installs it)")
def test_real_fashion_mnist_standard_split():
  ds = data.load(_cfg("fashion_mnist"))
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.eval_images.shape == (10000, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8 and ds.eval_images.max() == 255
  for labels in (ds.train_labels, ds.eval_labels):
    assert sorted(np.unique(labels).tolist()) == list(range(10))
  # The standard split is balanced: 6,000 training and 1,000 test images per class.
  assert np.bincount(ds.train_labels).tolist() == [6000] * 10
  assert np.bincount(ds.eval_labels).tolist() == [1000] * 10


def test_fashion_mnist_directory_override_and_missing_files(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 12), ("t10k", 4)):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
  ds = data.load(_cfg(f"fashion_mnist:{tmp_path}"))
  assert (len(ds.train_images), len(ds.eval_images)) == (12, 4)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(data.DataError, match="t10k-labels.*dataset-fashion-mnist") as err:
    data.load(_cfg(f"fashion_mnist:{tmp_path}"))
  assert "\n" not in str(err.value)
  with pytest.raises(data.DataError, match="dataset-fashion-mnist"):
    data.load(_cfg(f"fashion_mnist:{tmp_path / 'absent'}"))
