"""End to end through the command line: train, checkpoint, log, resume; and the ELBO bound."""
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY_PROBE_FLAGS

TINY = ["--config.model.vdm=mvdm", "--config.model.encoder=te", "--config.model.n_blocks=1",
        "--config.model.channels=8", "--config.training.batch_size=16",
        "--config.training.log_every=2", "--config.training.checkpoint_every=2",
        "--config.eval.max_examples=64", "--config.eval.num_time_samples=1",
        "--config.eval.sample_quality=False", *TINY_PROBE_FLAGS]
SAMPLES = ["--config.eval.sample_quality=True", "--config.sample.num_samples=32",
           "--config.sample.num_steps=10", "--config.sample.num_guided=16",
           "--config.sample.grid_size=16", "--config.sample.classifier_steps=30",
           "--config.sample.num_trajectories=2", "--config.sample.num_interpolations=1"]


def _run(workdir, *flags):
  cmd = [sys.executable, "-m", "vdmrep.main", "--config", os.path.join(ROOT, "configs/digits.py"),
         "--workdir", str(workdir), *TINY, *flags]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  return proc.stdout + proc.stderr


def _eval_summary(out, step):
  """The console's evaluation summary at `step`, its wrapped lines joined."""
  lines = out.splitlines()
  first = [i for i, l in enumerate(lines) if l.startswith(f"eval step {step}:")]
  assert first, out[-3000:]
  end = first[0] + 1
  while end < len(lines) and lines[end].startswith("    "):
    end += 1
  return " ".join(l.strip() for l in lines[first[0]:end])


@pytest.mark.slow
def test_train_writes_checkpoints_and_events_then_resumes(tmp_path):
  out = _run(tmp_path, "--config.training.num_steps=4", *SAMPLES)
  assert "parameters: encoder=" in out
  summary = _eval_summary(out, 4)
  for term in ("recon", "prior", "diffusion", "kl", "encoder KL", "nats/image", "report.md"):
    assert term in summary, summary
  # The console: one line per log step, no library notices, nothing wider than 120.
  steps = [l for l in out.splitlines() if l.startswith("step ")]
  assert [l.split()[1] for l in steps] == ["2/4", "4/4"], out[-3000:]
  for term in ("bpd", "diff", "rec", "prior", "kl", "KL", "nats", "steps/s", "ETA"):
    assert term in steps[0], steps[0]
  assert max(len(l) for l in out.splitlines()) <= 120, out[-3000:]
  assert "train/recon_bpd" not in out and "I0000" not in out and "oneDNN" not in out
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  with open(tmp_path / "report.json") as fh:
    metrics = json.load(fh)["metrics"]
  for key in ("bpd", "kl_nats", "active_units", "mi_nats", "fd_classifier",
              "fd_classifier_floor_real_halves", "guided_class_match"):
    assert key in metrics, key
  assert os.path.exists(tmp_path / "latents.npz")
  out = _run(tmp_path, "--config.training.num_steps=6", "--verbose",
             "--config.eval.evaluators=elbo")  # the report's sections are checked above
  assert "resumed from checkpoint at step 4" in out
  assert "train/recon_bpd" in out and "train/kl_nats" in out  # absl INFO: every scalar
  assert "eval step 6:" in out and "6" in os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow
def test_bad_config_is_one_line_error_before_compiling(tmp_path):
  cmd = [sys.executable, "-m", "vdmrep.main", "--config", os.path.join(ROOT, "configs/digits.py"),
         "--workdir", str(tmp_path), "--config.model.vdm=giant"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 2
  assert "error: config.model.vdm='giant' is not valid" in proc.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_eval_bpd_of_uniform_noise_is_not_below_8_bits(tmp_path):
  """iid uniform 8-bit pixels have entropy exactly 8 bits/dim: a true bound cannot go below."""
  images = np.random.default_rng(0).integers(0, 256, (1500, 8, 8, 1)).astype(np.uint8)
  np.savez(tmp_path / "uniform.npz", images=images)
  out = _run(tmp_path / "wd", f"--config.data.source=npz:{tmp_path / 'uniform.npz'}",
             "--config.training.num_steps=250", "--config.training.batch_size=64",
             "--config.training.checkpoint_every=250", "--config.optim.lr=2e-3",
             "--config.eval.max_examples=0", "--config.eval.num_time_samples=4",
             "--config.eval.evaluators=elbo,baselines")
  line = [l for l in out.splitlines() if l.startswith("eval step 250:")][0]
  bpd, se = float(line.split()[4]), float(line.split()[6])
  assert bpd > 8.0 - 3.0 * se, line
  assert bpd < 10.5, f"model too far from the data to test the bound: {line}"
  assert math.isfinite(se) and se > 0


def test_package_import_is_light_and_versioned():
  """`import vdmrep` gives the installed version and imports neither jax nor tensorflow."""
  code = ("import sys, vdmrep; print(vdmrep.__version__); "
          "print(sorted(m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  version, loaded = proc.stdout.split("\n")[:2]
  with open(os.path.join(ROOT, "pyproject.toml")) as fh:
    assert f'version = "{version}"' in fh.read()
  assert loaded == "[]"
