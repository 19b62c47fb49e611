"""Study C's command (experiments/study_fashion.py) and the learning-curve script: rows,
commands, skipped rows, resuming, the table from report files, curves from reports."""
import argparse
import json
import math
import os
import subprocess
import types
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import harness  # noqa: E402
import learning_curves  # noqa: E402
import records  # noqa: E402
import study_fashion as sf  # noqa: E402

from vdmrep import config_lib  # noqa: E402


def _write_report(out, name, **metrics):
  d = os.path.join(out, "runs", name)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "report.json"), "w") as fh:
    json.dump({"step": 10, "metrics": metrics}, fh)


def test_every_available_row_is_a_valid_config_and_others_say_why():
  budget = sf.budget_overrides(argparse.Namespace(
      decoder="mvdm", eval_examples=0, steps=0, eval_every=0, fd_samples=0, sample_steps=0,
      extra=[]))
  available = {r.name for r in sf.ROWS if sf.availability(r, budget) is None}
  # What the config file itself provides is always runnable.
  assert {"unconditional", "elbo", "film", "free_bits", "capacity", "vae"} <= available
  # The latent mechanisms' keys exist here too: every row runs, at the default and a short budget.
  assert available == {r.name for r in sf.ROWS}
  short = budget + ["--config.training.num_steps=5000"]
  assert [r.name for r in sf.ROWS if sf.availability(r, short) is not None] == []
  for row in sf.ROWS:
    if row.name in available:
      c = sf.build_config(row.variant, list(row.overrides) + budget)
      config_lib.validate(c)
      assert c.data.source == "fashion_mnist"
      assert (c.model.encoder == "none") == (row.name == "unconditional")
      assert (c.model.get("decoder", "vdm") == "conv_vae") == (row.name == "vae")
    else:
      assert sf.availability(row, budget)  # a one-line reason


def test_dry_run_prints_exact_commands_and_marks_finished_runs(tmp_path, capsys):
  out = str(tmp_path)
  _write_report(out, "unconditional", bpd=3.1)
  sf.main(["--out", out, "--dry-run", "--rows", "unconditional:0,2", "film", "--steps", "50"])
  text = capsys.readouterr().out
  assert "# unconditional (finished)" in text and "# unconditional_seed2 (to run)" in text
  cmd = [l for l in text.splitlines() if "unconditional_seed2" in l and l.startswith("python")]
  assert cmd == [f"python -m vdmrep.main --config configs/fashion_mnist.py:remedy=unconditional,steps=50 "
                 f"--workdir {out}/runs/unconditional_seed2 --config.model.vdm=mvdm "
                 "--config.eval.max_examples=0 --config.training.num_steps=50 "
                 "--config.training.checkpoint_every=12 --config.seed=2"]
  assert not os.path.exists(os.path.join(out, "runs", "film"))  # nothing ran


def test_table_pairs_seeds_and_marks_skipped_and_unfinished_rows(tmp_path, capsys, monkeypatch):
  out = str(tmp_path)
  missing = sf.Row("missing", "a row whose key is missing", "remedy=elbo",
                   ("--config.training.no_such_key=True",))
  monkeypatch.setattr(sf, "ROWS", sf.ROWS + [missing])
  monkeypatch.setitem(sf.ROW_BY_NAME, "missing", missing)
  for seed, (u, f) in enumerate([(3.10, 3.05), (3.20, 3.16), (3.00, 2.99)]):
    suffix = "" if seed == 0 else f"_seed{seed}"
    _write_report(out, "unconditional" + suffix, bpd=u, bpd_se=0.01, histogram_bpd=4.588,
                  histogram_bpd_se=0.01)
    _write_report(out, "film" + suffix, bpd=f, bpd_se=0.01, kl_nats=5.0 + seed,
                  encoder_logreg_acc=0.8, random_encoder_logreg_acc=0.7,
                  pixels_logreg_acc=0.84, encoder_knn_acc=0.81, active_units=10 + seed,
                  latent_dim=128, encoder_label_info_bits=1.5)
  sf.main(["--out", out, "--table-only", "--rows", "unconditional:0,1,2", "film:0,1,2",
           "free_bits", "missing"])
  text = capsys.readouterr().out
  rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
          for l in text.splitlines() if l.startswith("| ")}
  film = rows["ELBO (beta = 1), FiLM"]
  assert film[0] == "3/3"
  assert film[1] == "3.067 ± 0.086 (sd over seeds)"
  # Paired by seed: -0.05, -0.04, -0.01 -> mean -0.033, sd 0.021.
  assert film[3] == "-0.0333 ± 0.0208 (sd, n=3 seeds)"
  assert film[4] == "6.00 ± 1.00" and film[6] == "- / 1.50 ± 0.00" and film[7] == "11.0 ± 1.0/128"
  assert film[8] == "0.800 ± 0.000 / 0.700 ± 0.000 / 0.840 ± 0.000"
  assert rows["unconditional VDM"][2] == "4.588 ± 0.010" and rows["unconditional VDM"][3] == "-"
  assert rows["free bits (0.1 nats/dim)"][0] == "0/1"
  assert rows["a row whose key is missing"][0].startswith(
      "skipped: config key training.no_such_key")
  assert open(os.path.join(out, "study_c.md")).read().count("| ") >= 5


