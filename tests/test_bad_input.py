"""Every bad input gets a one-line error naming the problem, before anything compiles.

Config and data errors are raised by `config_lib.validate` and `data.load`, which
`train.setup` runs before building any jitted function; checkpoint and workdir errors
are in tests/test_checkpoints.py; the CLI turns all of them into `error: ...`, exit 2.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from vdmrep import config_lib, data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**overrides):
  c = config_lib.base_config()
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def one_line(err) -> str:
  msg = str(err.value)
  assert "\n" not in msg
  return msg


CONFIG_CASES = [
    (dict(model__vdm="huge"), "config.model.vdm='huge' is not valid; choose one of "
                              "['original', 'svdm', 'tvdm', 'mvdm', 'unet', 'unet_s']"),
    (dict(model__encoder="xl"), "config.model.encoder='xl' is not valid; choose one of "
                                "['oepp', 'oe', 'se', 'te', 'ue', 'none']"),
    (dict(model__gamma_type="cosine"), "config.model.gamma_type='cosine' is not valid; "
                                       "choose one of ['fixed', 'learned_linear', "
                                       "'learned_nnet', 'per_pixel', "
                                       "'per_pixel_learned_endpoints']"),
    (dict(collapse__schedule="cyclic_typo"), "config.collapse.schedule='cyclic_typo' is not "
                                             "valid"),
    (dict(data__source="mnist"), "config.data.source='mnist' is not valid; use 'digits', "
                                 "'fashion_mnist[:<dir>]', 'tfds:<name>', 'idx:<dir>' or "
                                 "'npz:<file>'"),
    (dict(training__batch_size=0), "config.training.batch_size=0 must be > 0"),
    (dict(training__batch_size=-8), "config.training.batch_size=-8 must be > 0"),
    (dict(model__gamma_min=5.0, model__gamma_max=5.0),
     "config.model.gamma_min=5.0 must be < config.model.gamma_max=5.0"),
    (dict(model__gamma_min=6.0, model__gamma_max=-13.3),
     "config.model.gamma_min=6.0 must be < config.model.gamma_max=-13.3"),
    (dict(training__nan_policy="ignore"), "config.training.nan_policy='ignore' is not valid; "
                                          "choose one of ['stop', 'skip']"),
    (dict(training__max_consecutive_skips=-1),
     "config.training.max_consecutive_skips=-1 must be >= 0"),
]


@pytest.mark.parametrize("overrides,expected", CONFIG_CASES,
                         ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                              for o, _ in CONFIG_CASES])
def test_config_error_names_the_key(overrides, expected):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg(**overrides), num_devices=1)
  assert one_line(err).startswith(expected)


def test_batch_not_divisible_by_devices():
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg(training__batch_size=10), num_devices=4)
  assert one_line(err) == ("config.training.batch_size=10 is not divisible by the 4 devices "
                           "it is sharded over")


def load(source):
  return data.load(cfg(data__source=source).data)


def npz(tmp_path, **arrays):
  path = tmp_path / "d.npz"
  np.savez(path, **arrays)
  return f"npz:{path}"


def test_missing_npz_file(tmp_path):
  with pytest.raises(data.DataError) as err:
    load(f"npz:{tmp_path}/nope.npz")
  assert one_line(err) == f"npz source: file '{tmp_path}/nope.npz' does not exist"


def test_missing_idx_directory(tmp_path):
  with pytest.raises(data.DataError) as err:
    load(f"idx:{tmp_path}/nope")
  assert one_line(err) == f"idx source: directory '{tmp_path}/nope' does not exist"


def test_idx_directory_without_files(tmp_path):
  with pytest.raises(data.DataError) as err:
    load(f"idx:{tmp_path}")
  assert one_line(err) == (f"idx source: no train-images-idx3-ubyte[.gz] or "
                           f"t10k-images-idx3-ubyte[.gz] in '{tmp_path}'")


def test_npz_without_images(tmp_path):
  src = npz(tmp_path, x=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4))
  with pytest.raises(data.DataError) as err:
    load(src)
  assert one_line(err).endswith("has no 'images' array (found ['labels', 'x'])")


@pytest.mark.parametrize("images,expected", [
    (np.zeros((4, 8, 8), np.float32), "images must be integer pixels in [0, 255]; got dtype "
                                      "float32"),
    (np.zeros((4, 64), np.uint8), "images must be [N, H, W, C] (or [N, H, W]); got shape "
                                  "(4, 64)"),
    (np.zeros((2, 4, 8, 8, 1), np.uint8), "images must be [N, H, W, C] (or [N, H, W]); got "
                                          "shape (2, 4, 8, 8, 1)"),
    (np.full((4, 8, 8), 300, np.int16), "pixel values must be in [0, 255]; got range "
                                        "[300, 300]"),
    (np.full((4, 8, 8), -1, np.int16), "pixel values must be in [0, 255]; got range [-1, -1]"),
], ids=["dtype", "rank2", "rank5", "above255", "negative"])
def test_wrong_dtype_rank_range(tmp_path, images, expected):
  src = npz(tmp_path, images=images)
  with pytest.raises(data.DataError) as err:
    load(src)
  assert one_line(err) == f"{src[4:]}['images']: {expected}"


CLI_CASES = [
    (["--config.training.batch_size=0"], "error: config.training.batch_size=0 must be > 0"),
    (["--config.data.source=npz:/nonexistent/x.npz"],
     "error: npz source: file '/nonexistent/x.npz' does not exist"),
    (["--eval_dir=/tmp/x"], "error: --eval_dir is for --mode eval, not --mode train"),
]


@pytest.mark.slow
@pytest.mark.parametrize("flags,expected", CLI_CASES, ids=["config", "data", "eval_dir"])
def test_cli_prints_error_and_exits_2(tmp_path, flags, expected):
  proc = subprocess.run(
      [sys.executable, "-m", "vdmrep.main", "--config", "configs/digits.py",
       "--workdir", str(tmp_path / "w")] + flags,
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if re.match(r"error: ", l)]
  assert errors == [expected]
  assert not (tmp_path / "w" / "checkpoints").exists()  # failed before creating anything
