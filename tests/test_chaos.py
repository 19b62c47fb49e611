"""Process-level tests (slow: several CLI launches): SIGKILL chaos and SIGTERM exit."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import chaos


@pytest.mark.slow
def test_short_chaos_run_is_bitwise_identical(tmp_path):
  """Two SIGKILLs at seeded random moments. The launches share a compile cache of their
  own (the reference fills it), so a kill can also land while an entry is written."""
  report = tmp_path / "findings.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.chaos", "--kills", "2", "--steps", "20",
       "--out", str(tmp_path / "out"), "--json", str(report),
       "--config.eval.evaluators=elbo,latents"],  # the launches' final evaluation, shortened
      cwd=REPO, capture_output=True, text=True, timeout=1800)
  r = json.loads(report.read_text())
  assert r["kills"] == 2, proc.stdout[-2000:]
  assert r["final_step"] == [20, 20]
  assert r["arrays_compared"] > 100 and r["arrays_differing"] == []
  assert r["state_sha256_equal"]
  assert r["scalars_compared"] > 20 and r["scalars_differing"] == []
  assert r["checkpoints_lost"] == []
  assert proc.returncode == 0 and "RESULT: PASS" in proc.stdout


@pytest.mark.slow
def test_cli_sigterm_saves_checkpoint_and_exits_143(tmp_path):
  workdir = str(tmp_path / "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "vdmrep.main", "--config", "configs/digits.py",
       "--workdir", workdir, "--config.training.num_steps=100000"] + chaos.TINY,
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 900
  while not chaos.steps_on_disk(workdir)[0] and time.time() < deadline:  # training
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143
  m = re.search(r"^interrupted by SIGTERM at step (\d+); checkpoint saved, rerun the same "
                r"command to resume$", err, re.M)
  assert m, err[-2000:]
  assert chaos.steps_on_disk(workdir)[0][-1] == int(m.group(1))
  assert "Traceback" not in err