def test_one_seed_pairs_over_images_and_band_columns_are_filled(tmp_path, capsys):
  out = str(tmp_path)
  key = {"source": "fashion_mnist", "num_images": 4}
  for name, per_image, extra in [
      ("unconditional", [3.0, 3.2, 2.9, 3.1], {}),
      ("elbo", [3.1, 3.25, 2.9, 3.35], {"saving_nats": 71.11, "net_nats": 66.86})]:
    d = os.path.join(out, "runs", name)
    os.makedirs(d)
    with open(os.path.join(d, "report.json"), "w") as fh:
      json.dump({"step": 10, "eval_key": key, "per_image": {"bpd": per_image},
                 "metrics": {"bpd": sum(per_image) / 4, "bpd_se": 0.05, **extra}}, fh)
  sf.main(["--out", out, "--table-only", "--rows", "unconditional", "elbo"])
  rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
          for l in capsys.readouterr().out.splitlines() if l.startswith("| ")}
  elbo = rows["ELBO (beta = 1), additive"]
  # Differences 0.1, 0.05, 0, 0.25: mean 0.1, sd 0.108, s.e. 0.054.
  assert elbo[3] == "+0.1000 ± 0.0540 (n=1 seed; s.e. over images)"
  assert elbo[5] == "71.1 / 66.9"
  # Different eval images cannot be paired over images: the bare difference only.
  with open(os.path.join(out, "runs", "elbo", "report.json")) as fh:
    rep = json.load(fh)
  rep["eval_key"] = {**key, "num_images": 3}
  with open(os.path.join(out, "runs", "elbo", "report.json"), "w") as fh:
    json.dump(rep, fh)
  sf.main(["--out", out, "--table-only", "--rows", "unconditional", "elbo"])
  assert "| +0.1000 (n=1 seed) |" in capsys.readouterr().out


def test_figure_draws_the_accounting_of_latent_rows(tmp_path):
  out = str(tmp_path)
  for seed, (u, e) in enumerate([(3.10, 3.09), (3.20, 3.21)]):
    suffix = "" if seed == 0 else f"_seed{seed}"
    _write_report(out, "unconditional" + suffix, bpd=u)
    # 784 dims: 5 nats/image is 5 / (784 ln 2) bits/dim.
    _write_report(out, "elbo" + suffix, bpd=e, kl_nats=5.0, kl_bpd=5.0 / (784 * math.log(2)),
                  encoder_logreg_acc=0.8, random_encoder_logreg_acc=0.7, pixels_logreg_acc=0.84)
  _write_report(out, "vae", bpd=3.5, kl_nats=20.0, kl_bpd=0.04)
  with open(os.path.join(out, "runs", "vae", "report.json")) as fh:
    rep = json.load(fh)
  rep["config"] = {"model": {"decoder": "conv_vae"}}
  with open(os.path.join(out, "runs", "vae", "report.json"), "w") as fh:
    json.dump(rep, fh)
  path = os.path.join(out, "fig", "study_c.png")
  drawn = sf.figure(out, sf.parse_rows(["unconditional:0,1", "elbo:0,1", "film", "vae"]), [],
                    path)
  assert [d["label"] for d in drawn] == ["ELBO (beta = 1), additive (n=2)"]  # no film yet; no VAE
  (d,) = drawn
  assert d["diff"] == pytest.approx(0.0) and d["err"] == pytest.approx(0.01 * math.sqrt(2))
  # Paired difference 0 bits/dim: w saved the decoder exactly its rate.
  assert d["saving"] == pytest.approx(5.0) and d["probe"] == pytest.approx([0.8, 0.7, 0.84])
  assert os.path.getsize(path) > 10_000


