"""Flags, budgets and the results table shared by the study scripts."""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys

import harness

# The MNIST studies' data source: tfds's MNIST by default; offline, point it at a
# directory of MNIST idx files (e.g. VDMREP_MNIST_SOURCE=idx:/data/mnist; a directory with
# only the test split is split train/eval by a fixed seed).
MNIST_IDX = os.environ.get("VDMREP_MNIST_SOURCE", "tfds:mnist")

# Report metrics (report.json["metrics"]) shown in every study table.
def _fmt(x, digits=3):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def add_common_flags(p):
  p.add_argument("--out", required=True, help="output directory (runs/, tables, figures)")
  p.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
  p.add_argument("--steps", type=int, default=0,
                 help="training steps per run (default: 1500 on digits, 3000 on mnist)")
  p.add_argument("--full-budget", action="store_true",
                 help="the configs' own budgets (mnist: the study's 100k steps; tfds data)")
  p.add_argument("--parallel", type=int, default=1, help="runs trained at once")
  p.add_argument("--table-only", action="store_true",
                 help="only tabulate the finished runs (unfinished ones show as such)")
  p.add_argument("--eval-examples", type=int, default=0, help="0 = the whole eval split")
  p.add_argument("--fd-samples", type=int, default=1000,
                 help="samples for the Frechet distance (CPU budget; full budget: config's)")
  p.add_argument("--sample-steps", type=int, default=200,
                 help="sampler steps for sample quality (CPU budget; full budget: config's)")
  p.add_argument("--seeds", default="0",
                 help="comma-separated training seeds (config.seed); more than one adds a "
                 "seed column and a table of mean ± sd over seeds. Seed 0 keeps the "
                 "run's plain name, so existing runs count as seed 0")


def parse_seeds(text: str) -> list:
  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError:
    raise SystemExit(f"error: --seeds={text!r}: expected comma-separated integers")
  if len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise SystemExit(f"error: --seeds={text!r}: expected distinct non-negative integers")
  return seeds


def with_seeds(runs: list, seeds: list) -> list:
  """Each run once per training seed, seed by seed within a run (table order).

  Seed s > 0 is run `<name>_seed<s>` with `--config.seed=s` (the data split and the
  random-encoder probe keep their own fixed seeds); seed 0 is the run itself.
  """
  out = []
  for run in runs:
    for seed in seeds:
      labels = dict(run.labels, seed=str(seed))
      if seed == 0:
        out.append(dataclasses.replace(run, labels=labels))
      else:
        out.append(harness.Run(f"{run.name}_seed{seed}", run.config,
                               run.overrides + [f"--config.seed={seed}"], labels))
  return out


def base_config_file(args) -> str:
  return f"configs/{args.dataset}.py"


def budget_overrides(args) -> list:
  """Command-line overrides that set the compute budget (empty with --full-budget)."""
  if args.full_budget:
    return ["--config.data.source=tfds:mnist"] if args.dataset == "mnist" else []
  steps = args.steps or (1500 if args.dataset == "digits" else 3000)
  o = [f"--config.training.num_steps={steps}",
       f"--config.training.checkpoint_every={max(steps // 3, 1)}",
       f"--config.eval.max_examples={args.eval_examples}",
       f"--config.sample.num_samples={args.fd_samples}",
       f"--config.sample.num_steps={args.sample_steps}"]
  if args.dataset == "mnist":
    o += ["--config.training.log_every=250", "--config.optim.lr=1e-3",
          "--config.optim.warmup_steps=200", "--config.optim.ema_decay=0.999",
          "--config.model.dropout=0.0", f"--config.data.source={MNIST_IDX}"]
  return o


def _three(m, suffix, digits=3):
  return " / ".join(_fmt(m.get(f"{k}_{suffix}"), digits)
                    for k in ("encoder", "random_encoder", "pixels"))


def _bound(m):
  kind = m.get("bound_kind", "elbo")
  if kind == "none" or m.get("bpd") is None:
    return "no bound"
  cell = f"{_fmt(m.get('bpd'))} ± {_fmt(m.get('bpd_se'))}"
  return cell + (f" (fitted s = {m['fitted_posterior_std']:g})"
                 if kind == "fitted_posterior_std" else "")


