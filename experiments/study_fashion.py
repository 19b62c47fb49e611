"""Study C on Fashion-MNIST: the unconditional VDM against every latent mechanism and remedy,
and the classic VAE, at one decoder and budget. One command per table; re-running resumes.

  python experiments/study_fashion.py --out experiments/out/study_c --dry-run   # the commands
  python experiments/study_fashion.py --out experiments/out/study_c --detach    # background
  python experiments/study_fashion.py --out experiments/out/study_c \\
      --rows unconditional:0,1,2 free_bits:0,1,2 film:0,1,2 --detach             # 3 seeds
  python experiments/study_fashion.py --out experiments/out/study_c --table-only \\
      --figure experiments/figures/study_c.png                                  # + accounting
  python experiments/study_fashion.py --out experiments/out/study_c --rank 3   # who gets seeds
  python experiments/study_fashion.py --out experiments/out/study_c --moonshot # the target
  python experiments/study_fashion.py --out experiments/out/study_c --w-probes # older reports
  python experiments/study_fashion.py --out experiments/out/study_c \\
      --records experiments/records/study_c ...           # finished runs kept in git too

Each row is a variant of configs/fashion_mnist.py plus overrides, trained once per seed
(`--rows NAME:SEEDS ...`; default every row, seed 0) into OUT/runs/<name>[_seed<s>]/ by
`python -m vdmrep.main`. A run is finished when its report.json exists; unfinished runs
resume from their checkpoints, so an interrupted study is continued by the same command.
A run still training under another process (a killed driver's, say, before restarting with
the rows reordered) is waited for in its slot, not started twice.
`--parallel` runs train at once (default 2); `--detach` starts the study in its own session
(log: OUT/study.log) and returns. Rows whose config keys are not in this checkout (or that
its validation refuses) are listed as skipped, with the reason, and never run.
With `--records DIR` (records.py) every mode first restores the finished runs recorded in
DIR into OUT, and a training study records each run in DIR as it finishes: the tables
outlive the machine that trained them.

The table (OUT/study_c.md, also printed): held-out negative ELBO (bits/dim, +- standard
error over test images; mean +- sd over seeds when there are several) beside the per-pixel
histogram baseline, the difference from the unconditional VDM paired by seed (mean +- sd
over seeds; with one seed, +- the standard error over the shared test images), the encoder
KL (nats/image), the saving (diffusion-loss rise when w is swapped, summed over the t
bands; the classic VAE: the rise of its -log p(x | w)) and net (saving - KL) in nats/image
where the run reports them,
I(w; label) in bits (on one draw of w per image / on the encoder means), active units,
logistic and k-NN probe accuracies on w (the encoder means) / a random encoder / pixels,
the Frechet distance of samples against the eval-vs-train floor, and the class match of
guided samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import records as records_lib  # noqa: E402

from vdmrep import report as report_lib  # noqa: E402

CONFIG = "configs/fashion_mnist.py"
BASELINE = "unconditional"


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  label: str
  variant: str          # configs/fashion_mnist.py:<variant>
  overrides: tuple = ()


ROWS = [
    Row("unconditional", "unconditional VDM", "remedy=unconditional"),
    Row("elbo", "ELBO (beta = 1), additive", "remedy=elbo"),
    Row("prior_mixture", "learned prior: Gaussian mixture", "remedy=elbo",
        ("--config.model.prior=mixture",)),
    Row("prior_vamp", "learned prior: VampPrior", "remedy=elbo", ("--config.model.prior=vamp",)),
    Row("capped", "capped latent (D = 16)", "remedy=elbo", ("--config.model.latent_dim=16",)),
    Row("discrete", "discrete latent (32 x 16, learned prior)", "remedy=elbo",
        ("--config.model.latent=categorical", "--config.model.latent_dim=32",
         "--config.model.latent_categories=16", "--config.model.prior=learned")),
    Row("latent_schedule", "latent-driven schedule gamma(t, w)", "remedy=elbo",
        ("--config.model.gamma_type=per_pixel",)),
    # With N(0, I) there is no prior to move: KL balancing only scales the encoder's KL
    # gradient. Its learned-prior form is the one DreamerV2 and configs/latents.py use.
    Row("kl_balance", "KL balancing (alpha = 0.8), N(0, I) prior", "remedy=elbo",
        ("--config.collapse.kl_balance=0.8",)),
    Row("kl_balance_mixture", "KL balancing (alpha = 0.8), mixture prior", "remedy=elbo",
        ("--config.model.prior=mixture", "--config.collapse.kl_balance=0.8")),
    Row("committed_rate", "committed rate (posterior std <= 0.5)", "remedy=elbo",
        ("--config.model.posterior_std_max=0.5",)),
    Row("staged", "staged training (KL-free quarter, frozen-encoder quarter, joint)",
        "remedy=staged"),
    Row("free_bits", "free bits (0.1 nats/dim)", "remedy=free_bits"),
    Row("capacity", "KL capacity (to 10 nats)", "remedy=capacity"),
    Row("film", "ELBO (beta = 1), FiLM", "remedy=film"),
    Row("vae", "classic VAE (conv decoder)", "remedy=vae"),
]
ROW_BY_NAME = {r.name: r for r in ROWS}


# -- which rows this checkout can run --------------------------------------------------
def build_config(variant: str, overrides):
  """The ConfigDict `python -m vdmrep.main --config configs/fashion_mnist.py:<variant>
  <overrides>` builds (the same flag parsing); raises if this checkout lacks a key."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["study", "--config", os.path.join(harness.ROOT, f"{CONFIG}:{variant}"), *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def availability(row: Row, budget) -> str | None:
  """None if the row can run here, else why not (one line)."""
  from vdmrep import config_lib
  base = build_config(row.variant, [])
  for o in list(row.overrides) + budget:
    node, path = base, o[len("--config."):].partition("=")[0]
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node:
        return f"config key {path} is not in this checkout"
      node = node[part]
  try:
    config_lib.validate(build_config(variant_of(row, budget), list(row.overrides) + budget))
  except Exception as err:  # flags' unknown-key errors, ConfigError, ...: all mean "not here"
    return " ".join(str(err).split())
  return None