def test_rank_orders_used_latents_by_paired_elbo_and_prints_the_seed_command(tmp_path, capsys):
  out = str(tmp_path)
  _write_report(out, "unconditional", bpd=3.0)
  _write_report(out, "elbo", bpd=3.002, kl_nats=4.0, encoder_label_info_bits=2.0)
  _write_report(out, "film", bpd=2.999, kl_nats=5.0, encoder_label_info_bits=1.0)
  _write_report(out, "capped", bpd=3.002, kl_nats=3.0, encoder_label_info_bits=2.5)
  _write_report(out, "free_bits", bpd=2.99, kl_nats=0.5)  # an unused latent: not a candidate
  _write_report(out, "vae", bpd=2.5, kl_nats=20.0)
  with open(os.path.join(out, "runs", "vae", "report.json")) as fh:
    rep = json.load(fh)
  rep["config"] = {"model": {"decoder": "conv_vae"}}  # another decoder: not a candidate
  with open(os.path.join(out, "runs", "vae", "report.json"), "w") as fh:
    json.dump(rep, fh)
  ranked = sf.rank_promising(out, [])
  assert [r[0] for r in ranked] == ["film", "capped", "elbo"]  # a tie goes to more I(w; label)
  assert ranked[0][1] == pytest.approx(-0.001)
  sf.main(["--out", out, "--steps", "50", "--rank", "2", "--rows", "elbo:0"])
  text = capsys.readouterr().out
  assert "| 1 | film | -0.0010 | 5.00 | 1.00 |" in text
  assert text.splitlines()[-1] == (f"python experiments/study_fashion.py --out {out} --steps 50 "
                                   "--rows film:1,2 capped:1,2 --detach")


def test_moonshot_needs_every_criterion_and_three_paired_seeds(tmp_path, capsys):
  out = str(tmp_path)
  probes = dict(encoder_logreg_acc=0.86, random_encoder_logreg_acc=0.80, pixels_logreg_acc=0.84)
  for seed, (u, f, e) in enumerate([(3.10, 3.090, 3.09), (3.20, 3.188, 3.19), (3.00, 2.989, 2.99)]):
    suffix = "" if seed == 0 else f"_seed{seed}"
    _write_report(out, "unconditional" + suffix, bpd=u)
    _write_report(out, "film" + suffix, bpd=f, kl_nats=6.0, encoder_label_info_bits=1.5,
                  encoder_w_label_info_bits=1.2,
                  objective_is_bound=True, **probes)
    # Differences -0.010, -0.004, -0.016: mean + 2 s.e. < 0, but not the t-interval's end.
    _write_report(out, "capped" + suffix, bpd=u + (-0.010, -0.004, -0.016)[seed], kl_nats=6.0,
                  encoder_label_info_bits=1.5, encoder_w_label_info_bits=1.2,
                  objective_is_bound=True, **probes)
    if seed < 2:  # two seeds only: the ELBO criterion cannot be met
      # the encoder means carry 1.5 bits, one draw of w 0.6: the criterion reads the draw
      _write_report(out, "elbo" + suffix, bpd=e, kl_nats=6.0, encoder_label_info_bits=1.5,
                    encoder_w_label_info_bits=0.6,
                    objective_is_bound=True, **probes)
  _write_report(out, "free_bits", bpd=2.9, kl_nats=12.8, encoder_label_info_bits=2.0,
                objective_is_bound=False, **probes)
  _write_report(out, "staged", bpd=3.05, kl_nats=6.0, encoder_label_info_bits=2.0,
                objective_is_bound=True, run_trained_elbo_throughout=False, **probes)
  _write_report(out, "kl_balance", bpd=3.0, kl_nats=19.0, encoder_label_info_bits=2.0,
                objective_is_bound=True, **probes)
  sf.main(["--out", out, "--moonshot", "--rows", "unconditional:0,1,2", "film:0,1,2",
           "capped:0,1,2", "elbo:0,1", "free_bits", "staged", "kl_balance"])
  rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
          for l in capsys.readouterr().out.splitlines() if l.startswith("| ")}
  film = rows["ELBO (beta = 1), FiLM"]
  # Differences -0.010, -0.012, -0.011: mean -0.011, s.e. 0.0006, upper -0.011 + 4.303 s.e.
  assert film[6] == "-0.0110 ± 0.0006 (s.e., n=3; 95% upper -0.0085) ✓" and film[-1] == "yes"
  capped = rows["capped latent (D = 16)"]
  assert capped[6] == "-0.0100 ± 0.0035 (s.e., n=3; 95% upper +0.0049) ✗"
  assert capped[-1] == "no"
  assert film[5] == "- / - / -"  # k-NN shown beside, not judged
  assert film[4] == "0.860 vs 0.800 / 0.840 ✓"
  elbo = rows["ELBO (beta = 1), additive"]
  assert "(s.e., n=2;" in elbo[6] and elbo[6].endswith("✗") and elbo[-1] == "no"
  assert film[3] == "1.20 (mean of q: 1.50) ✓" and elbo[3] == "0.60 (mean of q: 1.50) ✗"
  free = rows["free bits (0.1 nats/dim)"]
  assert free[1] == "no ✗" and free[-1] == "no"
  assert rows[sf.ROW_BY_NAME["staged"].label][1] == "at the end ✓"  # ends at the ELBO
  assert film[1] == "yes ✓"
  # the ELBO's value with the encoder's KL gradient scaled by 0.2: not beta = 1
  kl_bal = rows[sf.ROW_BY_NAME["kl_balance"].label]
  assert kl_bal[1].startswith("value only: KL balancing alpha=0.8") and kl_bal[1].endswith("✗")


