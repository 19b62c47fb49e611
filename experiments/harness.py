"""Runs a list of vdmrep trainings, skips finished ones, and tabulates their reports.

A run is (name, config file, command-line overrides). Each trains and evaluates with
`python -m vdmrep.main` into OUT/runs/<name>/ and is *finished* when that directory holds
`report.json` (written by the final evaluation); a re-run skips finished runs and resumes
unfinished ones from their checkpoints. Tables are built only from those report files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # configs/*.py, loaded in-process by the studies, import configs.common
  sys.path.insert(0, ROOT)


@dataclasses.dataclass
class Run:
  name: str
  config: str                  # path relative to the repo root
  overrides: list              # ["--config.a.b=v", ...]
  labels: dict = dataclasses.field(default_factory=dict)  # row labels for the table


def run_dir(out: str, run: Run) -> str:
  return os.path.join(out, "runs", run.name)


def is_finished(out: str, run: Run) -> bool:
  return os.path.exists(os.path.join(run_dir(out, run), "report.json"))


def main_argv(out: str, run: Run) -> list:
  """The `python -m vdmrep.main` argv that trains + evaluates `run`. Its workdir is absolute:
  the trainer runs from the repo root, `out` is relative to the caller's cwd."""
  return [sys.executable, "-m", "vdmrep.main", "--config", os.path.join(ROOT, run.config),
          "--workdir", os.path.abspath(run_dir(out, run)), *run.overrides]


def wait_for_other_trainer(wd: str, log=print, poll: float = 30.0) -> bool:
  """Blocks while another process trains in `wd` (its workdir lock is held); True if it did.

  Starting a second trainer there would only fail on the lock and be logged as a failure;
  waiting keeps the slot taken for as long as the other trainer uses its core, so a study
  restarted with a new row order can pick up runs a killed driver left running.
  """
  from vdmrep import reliability
  holder = reliability.training_pid(wd)
  if holder is None:
    return False
  log(f"[{os.path.basename(wd)}] already training under PID {holder}: waiting for it")
  while reliability.training_pid(wd) is not None:
    time.sleep(poll)
  return True


def execute(out: str, run: Run, log=print, poll: float = 30.0) -> float:
  """Trains + evaluates one run (resuming if interrupted); returns wall seconds.

  A run another process is training (its workdir lock held) is waited for, not started
  twice; it is resumed here only if that process stops before finishing it.
  """
  wd = os.path.abspath(run_dir(out, run))
  os.makedirs(wd, exist_ok=True)
  if wait_for_other_trainer(wd, log, poll) and is_finished(out, run):
    log(f"[{run.name}] finished by the other process")
    return 0.0
  cmd = main_argv(out, run)
  with open(os.path.join(wd, "command.txt"), "w") as fh:
    fh.write(" ".join(cmd[1:]) + "\n")
  start = time.time()
  with open(os.path.join(wd, "stdout.log"), "a") as so, open(os.path.join(wd, "stderr.log"), "a") as se:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=so, stderr=se)
  seconds = time.time() - start
  with open(os.path.join(wd, "wall_seconds.txt"), "a") as fh:  # interrupted parts count too
    fh.write(f"{seconds:.1f}\n")
  if proc.returncode != 0:
    log(f"[{run.name}] FAILED (exit {proc.returncode}); see {wd}/stderr.log")
  else:
    log(f"[{run.name}] done in {seconds / 60:.1f} min")
  return seconds


def run_all(out: str, runs: list, parallel: int = 1, log=print, on_finish=None) -> None:
  """Executes the unfinished `runs`, `parallel` at a time; `on_finish(run)` is called as each
  one finishes (report.json written), e.g. to keep a record of it at once."""
  todo = [r for r in runs if not is_finished(out, r)]
  log(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; running {len(todo)} "
      f"({parallel} at a time)")

  def one(run):
    execute(out, run, log)
    if on_finish is not None and is_finished(out, run):
      on_finish(run)

  with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    list(pool.map(one, todo))


def load_report(out: str, run: Run):
  path = os.path.join(run_dir(out, run), "report.json")
  if not os.path.exists(path):
    return None
  with open(path) as fh:
    return json.load(fh)


def get(report, path, default=None):
  """report['a']['b'] for path 'a.b'; `default` when any part is missing."""
  node = report
  for part in path.split("."):
    if not isinstance(node, dict) or part not in node:
      return default
    node = node[part]
  return node


def wall_minutes(out: str, run: Run) -> float:
  path = os.path.join(run_dir(out, run), "wall_seconds.txt")
  if not os.path.exists(path):
    return float("nan")
  with open(path) as fh:
    return sum(float(x) for x in fh.read().split()) / 60.0


def markdown_table(header: list, rows: list) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def hardware() -> str:
  import jax
  dev = jax.devices()[0]
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"JAX {jax.__version__} on {dev.platform}:{dev.device_kind}")