COLUMNS = [
    ("bpd (bound)", _bound),
    ("histogram bpd", lambda m: _fmt(m.get("histogram_bpd"))),
    ("trained objective bpd", lambda m: _fmt(m.get("objective_bpd")) +
     ("" if m.get("objective_is_bound", True) else " (not a bound)")),
    ("KL nats", lambda m: _fmt(m.get("kl_nats"), 2)),
    ("active units", lambda m: "-" if m.get("active_units") is None else
     f"{m['active_units']}/{m.get('latent_dim', '?')}"),
    ("MI nats", lambda m: _fmt(m.get("mi_nats"), 2)),
    ("usefulness gap bpd", lambda m: _fmt(m.get("usefulness_gap_bpd"), 4)),
    ("logistic probe: latent / random enc / pixels", lambda m: _three(m, "logreg_acc")),
    ("k-NN: latent / random enc / pixels", lambda m: _three(m, "knn_acc")),
    ("I(w; label) bits: latent / random enc / pixels",
     lambda m: _three(m, "label_info_bits", 2)),
    ("sample FD (floor: eval vs train)", lambda m: f"{_fmt(m.get('fd_classifier'), 2)} "
     f"({_fmt(m.get('fd_classifier_eval_vs_train'), 2)})"),
    ("guided class match", lambda m: _fmt(m.get("guided_class_match"), 3)),
]


def paired_cell(rep, base_rep) -> str:
  """'diff ± se' of bpd minus the baseline's, paired over the same eval images."""
  from vdmrep import report as report_lib
  if rep is None or base_rep is None or rep is base_rep:
    return "-"
  try:
    d = report_lib.paired_difference(rep, base_rep)
  except ValueError:
    return "n/a"
  return f"{d['diff']:+.3f} ± {d['se']:.3f}"


# Numeric metrics summarised over seeds: (column, metric key, digits).
SEED_COLUMNS = [
    ("bpd (bound)", "bpd", 3),
    ("histogram bpd", "histogram_bpd", 3),
    ("KL nats", "kl_nats", 2),
    ("active units", "active_units", 1),
    ("MI nats", "mi_nats", 2),
    ("usefulness gap bpd", "usefulness_gap_bpd", 4),
    ("probe: latent", "encoder_logreg_acc", 3),
    ("probe: random enc", "random_encoder_logreg_acc", 3),
    ("k-NN: latent", "encoder_knn_acc", 3),
    ("I(w; label) bits", "encoder_label_info_bits", 2),
    ("sample FD", "fd_classifier", 2),
]


def _mean_sd(xs, digits):
  if not xs:
    return "-"
  if len(xs) == 1:
    return f"{xs[0]:.{digits}f}"
  return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def seed_summary(args, runs, label_cols, baseline_of=None) -> str:
  """Markdown table: per row of the study, mean ± sd (sample sd, n - 1) over the seeds
  whose runs finished; "-" where a metric is absent (e.g. KL without an encoder).

  `baseline_of(labels) -> labels or None` names each row's baseline row (e.g. the
  unconditional VDM); the last column is then bpd minus the baseline's bpd, paired by
  seed (same seed: same initialisation key and the same batches), which removes the
  seed-to-seed variation the two runs share.
  """
  groups, bpd_by_seed = {}, {}
  for run in runs:
    key = tuple(run.labels.get(c, "") for c in label_cols)
    rep = harness.load_report(args.out, run)
    groups.setdefault(key, []).append(rep)
    if rep is not None and rep.get("metrics", {}).get("bpd") is not None:
      bpd_by_seed.setdefault(key, {})[run.labels.get("seed", "0")] = rep["metrics"]["bpd"]
  rows = []
  for key, reports in groups.items():
    metrics = [r.get("metrics", {}) for r in reports if r is not None]
    cells = []
    for _, name, digits in SEED_COLUMNS:
      cells.append(_mean_sd([float(m[name]) for m in metrics
                             if m.get(name) is not None and not math.isnan(float(m[name]))],
                            digits))
    if baseline_of is not None:
      base = baseline_of(key)
      mine, theirs = bpd_by_seed.get(key, {}), bpd_by_seed.get(base, {})
      diffs = [mine[s] - theirs[s] for s in sorted(mine) if s in theirs]
      cells.append("-" if base is None or base == key or not diffs else
                   f"{_mean_sd(diffs, 3)} (n={len(diffs)})")
    rows.append(list(key) + [f"{len(metrics)}/{len(reports)}"] + cells)
  header = label_cols + ["seeds done"] + [c for c, _, _ in SEED_COLUMNS]
  if baseline_of is not None:
    header.append("bpd - baseline, paired by seed")
  return harness.markdown_table(header, rows)