def test_w_probe_fills_older_reports_from_its_own_directory(tmp_path, capsys):
  out = str(tmp_path)
  _write_report(out, "unconditional", bpd=3.1)
  _write_report(out, "elbo", bpd=3.1, kl_nats=4.0, encoder_label_info_bits=2.5)
  _write_report(out, "capped", bpd=3.0, kl_nats=6.0, encoder_label_info_bits=2.2,
                encoder_w_label_info_bits=1.6)  # a report that has it: never re-probed
  budget = []
  elbo, capped = (sf.run_of(sf.ROW_BY_NAME[n], 0, budget) for n in ("elbo", "capped"))
  cmd = sf.w_probe_command(out, elbo)
  wd = os.path.join(out, "runs", "elbo")
  assert cmd[cmd.index("--workdir") + 1] == wd and "--mode" in cmd and "eval" in cmd
  assert cmd[cmd.index("--eval_dir") + 1] == os.path.join(wd, "evals", "probe_w")
  assert cmd[-2:] == ["--config.eval.evaluators=probes", "--config.eval.probe_features=encoder_w"]
  called = []
  monkey_run = lambda c, **kw: called.append(c) or subprocess.CompletedProcess(c, 0, "", "")
  original, sf.subprocess.run = sf.subprocess.run, monkey_run
  try:
    sf.main(["--out", out, "--w-probes", "--rows", "unconditional", "elbo", "capped"])
  finally:
    sf.subprocess.run = original
  assert [c[c.index("--workdir") + 1] for c in called] == [wd]  # only the report lacking it
  assert not os.path.exists(os.path.join(out, "study_c.md"))  # trains and tabulates nothing
  os.makedirs(os.path.join(wd, "evals", "probe_w"))
  with open(os.path.join(wd, "evals", "probe_w", "report.json"), "w") as fh:
    json.dump({"metrics": {"encoder_w_label_info_bits": 1.1, "encoder_w_logreg_acc": 0.6,
                           "encoder_label_info_bits": 9.9}}, fh)
  m = sf.load_report(out, elbo)["metrics"]
  assert m["encoder_w_label_info_bits"] == 1.1 and m["encoder_label_info_bits"] == 2.5
  assert sf.load_report(out, capped)["metrics"]["encoder_w_label_info_bits"] == 1.6
  sf.main(["--out", out, "--table-only", "--rows", "unconditional", "elbo"])
  rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
          for l in capsys.readouterr().out.splitlines() if l.startswith("| ")}
  assert rows["ELBO (beta = 1), additive"][6] == "1.10 / 2.50"