# -- runs ------------------------------------------------------------------------------
def budget_overrides(args) -> list:
  o = [f"--config.model.vdm={args.decoder}", f"--config.eval.max_examples={args.eval_examples}"]
  if args.steps:
    o += [f"--config.training.num_steps={args.steps}",
          f"--config.training.checkpoint_every={max(1, min(2500, args.steps // 4))}"]
  if args.eval_every:
    o.append(f"--config.training.eval_every={args.eval_every}")
  if args.fd_samples:
    o += [f"--config.sample.num_samples={args.fd_samples}",
          f"--config.sample.batch_size={min(500, args.fd_samples)}"]
  if args.sample_steps:
    o.append(f"--config.sample.num_steps={args.sample_steps}")
  return o + list(args.extra)


def parse_rows(specs) -> list:
  """['name:0,1,2', 'name', ...] -> [(Row, [seeds])]; default every row with seed 0."""
  if not specs:
    return [(r, [0]) for r in ROWS]
  out = []
  for spec in specs:
    name, _, seeds = spec.partition(":")
    if name not in ROW_BY_NAME:
      raise SystemExit(f"error: --rows {spec!r}: unknown row {name!r}; known: "
                       f"{list(ROW_BY_NAME)}")
    try:
      seeds = [int(s) for s in seeds.split(",")] if seeds else [0]
    except ValueError:
      raise SystemExit(f"error: --rows {spec!r}: seeds must be comma-separated integers")
    out.append((ROW_BY_NAME[name], seeds))
  return out


def variant_of(row: Row, budget) -> str:
  """The config variant a row runs with under `budget`."""
  variant = row.variant
  # The config derives schedules from its step count (the capacity ramp lasts half the
  # run, the staged row's stages a quarter each), so the budget's steps go into the
  # variant as well as the override.
  steps = [o.partition("=")[2] for o in budget if o.startswith("--config.training.num_steps=")]
  if steps:
    variant += f",steps={steps[-1]}"
  return variant


