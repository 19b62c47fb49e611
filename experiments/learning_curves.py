"""Learning curves (held-out bpd vs step and vs training wall minutes) and time-to-bpd, from
the periodic evaluations runs write. Reads only run directories; trains nothing.

  python experiments/learning_curves.py mvdm=runs/fm_mvdm unet=runs/fm_unet \\
      --out experiments/figures/fashion_curves --targets 3.3 3.2 3.1 3.04 --histogram 4.588

Per run: every workdir/reports/step<N>.json gives (step, bpd, bpd_se, test images); wall
minutes at a step are summed from the TensorBoard events the training writes (clu's
`steps_per_sec` per logging interval: interval steps / rate), so time spent stopped
between an interruption and its resume is not counted. Runs that shared their cores with
other jobs have inflated event rates: `--step-seconds LABEL=S ...` (for every run) replaces
the minutes by step x S / 60, S a quiet machine's measured seconds per step (e.g. from
`python -m benchmarks.decoder_step`), so the curves compare compute, not contention.
Writes OUT_curves.png (bpd vs step and vs minutes), OUT_time_to_bpd.png (minutes and steps
to first reach each target) and prints both as a markdown table.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re


def read_reports(workdir: str) -> list:
  """[(step, bpd, bpd_se, num_eval)] from workdir/reports/step<N>.json, by step."""
  out = []
  for path in glob.glob(os.path.join(workdir, "reports", "step*.json")):
    if not re.fullmatch(r"step\d+\.json", os.path.basename(path)):
      continue
    with open(path) as fh:
      rep = json.load(fh)
    m = rep.get("metrics", {})
    if m.get("bpd") is None:
      continue
    n = rep.get("probes", {}).get("num_eval") or m.get("num_images") or rep.get(
        "dataset", {}).get("num_eval")
    out.append((int(rep["step"]), float(m["bpd"]), float(m.get("bpd_se", float("nan"))), n))
  return sorted(out)


def read_rates(workdir: str) -> list:
  """[(step, steps_per_sec)] from the TensorBoard event files in `workdir`, by step."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  from tensorboard.util import tensor_util
  rates = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in EventFileLoader(path).Load():
      for v in event.summary.value:
        if v.tag != "steps_per_sec":
          continue
        value = (float(tensor_util.make_ndarray(v.tensor)) if v.HasField("tensor")
                 else float(v.simple_value))
        rates[int(event.step)] = value  # a resumed run rewrites a step: keep the last
  return sorted(rates.items())


def minutes_at(rates: list, steps: list) -> list:
  """Cumulative training minutes at each of `steps`: sum over logging intervals of
  (interval steps / steps_per_sec), linear within an interval; nan past the last rate."""
  cum, prev, points = 0.0, 0, [(0, 0.0)]
  for step, sps in rates:
    if sps > 0 and step > prev:
      cum += (step - prev) / sps / 60.0
      points.append((step, cum))
    prev = step
  out = []
  for s in steps:
    val = float("nan")
    for (s0, m0), (s1, m1) in zip(points, points[1:]):
      if s0 <= s <= s1:
        val = m0 + (m1 - m0) * (s - s0) / (s1 - s0)
        break
    out.append(val)
  return out


def time_to(curve: list, target: float):
  """(step, minutes) of the first eval with bpd <= target, or (None, None)."""
  for step, minutes, bpd in curve:
    if bpd <= target:
      return step, minutes
  return None, None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("runs", nargs="+", help="LABEL=WORKDIR (or WORKDIR: its name is the label)")
  p.add_argument("--out", required=True, help="figure path prefix")
  p.add_argument("--targets", type=float, nargs="*", default=[3.3, 3.2, 3.1, 3.04])
  p.add_argument("--histogram", type=float, default=None,
                 help="a baseline bpd drawn as a line (e.g. the per-pixel histogram's)")
  p.add_argument("--step-seconds", nargs="*", default=[],
                 help="LABEL=SECONDS per run: minutes = step x SECONDS / 60 (quiet-machine "
                 "compute) instead of the events' wall rates; give it for every run or none")
  args = p.parse_args(argv)
  step_seconds = {}
  for spec in args.step_seconds:
    label, _, sec = spec.partition("=")
    try:
      step_seconds[label] = float(sec)
    except ValueError:
      raise SystemExit(f"error: --step-seconds {spec!r}: expected LABEL=SECONDS") from None
  curves = {}
  for spec in args.runs:
    label, _, wd = spec.rpartition("=") if "=" in spec else (None, None, spec)
    label = label or os.path.basename(os.path.normpath(wd))
    reps = read_reports(wd)
    if not reps:
      raise SystemExit(f"error: {wd}: no reports/step<N>.json with a bpd")
    if step_seconds:
      if label not in step_seconds:
        raise SystemExit(f"error: --step-seconds has no value for run {label!r} (give every "
                         f"run one, or none)")
      mins = [r[0] * step_seconds[label] / 60 for r in reps]
    else:
      mins = minutes_at(read_rates(wd), [r[0] for r in reps])
    curves[label] = [(s, m, b, se, n) for (s, b, se, n), m in zip(reps, mins)]
  unknown = sorted(set(step_seconds) - set(curves))
  if unknown:
    raise SystemExit(f"error: --step-seconds names no run: {unknown}")
  minutes_label = ("minutes at the quiet s/step (step x s/step)" if step_seconds
                   else "training wall minutes")

  print("| run | step | train minutes | bpd | ± s.e. | test images |\n|---|---|---|---|---|---|")
  for label, pts in curves.items():
    for s, m, b, se, n in pts:
      print(f"| {label} | {s} | {m:.1f} | {b:.4f} | {se:.4f} | {n} |")
  print("\n| run | " + " | ".join(f"to {t:g} bpd: step / min" for t in args.targets) + " |")
  print("|---|" + "---|" * len(args.targets))
  for label, pts in curves.items():
    cells = []
    for t in args.targets:
      s, m = time_to([(s, m, b) for s, m, b, _, _ in pts], t)
      cells.append("not reached" if s is None else f"{s} / {m:.1f}")
    print(f"| {label} | " + " | ".join(cells) + " |")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for label, pts in curves.items():
    steps, mins, bpd, se = ([x[i] for x in pts] for i in range(4))
    for ax, xs in zip(axes, (steps, mins)):
      ax.errorbar(xs, bpd, yerr=[2 * e if not math.isnan(e) else 0 for e in se], marker="o",
                  ms=3, capsize=2, label=label)
  for ax, xl in zip(axes, ("training step", minutes_label)):
    for t in args.targets:
      ax.axhline(t, color="gray", lw=0.6, ls=":")
    if args.histogram is not None:
      ax.axhline(args.histogram, color="k", lw=0.8, ls="--", label="per-pixel histogram")
    ax.set_xlabel(xl)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("held-out negative ELBO (bits/dim, ± 2 s.e.)")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out + "_curves.png", dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for label, pts in curves.items():
    xs, ys = [], []
    for t in args.targets:
      s, m = time_to([(s, m, b) for s, m, b, _, _ in pts], t)
      if s is not None:
        xs.append(t)
        ys.append(m)
    ax.plot(xs, ys, marker="o", label=label)
  ax.set_xlabel("target held-out bpd")
  ax.set_ylabel(minutes_label + " to first reach it")
  ax.invert_xaxis()
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out + "_time_to_bpd.png", dpi=120)
  plt.close(fig)
  print(f"\nfigures: {args.out}_curves.png, {args.out}_time_to_bpd.png")


if __name__ == "__main__":
  main()
