"""The console: one line per log step within 120 characters, durations, wrapping, and
library notices off unless asked for."""
import os
import subprocess
import sys

import pytest

from vdmrep import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scalars(**kw):
  base = {"bpd": 5.2141, "diffusion_bpd": 5.1893, "recon_bpd": 0.0191, "prior_bpd": 0.0031,
          "kl_bpd": 0.0026, "kl_nats": 0.1803, "loss_bpd": 5.2141}
  base.update(kw)
  return {f"train/{k}": v for k, v in base.items()}


def test_train_line_reads_the_terms_rate_and_eta():
  line = console.train_line(300, 1500, _scalars(), steps_per_s=6.1)
  assert line == ("step 300/1500  bpd 5.214 = diff 5.189 + rec 0.019 + prior 0.003 + kl 0.003"
                  " | KL 0.18 nats | 6.10 steps/s  ETA 3m17s")
  # A remedy trains another objective: the line shows it beside the ELBO.
  assert "| loss 92.310 |" in console.train_line(1, 2, _scalars(loss_bpd=92.31), 1.0)
  # No encoder: no KL; the rate unknown: no ETA.
  bare = {"train/bpd": 3.0, "train/loss_bpd": 3.0}
  assert console.train_line(5, 10, bare, 0.0) == "step 5/10  bpd 3.000 | 0.00 steps/s  ETA ?"


@pytest.mark.parametrize("value", [1e-9, 123456.0, -3.5e7, float("nan"), float("inf")])
def test_train_line_fits_120_columns_whatever_the_numbers(value):
  s = _scalars(**{k: value for k in ("bpd", "diffusion_bpd", "recon_bpd", "prior_bpd",
                                     "kl_bpd", "kl_nats")}, loss_bpd=value * 3 + 1)
  line = console.train_line(99_999_999, 100_000_000, s, steps_per_s=1e-7)
  assert len(line) <= console.MAX_WIDTH and line.startswith("step 99999999/100000000")


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (197, "3m17s"),
                                          (7500, "2h05m"), (1e7, ">99h"),
                                          (float("nan"), "?")])
def test_duration(seconds, text):
  assert console.duration(seconds) == text


def test_wrap_keeps_every_line_within_the_width():
  text = "eval step 9: " + " ".join(f"term{i} {i * 1.2345:.4g}," for i in range(60))
  lines = console.wrap(text).splitlines()
  assert len(lines) > 1 and all(len(l) <= console.MAX_WIDTH for l in lines)
  assert " ".join(l.strip() for l in lines) == text


_QUIET = """
import sys
from vdmrep import console
console.quiet_libraries(verbose={verbose})
from absl import logging
logging.info("an absl INFO line")
import tensorflow as tf
tf.constant(1.0) + 1.0
print("verbose" if console.verbose() else "quiet")
"""


@pytest.mark.parametrize("verbose", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_library_notices_are_off_by_default_and_a_flag_brings_them_back(verbose):
  done = subprocess.run([sys.executable, "-c", _QUIET.format(verbose=verbose)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={k: v for k, v in os.environ.items()
                             if k != "TF_CPP_MIN_LOG_LEVEL"})
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == ("verbose" if verbose else "quiet")
  if verbose:
    assert "an absl INFO line" in done.stderr
  else:
    assert done.stderr == "", done.stderr