def write_results(args, runs, *, title, label_cols, filename, baseline_of=None,
                  baseline_note=""):
  rows, points = [], []
  note = ""
  seeds = parse_seeds(getattr(args, "seeds", "0"))
  row_cols = label_cols + (["seed"] if len(seeds) > 1 else [])
  if len(seeds) > 1:  # beside, not over, the one-seed table of the same runs
    filename = filename.replace(".md", "_seeds.md")
    title += ", training seeds " + ", ".join(map(str, seeds))
  reps = {run.name: harness.load_report(args.out, run) for run in runs}
  by_key = {tuple(run.labels.get(c, "") for c in row_cols): reps[run.name] for run in runs}
  eval_note = base_note = ""
  for run in runs:
    rep = reps[run.name]
    extra = []
    if baseline_of is not None:
      key = tuple(run.labels.get(c, "") for c in label_cols)
      base = baseline_of(key)
      base_key = None if base is None else tuple(base) + (
          (run.labels.get("seed", ""),) if len(seeds) > 1 else ())
      extra = [paired_cell(rep, by_key.get(base_key)) if base_key is not None else "-"]
    if rep is None:
      rows.append([run.labels.get(c, "") for c in row_cols] + ["not finished"] +
                  [""] * (len(COLUMNS) + len(extra)))
      continue
    note = note or harness.get(rep, "dataset.note", "")
    m = rep.get("metrics", {})
    if not eval_note and "eval_num_time_samples" in m:
      eval_note = (f"Eval: K = {m['eval_num_time_samples']} draws per image, eval seed "
                   f"{m.get('eval_seed')}, {m.get('num_images')} eval images. ")
    base_note = base_note or harness.get(rep, "baselines.note", "")
    rows.append([run.labels.get(c, "") for c in row_cols] +
                [f(m) for _, f in COLUMNS] + extra +
                [f"{harness.wall_minutes(args.out, run):.1f}"])
    points.append((run.name, m.get("kl_nats"), m.get("bpd")))
  header = row_cols + [c for c, _ in COLUMNS] + (
      ["bpd - baseline, paired over images"] if baseline_of is not None else []) + ["wall min"]
  table = harness.markdown_table(header, rows)
  if len(seeds) > 1:
    table += ("\n\nOver training seeds " + ", ".join(map(str, seeds)) + " (mean ± sd; "
              "the ± above is the standard error over eval images of one run"
              + (f"; baseline: {baseline_note}" if baseline_note else "") + "):\n\n"
              + seed_summary(args, runs, label_cols, baseline_of))
  cmd = "python " + " ".join(os.path.relpath(a, harness.ROOT) if os.path.exists(a) else a
                             for a in sys.argv)
  text = "\n".join([
      f"## {title}", "",
      f"Command: `{cmd}`", "",
      f"Data: {args.dataset} ({note}). Hardware: {harness.hardware()}.", "",
      table, "",
      eval_note + "bpd: held-out negative ELBO with the encoder KL weighted by 1 (a bound, ± "
      "standard error over eval images for one eval seed; the spread between training seeds "
      "is larger: compare rows paired over images, or over seeds); deterministic encoders: "
      "the bound of q(w|x) = N(mean, s^2 I) with s fitted after training, or no bound; "
      "histogram: per-pixel categorical fitted on the training split, same eval images ("
      + (base_note or "see report.md") + "); trained objective: what the run optimised at "
      "its last step, marked when it is not a bound; KL: encoder KL, nats/image; MI: "
      "I_q(x;w) (upper limit log N_eval); usefulness gap: diffusion loss with another "
      "image's w minus with its own; logistic probe: standardised features, C by "
      "cross-validation on train; I(w; label): label entropy minus the logistic probe's "
      "held-out cross-entropy, bits; FD: Frechet distance in vdmrep's classifier's feature "
      "space, floor = eval split vs train split; bpd - baseline: paired over the same eval "
      "images (± its standard error; eval noise of these two runs only).", ""])
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, filename), "w") as fh:
    fh.write(text)
  _figure(points, os.path.join(args.out, filename.replace(".md", ".png")), title)
  print(text)


def _figure(points, path, title):
  pts = [(n, k, b) for n, k, b in points if k is not None and b is not None]
  baselines = [(n, b) for n, k, b in points if k is None and b is not None]  # no encoder
  if not pts:
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # A legend, not labels beside the points: collapsed runs all sit at KL ~ 0, where
  # their names would overprint each other.
  fig, ax = plt.subplots(figsize=(9, 5))
  markers = "osD^vP*Xh<>p"
  for i, (name, kl, bpd) in enumerate(pts):
    ax.scatter(kl, bpd, marker=markers[i % len(markers)], s=36, alpha=0.85,
               label=f"{name}: KL {kl:.2f}, {bpd:.3f} bpd")
  for i, (name, bpd) in enumerate(baselines):
    ax.axhline(bpd, color="gray", ls=("--", ":", "-.")[i % 3], lw=1,
               label=f"{name} (no encoder): {bpd:.3f} bpd")
  ax.set_xlabel("encoder KL (nats / image)")
  ax.set_ylabel("held-out negative ELBO (bits / dim)")
  ax.set_xscale("symlog", linthresh=0.1)
  ax.set_xlim(left=0, right=max(1.0, 2 * max(k for _, k, _ in pts)))  # KL >= 0
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