def test_learning_curves_from_reports_and_events(tmp_path, capsys):
  wd = tmp_path / "run"
  os.makedirs(wd / "reports")
  for step, bpd in ((100, 3.5), (200, 3.2), (300, 3.05)):
    with open(wd / "reports" / f"step{step}.json", "w") as fh:
      json.dump({"step": step, "metrics": {"bpd": bpd, "bpd_se": 0.01},
                 "dataset": {"num_eval": 50}}, fh)
  from clu import metric_writers
  writer = metric_writers.create_default_writer(str(wd))
  for step, sps in ((100, 2.0), (200, 4.0), (300, 1.0)):  # 50 s, 25 s, 100 s
    writer.write_scalars(step, {"steps_per_sec": sps})
  writer.flush()
  assert learning_curves.read_rates(str(wd)) == [(100, 2.0), (200, 4.0), (300, 1.0)]
  mins = learning_curves.minutes_at(learning_curves.read_rates(str(wd)), [100, 150, 300])
  assert mins == pytest.approx([50 / 60, 62.5 / 60, 175 / 60])
  learning_curves.main([f"m={wd}", "--out", str(tmp_path / "fig"), "--targets", "3.3", "3.0"])
  text = capsys.readouterr().out
  assert "| m | 200 / 1.2 | not reached |" in text
  assert os.path.exists(tmp_path / "fig_curves.png")
  assert os.path.exists(tmp_path / "fig_time_to_bpd.png")
  # A quiet machine's seconds per step replace the shared machine's event rates.
  learning_curves.main([f"m={wd}", "--out", str(tmp_path / "fig"), "--targets", "3.3",
                        "--step-seconds", "m=0.3"])
  assert "| m | 200 / 1.0 |" in capsys.readouterr().out  # 200 x 0.3 s
  with pytest.raises(SystemExit, match="no value for run 'm'"):
    learning_curves.main([f"m={wd}", "--out", str(tmp_path / "fig"), "--step-seconds", "x=1"])


@pytest.mark.slow
def test_tiny_study_runs_resumes_and_prints(tmp_path, capsys):
  """Two real 8x8 runs of a few steps; the second invocation finds them finished, and a
  run whose report is lost is evaluated again from its checkpoint."""
  out = str(tmp_path)
  tiny = ["--extra=--config.data.source=digits", "--extra=--config.model.channels=8",
          "--extra=--config.model.n_blocks=1", "--extra=--config.training.batch_size=16",
          "--extra=--config.eval.max_examples=64", "--extra=--config.eval.sample_quality=False",
          "--extra=--config.eval.pictures=False", "--extra=--config.eval.probe_max_train=200",
          "--extra=--config.eval.probe_cs=0.1,10", "--extra=--config.eval.probe_cv_folds=2",
          "--extra=--config.eval.num_time_samples=1", "--extra=--config.training.log_every=2"]
  argv = ["--out", out, "--rows", "unconditional", "vae", "--steps", "4", "--parallel", "1"]
  sf.main(argv + tiny)
  first = capsys.readouterr().out
  assert "0 of 2 runs already finished" in first
  for name in ("unconditional", "vae"):
    assert os.path.exists(os.path.join(out, "runs", name, "report.json")), name
  os.remove(os.path.join(out, "runs", "vae", "report.json"))
  sf.main(argv + tiny)
  second = capsys.readouterr().out
  assert "1 of 2 runs already finished; running 1" in second
  rows = {l.split("|")[1].strip(): l for l in second.splitlines() if l.startswith("| ")}
  assert "1/1" in rows["unconditional VDM"] and "1/1" in rows["classic VAE (conv decoder)"]
  stdout = open(os.path.join(out, "runs", "vae", "stdout.log")).read()
  assert "resumed from checkpoint at step 4" in stdout


def test_a_row_named_twice_is_tabulated_once_with_all_its_seeds():
  rows = sf.parse_rows(["unconditional:0,1", "elbo:0", "unconditional:2", "elbo:1,0"])
  assert [r.name for r, _ in rows] == ["unconditional", "elbo", "unconditional", "elbo"]
  merged = sf.merge_rows(rows)
  assert [(r.name, s) for r, s in merged] == [("unconditional", [0, 1, 2]), ("elbo", [0, 1])]


def test_figure_and_table_flags_train_nothing_and_stay_out_of_the_command(tmp_path, capsys,
                                                                          monkeypatch):
  """Drawing or tabulating reads finished runs; it must never start the unfinished ones."""
  out = str(tmp_path)
  _write_report(out, "unconditional", bpd=3.0)
  _write_report(out, "elbo", bpd=3.002, kl_nats=4.0)

  def refuse(*args, **kwargs):
    raise AssertionError("a read-only flag started training")
  monkeypatch.setattr(sf.harness, "run_all", refuse)
  path = str(tmp_path / "fig.png")
  sf.main(["--out", out, "--steps", "7", "--rows", "unconditional", "elbo", "capped",
           "--figure", path])
  sf.main(["--out", out, "--table-only", "--steps", "7", "--rows", "unconditional", "elbo",
           f"--figure={path}"])
  text = capsys.readouterr().out
  commands = [l for l in text.splitlines() if l.startswith("Command: ")]
  assert commands == ["Command: `python experiments/study_fashion.py --out "
                      f"{out} --steps 7 --rows unconditional elbo capped`",
                      "Command: `python experiments/study_fashion.py --out "
                      f"{out} --steps 7 --rows unconditional elbo`"]
  assert os.path.getsize(path) > 10_000


