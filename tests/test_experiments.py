"""The study scripts without training: every row is a valid config, finished rows are
skipped, and the table is built from the runs' report.json files only."""
import argparse
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from vdmrep import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import collapse_grid  # noqa: E402
import harness  # noqa: E402
import mitigation  # noqa: E402
import study_common  # noqa: E402


def _args(**kw):
  base = dict(out="unused", dataset="digits", steps=0, full_budget=False, parallel=1,
              table_only=True, eval_examples=0, fd_samples=500, sample_steps=100,
              vdm="mvdm", encoder="te", only="", encoders="oepp,oe,se,te,ue,none",
              betas="10000,1")
  base.update(kw)
  return argparse.Namespace(**base)


def _load(run):
  """The ConfigDict `python -m vdmrep.main --config FILE <overrides>` would build."""
  argv = ["prog", "--config", os.path.join(ROOT, run.config)] + run.overrides
  fv = flags.FlagValues()  # the overrides are read from sys_argv, as main reads sys.argv
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_every_row_is_a_valid_config_with_the_overrides_applied(dataset):
  runs = (mitigation.runs_for(_args(dataset=dataset)) +
          collapse_grid.runs_for(_args(dataset=dataset, vdm="svdm,mvdm")))
  # 4 encoders x 2 betas + ue + none per VDM size; the two studies never share a name
  assert len(runs) == 12 + 2 * 10 and len({r.name for r in runs}) == len(runs)
  for run in runs:
    c = _load(run)
    config_lib.validate(c, num_devices=1, num_processes=1)
    assert c.training.num_steps == (1500 if dataset == "digits" else 3000), run.name
    assert c.sample.num_samples == 500 and c.sample.num_steps == 100
    if dataset == "mnist":
      assert c.data.source == study_common.MNIST_IDX, run.name
    if run.labels.get("beta", "-") != "-":
      assert c.collapse.beta == float(run.labels["beta"])
  by_name = {r.name: _load(r) for r in mitigation.runs_for(_args())}
  assert by_name["elbo_film"].model.conditioning == "film"
  assert by_name["unconditional"].model.encoder == "none"
  assert by_name["reference_beta1e4"].collapse.beta == 1e4


def test_only_selects_rows_and_rejects_unknown_names():
  names = [r.name for r in mitigation.runs_for(_args(only="free_bits,unconditional"))]
  assert names == ["unconditional", "free_bits"]  # table order, not flag order
  with pytest.raises(SystemExit, match="unknown run"):
    mitigation.runs_for(_args(only="free_bitz"))


def test_finished_runs_are_skipped_and_tabulated_from_their_reports(tmp_path, capsys):
  out = str(tmp_path)
  runs = mitigation.runs_for(_args(out=out, only="unconditional,elbo"))
  done = runs[1]
  os.makedirs(harness.run_dir(out, done))
  metrics = dict(bpd=4.8305, bpd_se=0.0551, objective_bpd=4.8305, objective_is_bound=True,
                 kl_nats=0.0612, active_units=0, latent_dim=128, mi_nats=0.0093,
                 usefulness_gap_bpd=0.00451, encoder_logreg_acc=0.6704,
                 random_encoder_logreg_acc=0.9556, pixels_logreg_acc=0.963)
  with open(os.path.join(harness.run_dir(out, done), "report.json"), "w") as fh:
    json.dump({"metrics": metrics, "dataset": {"note": "a note"}}, fh)
  with open(os.path.join(harness.run_dir(out, done), "wall_seconds.txt"), "w") as fh:
    fh.write("60.0\n30.0\n")  # a resumed run: both attempts count
  assert [harness.is_finished(out, r) for r in runs] == [False, True]
  study_common.write_results(_args(out=out), runs, title="t", label_cols=["remedy"],
                             filename="t.md")
  with open(os.path.join(out, "t.md")) as fh:
    text = fh.read()
  assert text in capsys.readouterr().out  # the file is what the command prints
  rows = [l for l in text.splitlines() if l.startswith("| ")]
  assert rows[1].startswith("| unconditional VDM | not finished |")
  assert rows[2] == ("| ELBO (beta = 1), additive | 4.830 ± 0.055 | - | 4.830 | 0.06 | 0/128 | "
                     "0.01 | 0.0045 | 0.670 / 0.956 / 0.963 | - / - / - | - / - / - | - (-) | - "
                     "| 1.5 |")
  assert "Data: digits (a note)." in text


def test_table_pairs_each_row_with_its_baseline_over_images(tmp_path):
  out = str(tmp_path)
  runs = mitigation.runs_for(_args(out=out, only="unconditional,elbo"))
  key = {"source": "digits", "num_images": 4}
  per = {"unconditional": [4.0, 5.0, 6.0, 7.0], "elbo": [4.1, 5.3, 6.2, 7.2]}
  for run in runs:
    os.makedirs(harness.run_dir(out, run))
    m = dict(bpd=float(sum(per[run.name])) / 4, bpd_se=0.5, histogram_bpd=2.5,
             eval_num_time_samples=4, eval_seed=0, num_images=4)
    with open(os.path.join(harness.run_dir(out, run), "report.json"), "w") as fh:
      json.dump({"metrics": m, "eval_key": key, "per_image": {"bpd": per[run.name]},
                 "baselines": {"note": "uses 17 of 256 levels"}}, fh)
  study_common.write_results(_args(out=out), runs, title="t", label_cols=["remedy"],
                             filename="t.md", baseline_of=lambda k: ("unconditional VDM",))
  with open(os.path.join(out, "t.md")) as fh:
    text = fh.read()
  rows = [l for l in text.splitlines() if l.startswith("| ")]
  assert rows[0].endswith("| bpd - baseline, paired over images | wall min |")
  d = np.array([0.1, 0.3, 0.2, 0.2])
  assert f"| +{d.mean():.3f} ± {d.std(ddof=1) / 2:.3f} |" in rows[2]
  assert rows[1].split(" | ")[2] == "2.500"  # the histogram baseline of the same images
  assert "K = 4 draws per image, eval seed 0" in text and "17 of 256 levels" in text


