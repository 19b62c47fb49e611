"""`tfds:` sources reach the download step on a fresh install: every module the tfds
prepare path imports is installed (a missing one, such as importlib_resources, fails here
rather than on a user's first run). The network itself is replaced by a sentinel."""
import pytest

from vdmrep import config_lib, data


class _ReachedTheNetwork(Exception):
  pass


def test_tfds_source_reaches_the_download_step(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def download(self, *args, **kwargs):
    raise _ReachedTheNetwork("download requested")

  for name in ("download", "download_and_extract"):
    monkeypatch.setattr(tfds.download.DownloadManager, name, download)
  cfg = config_lib.base_config().data
  cfg.source, cfg.tfds_data_dir = "tfds:mnist", str(tmp_path)
  with pytest.raises(data.DataError, match="tfds:mnist split 'train'.*download requested"):
    data.load(cfg)