def run_of(row: Row, seed: int, budget) -> harness.Run:
  name = row.name if seed == 0 else f"{row.name}_seed{seed}"
  variant = variant_of(row, budget)
  return harness.Run(name, f"{CONFIG}:{variant}",
                     list(row.overrides) + budget + [f"--config.seed={seed}"],
                     labels={"row": row.name, "seed": seed})


def command(out: str, run: harness.Run) -> str:
  return " ".join(["python", "-m", "vdmrep.main", "--config", run.config, "--workdir",
                   harness.run_dir(out, run), *run.overrides])


# -- the table -------------------------------------------------------------------------
def _f(x, digits=3):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return f"{x:.{digits}f}"


def _mean_sd(xs, digits=3):
  xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
  if not xs:
    return "-"
  if len(xs) == 1:
    return _f(xs[0], digits)
  return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def paired_differences(mine: dict, base: dict) -> list:
  """bpd(row) - bpd(baseline) for each seed both have: {seed: bpd} x2 -> [diff]."""
  return [mine[s] - base[s] for s in sorted(mine) if s in base]


def bpd_differences(mine: dict, base: dict) -> list:
  """paired_differences of two {seed: report} maps' held-out bpd."""
  return paired_differences({s: r["metrics"]["bpd"] for s, r in mine.items()},
                            {s: r["metrics"]["bpd"] for s, r in base.items()})


def one_seed_se(mine: dict, base: dict):
  """The standard error over the shared test images of the first seed both have (eval noise
  only, report.paired_difference), or None when the reports cannot be paired over images."""
  seed = next(s for s in sorted(mine) if s in base)
  try:
    return report_lib.paired_difference(mine[seed], base[seed])["se"]
  except ValueError:
    return None


def paired_column(mine: dict, base: dict) -> str:
  """The row's bpd minus the unconditional VDM's, paired by training seed: mean +- sd over
  the seeds both have. With one seed the sd is unknown; the +- is then the standard error
  over the shared test images (eval noise only), when both reports carry per-image values
  for the same images. {seed: report} x2 -> cell text."""
  diffs = bpd_differences(mine, base)
  if not diffs:
    return "-"
  if len(diffs) > 1:
    return f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} (sd, n={len(diffs)} seeds)"
  se = one_seed_se(mine, base)
  if se is None:
    return f"{diffs[0]:+.4f} (n=1 seed)"
  return f"{diffs[0]:+.4f} ± {se:.4f} (n=1 seed; s.e. over images)"


def histogram_baseline(reports) -> str:
  """The per-pixel histogram's bpd on the same test images, from the reports."""
  for rep in reports:
    m = rep.get("metrics", {})
    if m.get("histogram_bpd") is not None:
      return f"{_f(m['histogram_bpd'])} ± {_f(m.get('histogram_bpd_se'))}"
  return "-"


def _metric(reports, key):
  return [r["metrics"].get(key) for r in reports if r["metrics"].get(key) is not None]


def merge_rows(rows) -> list:
  """One (Row, seeds) per row name, in first-seen order: `--rows a:0 b:0 a:1,2` runs a's
  seed 0 first and its later seeds last, but tabulates a once with seeds 0, 1, 2."""
  merged = {}
  for row, seeds in rows:
    _, have = merged.setdefault(row.name, (row, []))
    have += [s for s in seeds if s not in have]
  return list(merged.values())


W_PROBE_DIR = os.path.join("evals", "probe_w")  # in a run directory: the w probe, added later
W_PROBE = "encoder_w_label_info_bits"


def w_probe_command(out: str, run: harness.Run) -> list:
  """Evaluates only the probe on one draw of w of a finished run into W_PROBE_DIR, for a
  report written before its final evaluation had that probe (its report.json is kept)."""
  wd = os.path.abspath(harness.run_dir(out, run))
  return harness.main_argv(out, run) + [
      "--mode", "eval", "--eval_dir", os.path.join(wd, W_PROBE_DIR),
      "--config.eval.evaluators=probes", "--config.eval.probe_features=encoder_w"]


