"""Chaos test: SIGKILL a training run K times at random moments; is the result unchanged?

Runs the CLI once uninterrupted (the reference), then again in a fresh workdir,
killing it with SIGKILL after a seeded random delay and restarting it, K times; the
last launch runs to the end. Then compares, bitwise, every array of the final
checkpoint (params, EMA, optimiser state, step, fault record) and every logged
metric (train and eval scalars, the last value written for each step; the two
wall-clock scalars steps_per_sec and uptime excepted). After each kill it checks
that no checkpoint was lost: the newest step on disk never goes back, the restart
resumes from exactly that step, and no checkpoint is reported unreadable.

Delays: a launch is killed u * D seconds after it prints its parameter count
(model built, step about to compile), u ~ U(0, 1) from --seed. D = c + 2 * (steps
left) / (kills left + 1) * (s/step), with the start-up time c and s/step measured in
the launches so far, so the K kills spread over the run (expected progress per launch
at most its share). A kill can land anywhere: compiling, restoring, training, saving,
evaluating.

  python -m benchmarks.chaos --kills 12 --steps 300 --out /tmp/chaos
  python -m benchmarks.chaos --kills 2 --steps 30 --json /tmp/chaos.json  # short

Exit status 0 iff the final parameters and metrics are bitwise equal and no
checkpoint was lost. Extra `--config.*` flags are passed to the CLI.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small model on 8x8 digits: seconds per launch of startup, ~0.1 s per step.
TINY = ["--config.model.n_blocks=1", "--config.model.channels=8",
        "--config.training.batch_size=16", "--config.training.log_every=5",
        "--config.training.checkpoint_every=5", "--config.training.eval_every=0",
        "--config.eval.max_examples=32", "--config.eval.batch_size=32",
        "--config.eval.num_time_samples=1", "--config.eval.sample_quality=False",
        "--config.eval.probe_max_train=256", "--config.eval.probe_cs=0.1,10",
        "--config.eval.probe_cv_folds=2"]
WALL_CLOCK_TAGS = ("steps_per_sec", "uptime")
LOG_LINE = re.compile(r"\] \[(\d+)\] train/")  # clu's logging writer


def launch(workdir, steps, extra, env):
  cmd = [sys.executable, "-m", "vdmrep.main", "--config", "configs/digits.py",
         "--workdir", workdir, f"--config.training.num_steps={steps}"] + TINY + extra
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)


class Output:
  """Collects a child's output in a thread; `anchor` is set when it prints 'parameters:'."""

  def __init__(self, proc):
    self.lines, self.anchor, self.anchor_time = [], threading.Event(), None
    self.logs = []  # (time, step) of each train log line
    self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
    self.thread.start()

  def _read(self, proc):
    for line in proc.stdout:
      self.lines.append(line)
      if line.startswith("parameters:"):
        self.anchor_time = time.time()
        self.anchor.set()
      m = LOG_LINE.search(line)
      if m:
        self.logs.append((time.time(), int(m.group(1))))
    self.anchor.set()  # exited (or died) before printing it

  def text(self):
    self.thread.join()
    return "".join(self.lines)


def steps_on_disk(workdir):
  """(committed checkpoint steps, names of leftover orbax tmp dirs)."""
  d = os.path.join(workdir, "checkpoints")
  names = os.listdir(d) if os.path.isdir(d) else []
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def read_scalars(workdir) -> dict:
  """{(tag, step): float32 value}, the last written (by wall time) over all event files."""
  import tensorflow as tf  # heavy; only here
  events = []
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for e in tf.compat.v1.train.summary_iterator(path):
      for v in e.summary.value:
        if v.metadata.plugin_data.plugin_name != "scalars":
          continue
        events.append((e.wall_time, v.tag, e.step, float(tf.make_ndarray(v.tensor))))
  out = {}
  for _, tag, step, value in sorted(events):
    if tag not in WALL_CLOCK_TAGS:
      out[(tag, step)] = value
  return out


