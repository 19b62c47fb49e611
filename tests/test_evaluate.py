"""End-to-end evaluation of a tiny digits model trained a few dozen steps.

Checks the written report, pictures and latents against independent recomputation, and
that re-evaluating the same checkpoint gives the same numbers.
"""
import contextlib
import io
import json
import math
import os
import struct

import numpy as np
import pytest
from scipy.special import logsumexp

from vdmrep import config_lib, data, train


def eval_config(encoder="te"):
  c = config_lib.base_config()
  c.model.vdm, c.model.n_blocks, c.model.channels, c.model.encoder = "mvdm", 1, 8, encoder
  c.training.batch_size, c.training.num_steps, c.training.log_every = 16, 30, 10
  c.training.checkpoint_every, c.training.eval_every = 30, 15
  c.optim.lr, c.optim.warmup_steps, c.optim.ema_decay = 1e-3, 5, 0.9
  c.eval.batch_size, c.eval.num_time_samples = 128, 1
  c.eval.usefulness_num_t, c.eval.usefulness_max_examples = 4, 128
  c.eval.probe_max_train, c.eval.probe_max_iter = 300, 300
  c.eval.tsne_max_points = 100
  c.eval.ood_holdout_class = 9
  c.eval.sample_quality = False  # 10k samples x 1000 steps by default: tests/test_sample_section.py
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval_te"))
  config = eval_config()
  noise = np.random.default_rng(0).integers(0, 256, size=(200, 8, 8, 1), dtype=np.uint8)
  np.savez(os.path.join(workdir, "noise.npz"), images=noise)
  config.eval.ood_source = "npz:" + os.path.join(workdir, "noise.npz")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "report.json")) as fh:
    rep = json.load(fh)
  return {"workdir": workdir, "config": config, "report": rep, "stdout": out.getvalue()}


@pytest.mark.slow
def test_every_number_is_written_and_printed(run):
  m = run["report"]["metrics"]
  cols = ["bpd", "bpd_se", "recon_bpd", "prior_bpd", "diffusion_bpd", "kl_bpd", "objective_bpd",
          "kl_nats", "kl_nats_se", "kl_nats_per_dim", "active_units", "mi_nats", "mi_upper_nats",
          "usefulness_gap_bpd", "encoder_logreg_acc", "encoder_knn_acc", "pixels_logreg_acc",
          "pixels_knn_acc", "random_encoder_logreg_acc", "random_encoder_knn_acc",
          "ood_auroc/class_9"]
  for k in cols:
    assert isinstance(m[k], (int, float)) and math.isfinite(m[k]), k
  # the parts add up, and the beta = 1 objective is the ELBO itself
  parts = sum(m[f"{k}_bpd"] for k in ("recon", "prior", "diffusion", "kl"))
  assert m["bpd"] == pytest.approx(parts, rel=1e-9)
  assert m["objective_is_bound"] is True and m["objective_bpd"] == m["bpd"]
  assert m["kl_bpd"] == pytest.approx(m["kl_nats"] / (64 * math.log(2)), rel=1e-5)
  with open(os.path.join(run["workdir"], "report.md")) as fh:
    md = fh.read()
  for k in ("bpd", "diffusion_bpd", "kl_bpd"):
    assert f"| {k} | {m[k]:.4g} |" in md
  assert f"active units: {m['active_units']} / 128" in md
  assert f"I_q(x; w): {m['mi_nats']:.4g}" in md
  assert f"| pixels | {m['pixels_logreg_acc']:.4g} (" in md
  assert f"| {m['pixels_knn_acc']:.4g} | {m['pixels_label_info_bits']:.4g} |" in md
  # The console gets the summary, not the tables (console.py).
  assert f"bpd {m['bpd']:.4g} +- {m['bpd_se']:.4g}" in run["stdout"]
  assert "report.md" in run["stdout"] and "| bpd |" not in run["stdout"]
  u = run["report"]["usefulness"]
  assert len(u["t"]) == len(u["gap_bpd"]) == 4
  assert m["usefulness_gap_bpd"] == pytest.approx(np.mean(u["gap_bpd"]), rel=1e-9, abs=1e-12)


def _png_size(path):
  with open(path, "rb") as fh:
    head = fh.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
  return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_pictures_are_valid_pngs_and_in_tensorboard(run):
  pics = run["report"]["pictures"]
  assert set(pics) == {"latent_maps", "usefulness_of_w"}
  for rel in pics.values():
    w, h = _png_size(os.path.join(run["workdir"], rel))
    assert 600 <= w <= 3000 and 300 <= h <= 3000, (rel, w, h)
  events = [f for f in os.listdir(run["workdir"]) if "tfevents" in f]
  blob = b"".join(open(os.path.join(run["workdir"], f), "rb").read() for f in events)
  assert b"eval/latent_maps" in blob and b"eval/usefulness_of_w" in blob
  assert b"train/active_units_batch" in blob