def complete_w_probes(out: str, runs, log=print, on_finish=None) -> None:
  """Runs w_probe_command for the finished latent runs whose report lacks the w probe;
  `on_finish(run)` after each probe that succeeded."""
  for run in runs:
    rep = load_report(out, run)
    if rep is None or rep["metrics"].get("kl_nats") is None or W_PROBE in rep["metrics"]:
      continue
    log(f"[{run.name}] probing one draw of w")
    proc = subprocess.run(w_probe_command(out, run), cwd=harness.ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
      log(f"[{run.name}] w probe FAILED (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    elif on_finish is not None:
      on_finish(run)


def load_report(out: str, run: harness.Run):
  """A run's report, with the w probe's metrics from W_PROBE_DIR when the report lacks them."""
  rep = harness.load_report(out, run)
  path = os.path.join(harness.run_dir(out, run), W_PROBE_DIR, "report.json")
  if rep is not None and W_PROBE not in rep["metrics"] and os.path.exists(path):
    with open(path) as fh:
      extra = json.load(fh)["metrics"]
    rep["metrics"].update({k: v for k, v in extra.items() if k.startswith("encoder_w_")})
  return rep


def load_reports(out: str, rows, budget) -> dict:
  """{row name: {seed: report}} for the finished runs among `rows` (merged)."""
  reports = {}
  for row, seeds in rows:
    for s in seeds:
      rep = load_report(out, run_of(row, s, budget))
      if rep is not None:
        reports.setdefault(row.name, {})[s] = rep
  return reports


def table(out: str, rows, budget) -> str:
  rows = merge_rows(rows)
  reports = load_reports(out, rows, budget)
  header = ["row", "seeds done", "ELBO bpd", "histogram bpd", "bpd - unconditional (paired)",
            "KL nats", "band saving / net nats", "I(w; label) bits: w / mean", "active units",
            "logistic probe: w / random / pixels", "kNN probe: w / random / pixels",
            "FD (eval-vs-train floor)", "guided class match", "wall min"]
  lines = []
  for row, seeds in rows:
    why = availability(row, budget)
    if why is not None:
      lines.append([row.label, "skipped: " + why] + [""] * (len(header) - 2))
      continue
    done = reports.get(row.name, {})
    reps = [done[s] for s in sorted(done)]
    if not reps:
      lines.append([row.label, f"0/{len(seeds)}"] + [""] * (len(header) - 2))
      continue
    m0 = reps[0]["metrics"]
    bpd = (f"{_f(m0.get('bpd'))} ± {_f(m0.get('bpd_se'))}" if len(reps) == 1
           else _mean_sd(_metric(reps, "bpd")) + " (sd over seeds)")
    paired = "-" if row.name == BASELINE else paired_column(done, reports.get(BASELINE, {}))
    probe = lambda kind: " / ".join(_mean_sd(_metric(reps, f"{f}_{kind}_acc"))
                                    for f in ("encoder", "random_encoder", "pixels"))
    au = _metric(reps, "active_units")
    lines.append([
        row.label, f"{len(reps)}/{len(seeds)}", bpd, histogram_baseline(reps), paired,
        _mean_sd(_metric(reps, "kl_nats"), 2),
        f"{_mean_sd(_metric(reps, 'saving_nats'), 1)} / {_mean_sd(_metric(reps, 'net_nats'), 1)}",
        f"{_mean_sd(_metric(reps, W_PROBE), 2)} / "
        f"{_mean_sd(_metric(reps, 'encoder_label_info_bits'), 2)}",
        "-" if not au else f"{_mean_sd(au, 1)}/{m0.get('latent_dim', '?')}",
        probe("logreg"), probe("knn"),
        f"{_mean_sd(_metric(reps, 'fd_classifier'), 2)} "
        f"({_mean_sd(_metric(reps, 'fd_classifier_eval_vs_train'), 2)})",
        _mean_sd(_metric(reps, "guided_class_match")),
        _mean_sd([harness.wall_minutes(out, run_of(row, s, budget)) for s in sorted(done)], 1)])
  return harness.markdown_table(header, lines)


MIN_USED_KL = 1.0  # nats/image: below this a row's latent counts as unused


def rank_promising(out: str, budget, seed: int = 0) -> list:
  """The selection rule for more seeds, fixed before the rows finished: every finished
  latent row at `seed` with the VDM decoder and a used latent (encoder KL >= MIN_USED_KL
  nats/image), ordered by its ELBO minus the unconditional VDM's of the same seed (lowest
  first; ties by more I(w; label)). -> [(row name, difference bpd, KL nats, I bits)]."""
  base = harness.load_report(out, run_of(ROW_BY_NAME[BASELINE], seed, budget))
  if base is None:
    return []
  ranked = []
  for row in ROWS:
    rep = None if row.name == BASELINE else harness.load_report(out, run_of(row, seed, budget))
    if rep is None or rep.get("config", {}).get("model", {}).get("decoder", "vdm") != "vdm":
      continue
    m = rep["metrics"]
    if (m.get("kl_nats") or 0.0) < MIN_USED_KL:
      continue
    info = m.get("encoder_label_info_bits")
    ranked.append((row.name, m["bpd"] - base["metrics"]["bpd"], m["kl_nats"],
                   float("nan") if info is None else info))
  more_info_first = lambda info: -info if not math.isnan(info) else math.inf
  return sorted(ranked, key=lambda r: (r[1], more_info_first(r[3])))


MOONSHOT = "beta = 1, KL >= 5 nats, I(w; label) >= 1 bit, probe on w above random and pixels, " \
    "ELBO better than the unconditional VDM paired over >= 3 seeds (the upper end of the 95% " \
    "t-interval of the mean difference below zero)"

# Student's t 0.975 quantiles by degrees of freedom; past 10 the df = 10 value (conservative).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


def t975(df: int) -> float:
  return _T975[min(df, 10)]


def moonshot(done: dict, base: dict, gradient_note: str = "") -> dict:
  """The issue's target for one row, criterion by criterion. done, base: {seed: report} of
  the row and of the unconditional VDM; gradient_note: `collapse.encoder_gradient_note` of
  its config (non-empty: the loss's value is the ELBO, the encoder's gradient is not).
  Values are means over the row's seeds; the ELBO criterion needs at least three seeds
  paired with the unconditional VDM's and the upper end of the 95% t-interval of their mean
  difference (mean + t975(n - 1) sd / sqrt(n)) below zero: with three seeds, two standard
  errors would claim far more than they support. The k-NN probe is shown beside the
  logistic one, not judged. -> {criterion: (value text, met or None)}."""
  reps = [done[s]["metrics"] for s in sorted(done)]
  mean = lambda k: statistics.mean(m[k] for m in reps) if all(m.get(k) is not None
                                                              for m in reps) else None
  out = {}
  # Training that ends at the ELBO (staged) meets it; the text says it was not the ELBO throughout.
  bound = all(m.get("objective_is_bound", False) for m in reps)
  throughout = all(m.get("run_trained_elbo_throughout", True) for m in reps)
  out["trained at beta = 1 (the ELBO)"] = (
      ("yes" if throughout else "at the end") if bound else "no", bound)
  if bound and gradient_note:
    out["trained at beta = 1 (the ELBO)"] = (f"value only: {gradient_note}", False)
  kl, info, info_mean = mean("kl_nats"), mean(W_PROBE), mean("encoder_label_info_bits")
  out["KL >= 5 nats"] = ("-" if kl is None else f"{kl:.2f}", kl is not None and kl >= 5.0)
  out["I(w; label) >= 1 bit (w drawn from q)"] = (
      ("-" if info is None else f"{info:.2f}")
      + ("" if info_mean is None else f" (mean of q: {info_mean:.2f})"),
      info is not None and info >= 1.0)
  w, rnd, pix = (mean(f"{f}_logreg_acc") for f in ("encoder", "random_encoder", "pixels"))
  probe_ok = None not in (w, rnd, pix) and w > rnd and w > pix
  out["logistic probe on w (means of q) > random and pixels"] = (
      "-" if None in (w, rnd, pix) else f"{w:.3f} vs {rnd:.3f} / {pix:.3f}",
      probe_ok)
  knn = [mean(f"{f}_knn_acc") for f in ("encoder", "random_encoder", "pixels")]
  out["(beside it) kNN probe: w / random / pixels"] = (
      " / ".join("-" if v is None else f"{v:.3f}" for v in knn), None)
  diffs = bpd_differences(done, base)
  if len(diffs) >= 2:
    m, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    upper = m + t975(len(diffs) - 1) * se
    text = f"{m:+.4f} ± {se:.4f} (s.e., n={len(diffs)}; 95% upper {upper:+.4f})"
    ok = len(diffs) >= 3 and upper < 0
  else:
    text, ok = ("-" if not diffs else f"{diffs[0]:+.4f} (n=1)"), False
  out["ELBO better, paired over >= 3 seeds"] = (text, ok)
  return out


def moonshot_table(out: str, rows, budget) -> str:
  from vdmrep import collapse
  rows = merge_rows(rows)
  reports = load_reports(out, rows, budget)
  base = reports.get(BASELINE, {})
  lines, header = [], None
  for row, _ in rows:
    done = reports.get(row.name, {})
    if row.name == BASELINE or not done or done[min(done)]["metrics"].get("kl_nats") is None:
      continue
    config = build_config(variant_of(row, budget), list(row.overrides) + budget)
    checks = moonshot(done, base, collapse.encoder_gradient_note(config))
    header = header or ["row", "seeds"] + list(checks) + ["all met"]
    lines.append([row.label, str(len(done))]
                 + [v if ok is None else f"{v} {'✓' if ok else '✗'}" for v, ok in checks.values()]
                 + ["yes" if all(ok for _, ok in checks.values() if ok is not None) else "no"])
  if header is None:
    return "(no finished latent row)"
  return harness.markdown_table(header, lines)


def figure(out: str, rows, budget, path: str) -> list:
  """The accounting of each finished latent row, as a PNG at `path`: (a) its ELBO minus the
  unconditional VDM's, paired by seed (bits/dim; bars: sd over seeds, or with one seed the
  s.e. over images); (b) rate against what w saves the decoder, both in nats/image (saving =
  KL - paired difference): above the diagonal the latent pays at the ELBO; (c) logistic
  probe accuracy on w beside the random encoder's and the pixels'. Rows with another
  decoder (the classic VAE) are left out. Returns the rows drawn."""
  from vdmrep import plots
  rows = merge_rows(rows)
  reports = load_reports(out, rows, budget)
  base = reports.get(BASELINE, {})
  drawn = []
  for row, _ in rows:
    done = reports.get(row.name, {})
    seeds = [s for s in sorted(done) if s in base]
    if row.name == BASELINE or not seeds or done[seeds[0]]["metrics"].get("kl_nats") is None:
      continue
    if done[seeds[0]].get("config", {}).get("model", {}).get("decoder", "vdm") != "vdm":
      continue  # another decoder: its difference from the VDM is no saving by w
    diffs = bpd_differences(done, base)
    err = statistics.stdev(diffs) if len(diffs) > 1 else one_seed_se(done, base)
    err = float("nan") if err is None else err
    m = [done[s]["metrics"] for s in seeds]
    dims = m[0]["kl_nats"] / m[0]["kl_bpd"] / math.log(2) if m[0].get("kl_bpd") else float("nan")
    mean = lambda k: statistics.mean(x[k] for x in m) if all(x.get(k) is not None for x in m) \
        else float("nan")
    diff = statistics.mean(diffs)
    drawn.append(dict(label=f"{row.label} (n={len(seeds)})", diff=diff, err=err,
                      kl=mean("kl_nats"), saving=mean("kl_nats") - diff * dims * math.log(2),
                      probe=[mean(f"{f}_logreg_acc") for f in ("encoder", "random_encoder",
                                                                "pixels")]))
  if not drawn:
    return drawn
  fig, axes = plots.plt.subplots(1, 3, figsize=(16, 0.45 * len(drawn) + 2.5))
  ys = list(range(len(drawn)))[::-1]
  ax = axes[0]
  ax.barh(ys, [d["diff"] for d in drawn], xerr=[d["err"] for d in drawn], color="tab:blue")
  ax.axvline(0, color="k", lw=0.8)
  ax.set_yticks(ys, [d["label"] for d in drawn])
  ax.set_xlabel("ELBO - unconditional VDM, bits/dim (paired by seed; < 0: better)")
  ax = axes[1]
  kl, saving = [d["kl"] for d in drawn], [d["saving"] for d in drawn]
  top = max(max(kl), max(saving), 1.0) * 1.1
  ax.plot([0, top], [0, top], "k--", lw=0.8, label="saving = rate (the latent breaks even)")
  ax.scatter(kl, saving)
  for d in drawn:
    ax.annotate(d["label"].split(" (n=")[0], (d["kl"], d["saving"]), fontsize=7)
  ax.set_xlabel("rate: encoder KL, nats/image")
  ax.set_ylabel("decoder saving vs unconditional, nats/image")
  ax.legend(fontsize=8)
  ax = axes[2]
  for i, (name, marker) in enumerate([("w", "o"), ("random encoder", "x"), ("pixels", "|")]):
    ax.scatter([d["probe"][i] for d in drawn], ys, marker=marker, label=name)
  ax.set_yticks(ys, [""] * len(drawn))
  ax.set_xlabel("logistic probe accuracy (test split)")
  ax.legend(fontsize=8)
  fig.suptitle("Study C: what each latent row costs at the ELBO, saves, and encodes")
  fig.tight_layout(rect=(0, 0, 1, 0.92))
  plots.save(fig, path)
  return drawn


def _running_argv(argv) -> list:
  """argv less the read-only flags (--table-only, --figure PATH): the command that runs."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == "--figure":
      skip = True
    elif a != "--table-only" and not a.startswith("--figure="):
      out.append(a)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (runs/, the table, study.log)")
  p.add_argument("--rows", nargs="*", default=[],
                 help="NAME[:SEEDS] ... (e.g. unconditional:0,1,2 film); default every row, "
                 "seed 0. Rows: " + ", ".join(ROW_BY_NAME))
  p.add_argument("--decoder", default="mvdm", help="model.vdm for every VDM row (mvdm, unet, ...)")
  p.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
  p.add_argument("--eval-examples", type=int, default=0, help="test images (0 = all 10,000)")
  p.add_argument("--fd-samples", type=int, default=0, help="samples for FD (0: the config's)")
  p.add_argument("--sample-steps", type=int, default=0, help="sampler steps (0: the config's)")
  p.add_argument("--eval-every", type=int, default=0,
                 help="steps between held-out evals (learning curves; 0: the config's)")
  p.add_argument("--extra", action="append", default=[],
                 help="one more --config.* override for every run, as --extra=--config.a.b=v")
  p.add_argument("--parallel", type=int, default=2, help="runs trained at once")
  p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
  p.add_argument("--table-only", action="store_true", help="only print the table")
  p.add_argument("--figure", default="",
                 help="draw the finished latent rows' accounting (PNG path) beside the table; "
                 "trains nothing")
  p.add_argument("--moonshot", action="store_true",
                 help="print each finished latent row against the target, criterion by criterion")
  p.add_argument("--rank", type=int, default=0, metavar="N",
                 help="print the finished seed-0 latent rows in the order of the rule that "
                 "picks the N most promising for seeds 1 and 2, and the command that runs them")
  p.add_argument("--w-probes", action="store_true",
                 help="only probe one draw of w for finished runs whose reports lack it "
                 "(into <run>/evals/probe_w/); trains nothing")
  p.add_argument("--records", default="",
                 help="a records folder (experiments/records/...): restore its finished runs "
                 "into OUT first; record each run there as it finishes")
  p.add_argument("--detach", action="store_true",
                 help="run in the background in its own session (log: OUT/study.log)")
  args = p.parse_args(argv)
  rows = parse_rows(args.rows)
  budget = budget_overrides(args)
  runs, skipped = [], []
  for row, seeds in rows:
    why = availability(row, budget)
    if why is not None:
      skipped.append(f"{row.name}: {why}")
    else:
      runs += [run_of(row, s, budget) for s in seeds]

  if args.records and os.path.isdir(args.records) and not args.detach:
    records_lib.restore(args.records, args.out)
  on_finish = None
  if args.records:  # a run this study just finished (or probed) is newer than its record
    on_finish = lambda run: records_lib.save_run(args.out, run.name, args.records,
                                                 replace=True)
  if args.w_probes:
    complete_w_probes(args.out, runs, on_finish=on_finish)
    return
  if args.moonshot:
    print(f"The target: {MOONSHOT}.\n\n" + moonshot_table(args.out, rows, budget))
    return
  if args.rank:
    ranked = rank_promising(args.out, budget)
    print("| rank | row | ELBO - unconditional, seed 0 (bpd) | KL nats | I(w; label) bits |\n"
          "|---|---|---|---|---|")
    for i, (name, diff, kl, info) in enumerate(ranked, 1):
      print(f"| {i} | {name} | {diff:+.4f} | {kl:.2f} | {info:.2f} |")
    top = [name for name, *_ in ranked[:args.rank]]
    flags = [a for a in (argv if argv is not None else sys.argv[1:])
             if a not in ("--table-only", "--detach")]
    keep, skip = [], False
    for a in flags:  # drop the --rows and --rank specs; keep the budget flags
      if a in ("--rows", "--rank"):
        skip = True
        continue
      if skip and not a.startswith("--"):
        continue
      skip = False
      keep.append(a)
    if top:
      print("\npython experiments/study_fashion.py " + " ".join(keep) + " --rows "
            + " ".join(f"{n}:1,2" for n in top) + " --detach")
    return
  if args.dry_run:
    for run in runs:
      state = "finished" if harness.is_finished(args.out, run) else "to run"
      print(f"# {run.name} ({state})\n{command(args.out, run)}")
    for s in skipped:
      print(f"# skipped {s}")
    return
  if args.detach:
    os.makedirs(args.out, exist_ok=True)
    argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--detach"]
    log = os.path.join(args.out, "study.log")
    with open(log, "a") as fh:
      # The caller's cwd: a relative --out means the same directory to the detached study.
      proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv,
                              cwd=os.getcwd(), stdout=fh, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"study running in the background: pid {proc.pid}, log {log}")
    return
  if not (args.table_only or args.figure):
    for s in skipped:
      print(f"skipped {s}")
    harness.run_all(args.out, runs, parallel=args.parallel, on_finish=on_finish)
    complete_w_probes(args.out, runs, on_finish=on_finish)
  text = "\n".join([
      "## Study C: Fashion-MNIST", "",
      "Command: `python experiments/study_fashion.py " + " ".join(
          _running_argv(argv if argv is not None else sys.argv[1:])) + "`",
      "", table(args.out, rows, budget), "",
      "ELBO bpd: held-out negative ELBO at beta = 1 (bits/dim, ± standard error over test "
      "images; with several seeds the mean ± sd over seeds). histogram: an independent "
      "categorical per pixel fitted on the training split, on the same images. Paired: "
      "bpd minus the unconditional VDM's with the same seed (mean ± sd over seeds; with "
      "one seed, ± the standard error over the shared test images, eval noise only: a row "
      "and the unconditional VDM of one seed share the batch order and the decoder's "
      "initial values but for the layer that reads w, so this s.e. omits the spread "
      "between seeds). KL: nats/image. Band "
      "saving: the rise of the diffusion loss when each image gets another image's w, "
      "summed over the t bands (the classic VAE: the rise of its decoder's -log p(x | w)); "
      "net: saving minus KL (nats/image). I(w; label): label entropy minus the held-out "
      "cross-entropy of a logistic probe (a lower-bound estimate, bits) on one draw w ~ "
      "q(w|x) per image, the latent the decoder sees (so at most I_q(x; w)), / on the "
      "encoder means, which can carry more. Probes: accuracy on the test split of a "
      "logistic regression / k-NN fit on training-split features (w: the encoder means). "
      "FD: Frechet distance of samples in the classifier's "
      "feature space, beside the same distance between test and training images. Wall "
      "min: minutes of the run's recorded invocations (training and final evaluation, on "
      "cores shared with other runs); a resumed run may record only its last invocation, "
      "so the budget is the step count, not this column.", ""])
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "study_c.md"), "w") as fh:
    fh.write(text)
  print(text)
  if args.figure:
    drawn = figure(args.out, rows, budget, args.figure)
    print(f"figure: {args.figure} ({len(drawn)} latent rows)")


if __name__ == "__main__":
  main()