def test_a_relative_out_means_the_callers_directory_to_trainer_and_detached_study(
    tmp_path, monkeypatch):
  """The trainer and a detached study run from elsewhere (the repo root, a new session): a
  relative --out must still name the directory below the caller's cwd."""
  monkeypatch.chdir(tmp_path)
  seen = {}

  def fake_run(cmd, cwd, stdout, stderr):
    seen.update(cmd=cmd, cwd=cwd)
    return types.SimpleNamespace(returncode=0)
  monkeypatch.setattr(sf.harness.subprocess, "run", fake_run)
  run = sf.run_of(sf.ROW_BY_NAME["elbo"], 1, [])
  sf.harness.execute("rel/out", run, log=lambda *_: None)
  wd = seen["cmd"][seen["cmd"].index("--workdir") + 1]
  assert wd == str(tmp_path / "rel" / "out" / "runs" / "elbo_seed1")
  assert os.path.exists(os.path.join(wd, "command.txt"))

  class FakePopen:
    def __init__(self, cmd, cwd, **kwargs):
      seen.update(detached_cmd=cmd, detached_cwd=cwd)
      self.pid = 1
  monkeypatch.setattr(sf.subprocess, "Popen", FakePopen)
  sf.main(["--out", "rel/out", "--rows", "elbo:1", "--detach"])
  assert seen["detached_cwd"] == str(tmp_path)
  assert "--detach" not in seen["detached_cmd"] and "rel/out" in seen["detached_cmd"]
  assert os.path.exists(tmp_path / "rel" / "out" / "study.log")


def test_records_keep_each_finished_run_and_restore_it_into_a_new_out(tmp_path, capsys,
                                                                       monkeypatch):
  """--records: each run is recorded as it finishes (a failed one is not), and a study on an
  empty OUT with the same records finds it finished: it prints its row, trains nothing."""
  rec = str(tmp_path / "records")
  trained = []

  def fake_execute(out, run, log=print):
    trained.append(run.name)
    if run.name == "unconditional":  # the other run fails: no report
      _write_report(out, run.name, bpd=3.08, bpd_se=0.01)
    return 1.0

  monkeypatch.setattr(sf.harness, "execute", fake_execute)
  argv = ["--rows", "unconditional", "elbo", "--steps", "5000", "--records", rec]
  sf.main(["--out", str(tmp_path / "a")] + argv)
  assert sorted(trained) == ["elbo", "unconditional"]
  assert os.listdir(rec) == ["unconditional.json.gz"]
  capsys.readouterr()
  trained.clear()
  sf.main(["--out", str(tmp_path / "b")] + argv)
  text = capsys.readouterr().out
  assert trained == ["elbo"]  # the recorded run is finished in the new OUT
  assert "1 of 2 runs already finished" in text
  row = next(l for l in text.splitlines() if l.startswith("| unconditional VDM"))
  assert "3.080 ± 0.010" in row and "1/1" in row


def test_a_w_probe_added_to_a_recorded_run_updates_its_record(tmp_path, monkeypatch):
  out, rec = str(tmp_path / "out"), str(tmp_path / "records")
  _write_report(out, "elbo", bpd=3.1, kl_nats=4.0)
  records.save(out, rec, log=lambda *_: None)
  wd = os.path.join(out, "runs", "elbo")

  def fake_probe(cmd, **kw):
    os.makedirs(os.path.join(wd, "evals", "probe_w"))
    with open(os.path.join(wd, "evals", "probe_w", "report.json"), "w") as fh:
      json.dump({"metrics": {"encoder_w_label_info_bits": 1.1}}, fh)
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(sf.subprocess, "run", fake_probe)
  sf.main(["--out", out, "--w-probes", "--rows", "elbo", "--records", rec])
  back = str(tmp_path / "back")
  records.restore(rec, back, log=lambda *_: None)
  m = sf.load_report(back, sf.run_of(sf.ROW_BY_NAME["elbo"], 0, []))["metrics"]
  assert m["encoder_w_label_info_bits"] == 1.1
