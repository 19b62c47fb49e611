"""--mode sample through the command line: EMA params of the latest checkpoint -> files."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY_PROBE_FLAGS

TINY = ["--config.model.vdm=mvdm", "--config.model.encoder=te", "--config.model.n_blocks=1",
        "--config.model.channels=8", "--config.training.batch_size=16",
        "--config.training.checkpoint_every=2", "--config.training.log_every=2",
        "--config.eval.max_examples=16", "--config.eval.num_time_samples=1",
        "--config.sample.num_steps=3", "--config.sample.num_samples=10",
        "--config.sample.batch_size=8", "--config.sample.num_guided=6",
        "--config.sample.grid_size=9", "--config.sample.trajectory_frames=3",
        "--config.sample.num_trajectories=2", "--config.sample.num_interpolations=2",
        "--config.sample.interpolation_steps=3", "--config.sample.classifier_steps=30",
        *TINY_PROBE_FLAGS]


def _run(workdir, *flags):
  cmd = [sys.executable, "-m", "vdmrep.main", "--config", os.path.join(ROOT, "configs/digits.py"),
         "--workdir", str(workdir), *TINY, *flags]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.mark.slow  # three CLI processes, each compiling the train state
def test_sample_mode_needs_a_checkpoint_then_writes_pictures_and_npz(tmp_path):
  proc = _run(tmp_path, "--mode=sample")
  assert proc.returncode == 2 and "error: no checkpoint to sample from" in proc.stderr
  proc = _run(tmp_path, "--config.training.num_steps=2", "--config.eval.sample_quality=False",
              "--config.eval.evaluators=elbo")  # sample mode needs only the checkpoint
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = _run(tmp_path, "--mode=sample")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sampled step 2: 10 unconditional, 6 guided/reconstruction" in proc.stdout
  s = np.load(tmp_path / "samples.npz")
  assert s["unconditional"].shape == (10, 8, 8, 1) and s["unconditional"].dtype == np.uint8
  assert s["guided"].shape == s["reconstruction"].shape == s["inputs"].shape == (6, 8, 8, 1)
  assert s["reconstruction_frames"].shape == (3, 2, 8, 8, 1)
  np.testing.assert_allclose(s["guided_frame_t"], [1.0, 1 / 3, 0.0])
  for name in ("grid_unconditional", "grid_guided", "grid_reconstruction", "trajectory_guided",
               "trajectory_reconstruction", "interpolation"):
    with open(tmp_path / "pictures" / f"{name}.png", "rb") as fh:
      assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name