@pytest.mark.slow
def test_active_units_kl_and_mi_recomputed_from_latents(run):
  m = run["report"]["metrics"]
  with np.load(os.path.join(run["workdir"], "latents.npz")) as f:
    mean, logvar, w, labels = (f[k].astype(np.float64) for k in ("mean", "logvar", "w_mi",
                                                                  "labels"))
  n = len(mean)
  assert n == m["num_images"] == len(labels)
  assert m["active_units"] == int(np.sum(np.var(mean, axis=0) > 0.01))
  kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=1)
  assert m["kl_nats"] == pytest.approx(kl.mean(), rel=1e-9)
  # MI: the [N, N, D] textbook form with scipy's logsumexp over the aggregate posterior
  d = w[0][:, None, :] - mean[None]
  logq = -0.5 * np.sum(np.log(2 * np.pi) + logvar[None] + d ** 2 * np.exp(-logvar[None]), -1)
  mi = np.mean(np.diag(logq) - logsumexp(logq, axis=1) + np.log(n))
  assert m["mi_nats"] == pytest.approx(mi, rel=1e-7)
  assert m["mi_nats"] <= m["mi_upper_nats"] == pytest.approx(np.log(n))


@pytest.mark.slow
def test_pixel_probe_is_sklearn_logistic_regression(run):
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  cfg = run["config"]
  ds = data.hold_out_class(data.load(cfg.data), cfg.eval.ood_holdout_class)
  n = cfg.eval.probe_max_train
  tr = ds.train_images[:n].reshape(n, -1) / 255.0
  ev = ds.eval_images.reshape(len(ds.eval_images), -1) / 255.0
  res = run["report"]["probes"]["results"]["pixels"]
  sc = StandardScaler().fit(tr)
  clf = LogisticRegression(C=res["logreg_c"], max_iter=cfg.eval.probe_max_iter)
  acc = clf.fit(sc.transform(tr), ds.train_labels[:n]).score(sc.transform(ev), ds.eval_labels)
  assert run["report"]["metrics"]["pixels_logreg_acc"] == acc
  assert res["logreg_c"] in [float(c) for c in cfg.eval.probe_cs.split(",")]
  with np.load(os.path.join(run["workdir"], "latents.npz")) as f:
    np.testing.assert_array_equal(f["labels"], ds.eval_labels)
  ood = run["report"]["ood"]["class_9"]
  assert ood["num_ood"] == int(np.sum(data.load(cfg.data).eval_labels == 9))
  assert 9 not in set(ds.train_labels.tolist())
  noise = run["report"]["ood"][cfg.eval.ood_source]
  assert noise["num_ood"] == 30  # the eval part (15%) of the 200 npz images
  # iid uniform 8-bit pixels have entropy 8 bits/dim: no bound may go below it (this
  # failed when a small set's images shared nearly one t in a padded antithetic batch)
  assert noise["ood_bpd"] > 8.0 - 3.0 * noise["ood_bpd_se"]
  assert 0.0 <= noise["auroc"] <= 1.0


@pytest.mark.slow
def test_periodic_eval_is_the_cheap_subset(run):
  with open(os.path.join(run["workdir"], "reports", "step15.json")) as fh:
    rep = json.load(fh)
  assert rep["full"] is False and rep["step"] == 15
  assert "mi_nats" in rep["metrics"] and "pixels_logreg_acc" not in rep["metrics"]
  assert rep["metrics"]["bpd"] != run["report"]["metrics"]["bpd"]


@pytest.mark.slow
def test_eval_mode_is_deterministic(run):
  first = run["report"]
  with np.load(os.path.join(run["workdir"], "latents.npz")) as f:
    before = {k: f[k] for k in f.files}
  with contextlib.redirect_stdout(io.StringIO()):
    again = train.evaluate_checkpoint(run["config"], run["workdir"])
  with open(os.path.join(run["workdir"], "report.json")) as fh:
    second = json.load(fh)
  assert second["metrics"] == first["metrics"]
  assert second["usefulness"] == first["usefulness"] and second["per_dim"] == first["per_dim"]
  assert again["bpd"] == first["metrics"]["bpd"]
  with np.load(os.path.join(run["workdir"], "latents.npz")) as f:
    for k, v in before.items():
      np.testing.assert_array_equal(f[k], v)


@pytest.mark.slow
def test_eval_dir_writes_elsewhere_and_the_w_probe_repeats(run, tmp_path):
  res = run["report"]["probes"]["results"]
  assert set(res) == {"pixels", "encoder", "random_encoder", "encoder_w"}
  m = run["report"]["metrics"]
  # one draw of w carries no more label information than the encoder means it is drawn
  # around, up to the probes' estimation error on 270 eval images
  assert m["encoder_w_label_info_bits"] <= m["encoder_label_info_bits"] + 0.3
  path = os.path.join(run["workdir"], "report.json")
  with open(path, "rb") as fh:
    before = fh.read()
  cfg = run["config"]
  with cfg.unlocked():
    cfg.eval.evaluators, cfg.eval.probe_features = "probes", "encoder_w"
  out = str(tmp_path / "probe_w")
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      train.evaluate_checkpoint(cfg, run["workdir"], out=out)
  finally:
    with cfg.unlocked():
      cfg.eval.evaluators, cfg.eval.probe_features = eval_config().eval.evaluators, \
          eval_config().eval.probe_features
  with open(path, "rb") as fh:
    assert fh.read() == before  # the run's own report is untouched
  with open(os.path.join(out, "report.json")) as fh:
    again = json.load(fh)
  assert set(again["probes"]["results"]) == {"encoder_w"}
  for k in ("encoder_w_logreg_acc", "encoder_w_knn_acc", "encoder_w_label_info_bits"):
    assert again["metrics"][k] == m[k], k  # the same eval seed: the same draws and fits
