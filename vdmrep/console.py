"""What a run prints: one line per log step, a short evaluation summary, quiet libraries.

The full metrics go to TensorBoard (clu's writer) and to workdir/report.{md,json}; the
console gets lines a person reads at a glance, none over `MAX_WIDTH` characters:

  step 300/1500  bpd 5.214 = diff 5.189 + rec 0.019 + prior 0.003 + kl 0.003 | KL 0.18 nats |
  6.1 steps/s  ETA 3m17s

(one line; wrapped here). `--verbose` on vdmrep.main brings back absl INFO logs (every
scalar clu writes), TensorFlow's and JAX's notices and the full markdown report.
"""
from __future__ import annotations

import logging
import math
import os
import textwrap
import time

MAX_WIDTH = 120


def quiet_libraries(verbose: bool = False) -> None:
  """Hides absl INFO, TensorFlow's C++ and Python notices and JAX's backend notices
  unless `verbose`. Call before TensorFlow is imported: it is imported here, with the
  process's stderr closed meanwhile, because its C++ start-up notices (CPU features,
  oneDNN) ignore TF_CPP_MIN_LOG_LEVEL. An import error is still raised."""
  from absl import logging as absl_logging
  if verbose:
    absl_logging.set_verbosity(absl_logging.INFO)
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ("jax._src.xla_bridge", "tensorflow"):
    logging.getLogger(name).setLevel(logging.ERROR)
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      try:
        import tensorflow  # noqa: F401  (clu's writers and tfds import it later)
      except ImportError:
        pass  # the train step runs without it; its users say so when they need it
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def verbose() -> bool:
  """Whether INFO logs are on (`--verbose`): then the console also gets the full report."""
  from absl import logging as absl_logging
  return absl_logging.get_verbosity() >= absl_logging.INFO


def duration(seconds: float) -> str:
  """'12s', '3m17s', '2h05m', '>99h'; '?' when unknown (NaN or infinite)."""
  if not math.isfinite(seconds):
    return "?"
  s = int(round(max(seconds, 0.0)))
  if s >= 100 * 3600:
    return ">99h"
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _num(v: float) -> str:
  return f"{v:.3f}" if abs(v) < 100 else f"{v:.4g}"


def train_line(step: int, num_steps: int, scalars: dict, steps_per_s: float) -> str:
  """The log step's line from the interval's mean metrics.

  scalars: {'train/<name>': value} as train.py writes them (bits/dim per dimension of
  an image; `kl_nats` per image). Shows the beta = 1 ELBO and its terms, the trained
  objective when a remedy makes it differ, the encoder KL in nats per image, the rate
  over the interval and the time left at that rate. At most MAX_WIDTH characters.
  """
  get = lambda k: scalars.get(f"train/{k}")
  line = f"step {step}/{num_steps}"
  if get("bpd") is not None:
    terms = [f"{short} {_num(get(k))}" for short, k in (
        ("diff", "diffusion_bpd"), ("rec", "recon_bpd"), ("prior", "prior_bpd"),
        ("kl", "kl_bpd")) if get(k) is not None]
    line += f"  bpd {_num(get('bpd'))}" + (" = " + " + ".join(terms) if terms else "")
  loss = get("loss_bpd")
  if loss is not None and (get("bpd") is None or abs(loss - get("bpd")) > 5e-4):
    line += f" | loss {_num(loss)}"  # a remedy trains another objective
  if get("kl_nats") is not None:
    line += f" | KL {get('kl_nats'):.2f} nats"
  eta = (num_steps - step) / steps_per_s if steps_per_s > 0 else math.nan
  line += f" | {steps_per_s:.2f} steps/s  ETA {duration(eta)}"
  return line[:MAX_WIDTH]


def wrap(text: str) -> str:
  """`text` in lines of at most MAX_WIDTH characters (continuations indented)."""
  return "\n".join(textwrap.fill(para, MAX_WIDTH, subsequent_indent="    ",
                                 break_on_hyphens=False)
                   for para in text.splitlines())


class Rate:
  """Steps per second between consecutive calls (restart it after compiling)."""

  def __init__(self, step: int):
    self.restart(step)

  def restart(self, step: int) -> None:
    self.step, self.time = step, time.perf_counter()

  def __call__(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self.step) / max(now - self.time, 1e-9)
    self.step, self.time = step, now
    return rate
