"""experiments/rescore_samples.py: one stronger classifier scores every run's saved samples,
with a floor of as many real images as samples."""
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import rescore_samples  # noqa: E402

from vdmrep import data as data_lib  # noqa: E402
from vdmrep import config_lib  # noqa: E402


def _run(out, name, samples=None):
  d = os.path.join(out, "runs", name)
  os.makedirs(d)
  data = dict(config_lib.base_config().data)
  data.update(source="digits")
  with open(os.path.join(d, "report.json"), "w") as fh:
    json.dump({"config": {"data": data}}, fh)
  if samples is not None:
    np.savez(os.path.join(d, "samples.npz"), **samples)


def test_real_images_score_at_the_floor_and_noise_far_above(tmp_path, capsys):
  out = str(tmp_path)
  cfg = config_lib.base_config().data
  cfg.source = "digits"
  ev = data_lib.load(cfg).eval_images
  noise = np.random.default_rng(0).integers(0, 256, ev[:200].shape).astype(np.uint8)
  # "real": its samples are held-out images and its guided samples are their inputs.
  _run(out, "real", {"unconditional": ev[:200], "inputs": ev[:200], "guided": ev[:200]})
  _run(out, "noise", {"unconditional": noise, "inputs": ev[:200], "guided": noise})
  _run(out, "unfinished")
  rescore_samples.main(["--out", out, "--classifier-steps", "150", "--classifier-batch", "32",
                        "--floor-draws", "4"])
  text = capsys.readouterr().out
  real = json.load(open(os.path.join(out, "runs", "real", "rescored_s150.json")))
  noise = json.load(open(os.path.join(out, "runs", "noise", "rescored_s150.json")))
  assert real["classifier_test_accuracy"] > 0.8
  assert real["num_samples"] == 200 and real["floor_draws"] == 4
  # Held-out images are one more draw of the floor; noise is nothing like the data.
  assert real["fd"] < real["floor_mean"] + 5 * real["floor_sd"]
  assert noise["fd"] > 10 * real["fd"]
  assert real["guided_match"] == 1.0 and real["guided_match_shuffled"] < 0.5
  assert "| unfinished | no samples.npz |" in text
  assert os.path.exists(os.path.join(out, "rescore_s150.md"))


def test_bad_flags_are_one_line_errors(tmp_path):
  with pytest.raises(SystemExit, match="holds no run directories"):
    rescore_samples.main(["--out", str(tmp_path)])
  with pytest.raises(SystemExit, match="must be >= 1"):
    rescore_samples.main(["--out", str(tmp_path), "--floor-draws", "0"])