def test_seeds_expand_runs_and_keep_seed_zero_as_the_plain_run():
  runs = study_common.with_seeds(mitigation.runs_for(_args(only="elbo")),
                                 study_common.parse_seeds("0,2"))
  assert [r.name for r in runs] == ["elbo", "elbo_seed2"]
  assert [r.labels["seed"] for r in runs] == ["0", "2"]
  assert _load(runs[0]).seed == 0 and _load(runs[1]).seed == 2
  assert runs[1].overrides[:-1] == runs[0].overrides  # only the seed differs
  for bad in ("1,1", "a", "-1"):
    with pytest.raises(SystemExit, match="--seeds"):
      study_common.parse_seeds(bad)


def test_seed_summary_is_mean_and_sample_sd_over_finished_seeds(tmp_path):
  out = str(tmp_path)
  args = _args(out=out, seeds="0,1,2")
  runs = study_common.with_seeds(mitigation.runs_for(_args(only="unconditional,elbo")),
                                 [0, 1, 2])
  reports = {"elbo": dict(bpd=4.8, kl_nats=0.1, active_units=0, mi_nats=0.0),
             "elbo_seed1": dict(bpd=5.0, kl_nats=0.3, active_units=4, mi_nats=0.2),
             "elbo_seed2": dict(bpd=4.9, kl_nats=0.2, active_units=2, mi_nats=0.1),
             "unconditional": dict(bpd=4.7),
             "unconditional_seed1": dict(bpd=4.95)}  # its seed 2 not finished
  for name, metrics in reports.items():
    os.makedirs(os.path.join(out, "runs", name))
    with open(os.path.join(out, "runs", name, "report.json"), "w") as fh:
      json.dump({"metrics": metrics}, fh)
  text = study_common.seed_summary(args, runs, ["remedy"],
                                  baseline_of=lambda key: ("unconditional VDM",))
  rows = [l for l in text.splitlines() if l.startswith("| ")][1:]
  assert rows[0].startswith("| unconditional VDM | 2/3 | 4.825 ± 0.177 | - | - |")
  assert rows[0].endswith("| - |")  # the baseline has no difference with itself
  assert rows[1].startswith("| ELBO (beta = 1), additive | 3/3 | 4.900 ± 0.100 | - | "
                            "0.20 ± 0.10 | 2.0 ± 2.0 | 0.10 ± 0.10 |")
  # paired by seed: seed 0 4.8 - 4.7, seed 1 5.0 - 4.95; seed 2 has no baseline run
  assert rows[1].endswith("| 0.075 ± 0.035 (n=2) |")
  study_common.write_results(args, runs, title="t", label_cols=["remedy"], filename="t.md")
  with open(os.path.join(out, "t_seeds.md")) as fh:
    table = fh.read()
  assert "| remedy | seed | bpd (bound) |" in table and "Over training seeds 0, 1, 2" in table


def test_an_interrupted_invocation_still_records_its_wall_time(tmp_path, monkeypatch):
  monkeypatch.setattr(harness.subprocess, "run",
                      lambda *a, **k: types.SimpleNamespace(returncode=-15))
  run = harness.Run("r", "configs/digits.py", [])
  harness.execute(str(tmp_path), run, log=lambda *_: None)
  harness.execute(str(tmp_path), run, log=lambda *_: None)
  with open(os.path.join(harness.run_dir(str(tmp_path), run), "wall_seconds.txt")) as fh:
    assert len(fh.read().split()) == 2
  assert harness.wall_minutes(str(tmp_path), run) >= 0.0


HOLD_THEN_FINISH = (
    "import os, sys, time; sys.path.insert(0, {repo!r})\n"
    "from vdmrep import reliability\n"
    "with reliability.workdir_lock({wd!r}):\n"
    "  print('locked', flush=True); time.sleep(1.0)\n"
    "  if {finish}: open(os.path.join({wd!r}, 'report.json'), 'w').write('{{}}')\n")


@pytest.mark.parametrize("finish", [True, False])
def test_a_run_another_process_trains_is_waited_for_not_started_twice(tmp_path, monkeypatch,
                                                                        finish):
  """A driver restarted while a run it had started still trains (e.g. to reorder the
  queue) waits on that trainer's lock; it trains the run itself only if the other process
  stopped before finishing it."""
  from vdmrep import reliability
  run = harness.Run("r", "configs/digits.py", [])
  wd = harness.run_dir(str(tmp_path), run)
  os.makedirs(wd)
  started = []  # for each trainer started: was the workdir free then?
  monkeypatch.setattr(harness.subprocess, "run", lambda *a, **k: started.append(
      reliability.training_pid(wd) is None) or types.SimpleNamespace(returncode=0))
  holder = subprocess.Popen(
      [sys.executable, "-c", HOLD_THEN_FINISH.format(repo=ROOT, wd=wd, finish=finish)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    logs = []
    harness.execute(str(tmp_path), run, log=logs.append, poll=0.05)
  finally:
    holder.kill()
    holder.wait()
  assert "already training under PID" in logs[0]
  assert started == ([] if finish else [True])
