"""experiments/records.py: a study's finished reports survive as committed records and come
back as finished runs whose table is the same, without clobbering what is already there."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import harness  # noqa: E402
import records  # noqa: E402


def _run(out, name, report=None, wall="61.5\n"):
  d = os.path.join(out, "runs", name)
  os.makedirs(os.path.join(d, "checkpoints"), exist_ok=True)
  with open(os.path.join(d, "checkpoints", "big.bin"), "wb") as fh:
    fh.write(b"\0" * 1000)
  if report is not None:
    with open(os.path.join(d, "report.json"), "w") as fh:
      json.dump(report, fh)
    with open(os.path.join(d, "wall_seconds.txt"), "w") as fh:
      fh.write(wall)
  return d


def test_save_then_restore_gives_back_the_finished_runs_only(tmp_path):
  out, rec, back = str(tmp_path / "out"), str(tmp_path / "rec"), str(tmp_path / "back")
  rep = {"step": 5000, "metrics": {"bpd": 3.0820, "bpd_se": 0.0123},
         "per_image": {"bpd": [3.1, 2.9, 3.0000000000000004]}}
  _run(out, "unconditional", rep)
  _run(out, "capped")  # unfinished: checkpoints only
  assert records.save(out, rec, log=lambda *_: None) == ["unconditional"]
  assert os.listdir(rec) == ["unconditional.json.gz"]
  # Saving again writes the same bytes (a fixed gzip header): nothing new for git.
  before = open(os.path.join(rec, "unconditional.json.gz"), "rb").read()
  assert records.save(out, rec, log=lambda *_: None) == []
  assert open(os.path.join(rec, "unconditional.json.gz"), "rb").read() == before

  assert records.restore(rec, back, log=lambda *_: None) == ["unconditional"]
  run = harness.Run("unconditional", "configs/fashion_mnist.py", [])
  assert harness.is_finished(back, run)
  assert harness.load_report(back, run) == rep  # floats exactly, per-image values included
  assert harness.wall_minutes(back, run) == pytest.approx(61.5 / 60)
  assert not os.path.exists(os.path.join(back, "runs", "unconditional", "checkpoints"))
  assert not os.path.exists(os.path.join(back, "runs", "capped"))


def test_restore_keeps_a_report_that_differs_unless_told(tmp_path):
  out, rec, back = str(tmp_path / "out"), str(tmp_path / "rec"), str(tmp_path / "back")
  _run(out, "elbo", {"metrics": {"bpd": 3.0835}})
  records.save(out, rec, log=lambda *_: None)
  _run(back, "elbo", {"metrics": {"bpd": 3.5}})  # a re-trained run under the same name
  said = []
  assert records.restore(rec, back, log=said.append) == []
  assert any("differs" in s for s in said)
  path = os.path.join(back, "runs", "elbo", "report.json")
  assert json.load(open(path))["metrics"]["bpd"] == 3.5
  assert records.restore(rec, back, replace=True, log=lambda *_: None) == ["elbo"]
  assert json.load(open(path))["metrics"]["bpd"] == 3.0835


def test_the_command_line_names_a_missing_folder(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "records.py"),
                         "restore", "--records", str(tmp_path / "nope"), "--out",
                         str(tmp_path)], capture_output=True, text=True)
  assert proc.returncode != 0
  assert "no records folder" in proc.stderr and "nope" in proc.stderr