def final_state(workdir):
  """(step, {leaf path: np.ndarray}, meta) of the newest checkpoint."""
  import jax
  import orbax.checkpoint as ocp
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mgr.latest_step()
  r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                meta=ocp.args.JsonRestore()))
  leaves = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(r["state"])[0]}
  mgr.close()
  return step, leaves, r["meta"]


def reference_speed(bpd_events: list, anchor_time: float) -> tuple[float, float]:
  """(seconds per step, seconds from 'parameters:' to the first step: compiling) of the
  reference run, from the (wall_time, step) of its train/bpd events."""
  (t0, s0), (t1, s1) = bpd_events[0], bpd_events[-1]
  tau = (t1 - t0) / max(1, s1 - s0)
  return tau, max(0.0, t0 - anchor_time - s0 * tau)


def bpd_times(workdir):
  import tensorflow as tf
  out = []
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for e in tf.compat.v1.train.summary_iterator(path):
      if any(v.tag == "train/bpd" for v in e.summary.value):
        out.append((e.wall_time, e.step))
  return sorted(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--kills", type=int, default=12)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
  ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "out", "chaos"))
  ap.add_argument("--json", default="", help="also write the findings here")
  ap.add_argument("--max-delay", type=float, default=0.0,
                  help="fixed D in seconds; 0 = adaptive (see above; before any launch has "
                       "trained, c = a quarter of the reference's compile time, as restarts "
                       "load the compiled step from the cache)")
  ap.add_argument("--no-compile-cache", action="store_true",
                  help="recompile in every launch (slower: kills land in compilation more often)")
  args, extra = ap.parse_known_args()
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  env = dict(os.environ)
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
    env.pop(name, None)  # this run's own cache, or none
  if not args.no_compile_cache:  # restarts load the step instead of recompiling it
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(args.out, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  ref_dir, run_dir = os.path.join(args.out, "reference"), os.path.join(args.out, "chaos")

  t = time.time()
  proc = launch(ref_dir, args.steps, extra, env)
  out = Output(proc)
  if proc.wait() != 0:
    sys.exit(f"reference run failed (exit {proc.returncode}):\n{out.text()[-3000:]}")
  print(f"reference run: {args.steps} steps, {time.time() - t:.0f} s, exit 0", flush=True)
  tau, compile_s = reference_speed(bpd_times(ref_dir), out.anchor_time)
  starts = []  # seconds from 'parameters:' to the first step, per launch that got there
  taus = []  # seconds per step, per launch that logged twice
  print(f"  {tau * 1e3:.0f} ms/step, {compile_s:.0f} s to compile; kill delays u * D after "
        f"'parameters:', u ~ U(0, 1) seeded by {args.seed}, D = "
        + (f"{args.max_delay} s" if args.max_delay else
           "c + 2 * (steps left) / (kills left + 1) * (s/step), c = median start-up, "
           "both as measured in the launches so far"), flush=True)

  rng = np.random.default_rng(args.seed)
  kills, lost, log = 0, [], []
  newest = None  # newest committed step seen on disk
  launches = 0
  print(f"{'kill':>4} {'delay_s':>7} {'D_s':>6} {'resumed_at':>10} {'newest_after':>12} "
        f"{'tmp_left':>8}", flush=True)
  while True:
    launches += 1
    proc = launch(run_dir, args.steps, extra, env)
    out = Output(proc)
    killed = False
    if kills < args.kills:
      c = float(np.median(starts)) if starts else compile_s / 4
      left = args.steps - (newest or 0)
      tau_now = float(np.median(taus)) if taus else tau
      max_delay = args.max_delay or c + 2.0 * left / (args.kills - kills + 1) * tau_now
      delay = float(rng.uniform()) * max_delay
      out.anchor.wait()
      try:
        proc.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        killed = True
      proc.wait()
    else:
      proc.wait()
    text = out.text()
    m = re.search(r"resumed from checkpoint at step (\d+)", text)
    # No 'resumed' line: a fresh start if it trained, else killed before it got that far.
    resumed = int(m.group(1)) if m else 0 if out.logs else None
    if out.logs and out.anchor_time:
      (t_log, s_log), (t_end, s_end) = out.logs[0], out.logs[-1]
      if s_end > s_log:
        taus.append((t_end - t_log) / (s_end - s_log))
      starts.append(max(0.0, t_log - out.anchor_time - (s_log - resumed)
                        * (float(np.median(taus)) if taus else tau)))
    if resumed is not None and resumed != (newest or 0):
      lost.append(f"launch {launches} resumed at {resumed}, newest on disk was {newest}")
    if "unreadable" in text:
      lost.append(f"launch {launches}: " + next(l for l in text.splitlines() if "unreadable" in l))
    steps, tmp = steps_on_disk(run_dir)
    if newest is not None and (not steps or steps[-1] < newest):
      lost.append(f"launch {launches}: newest step went from {newest} to {steps[-1:]}")
    newest = steps[-1] if steps else newest
    if killed:
      kills += 1
      log.append(dict(kill=kills, delay_s=round(delay, 2), max_delay_s=round(max_delay, 1),
                      resumed_at=resumed,
                      newest_after=newest, tmp_left=len(tmp)))
      print(f"{kills:>4} {delay:>7.2f} {max_delay:>6.1f} {'-' if resumed is None else resumed:>10} {str(newest):>12} "
            f"{len(tmp):>8}", flush=True)
      continue
    if proc.returncode != 0:
      sys.exit(f"launch {launches} failed (exit {proc.returncode}):\n{text[-3000:]}")
    break
  print(f"final launch: resumed at {resumed}, ran to step {newest}, exit 0 "
        f"({launches} launches, {kills} SIGKILLs)", flush=True)
  if kills < args.kills:
    print(f"only {kills} of {args.kills} kills landed before the run finished; use more --steps")

  ref_step, ref_leaves, ref_meta = final_state(ref_dir)
  run_step, run_leaves, run_meta = final_state(run_dir)
  differ = [k for k in ref_leaves if k not in run_leaves
            or ref_leaves[k].tobytes() != run_leaves[k].tobytes()
            or ref_leaves[k].dtype != run_leaves[k].dtype]
  ref_sc, run_sc = read_scalars(ref_dir), read_scalars(run_dir)
  sc_differ = sorted(k for k in set(ref_sc) | set(run_sc)
                     if np.float32(ref_sc.get(k, np.nan)).tobytes()
                     != np.float32(run_sc.get(k, np.nan)).tobytes())
  ok = (not differ and not sc_differ and not lost and ref_step == run_step == args.steps
        and kills >= args.kills)
  findings = dict(
      kills=kills, launches=launches, steps=args.steps, final_step=[ref_step, run_step],
      arrays_compared=len(ref_leaves), arrays_differing=differ[:10],
      state_sha256_equal=ref_meta.get("state_sha256") == run_meta.get("state_sha256"),
      scalars_compared=len(ref_sc), scalars_differing=[list(k) for k in sc_differ[:10]],
      kills_during_save=sum(1 for r in log if r["tmp_left"]),
      checkpoints_lost=lost, per_kill=log, ok=ok)
  print(f"final step: reference {ref_step}, chaos {run_step}")
  print(f"arrays (params, EMA, optimiser, step, health): {len(ref_leaves)} compared, "
        f"{len(differ)} differ; state SHA-256 equal: {findings['state_sha256_equal']}")
  print(f"logged scalars (train + eval, per step): {len(ref_sc)} compared, "
        f"{len(sc_differ)} differ" + (f" e.g. {sc_differ[:3]}" if sc_differ else ""))
  print(f"kills that left a half-written checkpoint (orbax tmp dir): "
        f"{findings['kills_during_save']}")
  print(f"checkpoints lost or unreadable: {len(lost)}" + "".join(f"\n  {l}" for l in lost))
  print("RESULT: " + ("PASS: bitwise identical to the uninterrupted run" if ok else "FAIL"))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(findings, f, indent=1)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
