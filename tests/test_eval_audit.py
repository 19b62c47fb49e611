"""One test (or more) per finding of the evaluation audit; each fails on the code before it.

Models are tiny (MVDM with 1 block of 8 channels on 8x8 digits, untrained, parameters
randomised so every input matters) and evaluations use 32 images and K = 1.
"""
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MNIST_DIR, ROOT
from vdmrep import collapse, config_lib, data, evaluators, losses, parallel, probes, report
from vdmrep.evaluators import baselines
from vdmrep.evaluators import elbo as elbo_eval
from vdmrep.models import build_model
from vdmrep.models.vae_vdm import VAEVDM, ELBOTerms


@dataclasses.dataclass(frozen=True)
class ShiftedLogvar(VAEVDM):
  """The same model with the encoder's log-variance head moved by `shift` (an untrained
  head of a deterministic encoder can output anything)."""
  shift: float = 0.0

  def encode(self, params, x_int, *labels):
    mean, logvar = super().encode(params, x_int, *labels)
    return mean, logvar + self.shift


def _config(**collapse_kw):
  c = config_lib.base_config()
  c.model.vdm, c.model.n_blocks, c.model.channels, c.model.encoder = "mvdm", 1, 8, "te"
  c.training.batch_size, c.training.num_steps = 16, 8
  c.eval.batch_size, c.eval.num_time_samples, c.eval.max_examples = 32, 1, 32
  c.eval.usefulness_num_t, c.eval.usefulness_max_examples = 2, 32
  c.eval.posterior_std_grid, c.eval.posterior_fit_examples = "0.1,1.0", 32
  for k, v in collapse_kw.items():
    c.collapse[k] = v
  return c


@pytest.fixture(scope="module")
def tiny():
  c = _config()
  base = build_model(c.model)
  params = base.init(jax.random.key(0), (8, 8, 1))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])
  ds = data.load(c.data)
  models = {s: ShiftedLogvar(**{f.name: getattr(base, f.name) for f in
                                dataclasses.fields(VAEVDM)}, shift=s) for s in (0.0, 6.0)}
  return {"params": params, "ds": ds, "models": models, "mesh": parallel.make_mesh()}


def _evaluate(tiny, config, names, shift=0.0, step=8, tmp=None):
  return evaluators.run_evaluation(tiny["models"][shift], tiny["params"], tiny["ds"], config,
                                   tiny["mesh"], step=step, workdir=str(tmp), full=False,
                                   names=names)


# 1. deterministic encoders: every number uses w = mean, whatever the logvar head says
@pytest.mark.slow
def test_deterministic_encoder_is_evaluated_with_the_w_it_was_trained_with(tiny, tmp_path):
  c = _config(deterministic_encoder=True, mmd_alpha=1.0, mmd_lambda=2.0)
  a = _evaluate(tiny, c, ["elbo", "latents"], 0.0, tmp=tmp_path)["metrics"]
  b = _evaluate(tiny, c, ["elbo", "latents"], 6.0, tmp=tmp_path)["metrics"]
  for k in ("at_mean_bpd", "at_mean_diffusion_bpd", "bpd", "kl_nats", "mi_nats",
            "usefulness_gap_bpd", "fitted_posterior_std"):
    assert a[k] == b[k], k  # the untrained head (shifted by 6) changes nothing
  assert a["bound_kind"] == "fitted_posterior_std" and a["kl_kind"] == "fitted_posterior_std"
  assert a["fitted_posterior_std"] in (0.1, 1.0) and a["at_mean_kl_bpd"] == 0.0
  # the bound: KL of N(mean, s^2 I) in closed form, s the fitted one
  mean, _ = tiny["models"][0.0].encode(tiny["params"], jnp.asarray(tiny["ds"].eval_images[:32]))
  s = a["fitted_posterior_std"]
  kl = 0.5 * np.sum(np.asarray(mean, np.float64) ** 2 + s * s - 1 - 2 * np.log(s), axis=1)
  assert a["kl_nats"] == pytest.approx(kl.mean(), rel=1e-5)
  assert a["kl_bpd"] == pytest.approx(kl.mean() / (64 * math.log(2)), rel=1e-5)
  c.eval.posterior_std_grid = ""  # no fitted posterior: no bound, infinite KL
  m = _evaluate(tiny, c, ["elbo", "latents"], 6.0, tmp=tmp_path)["metrics"]
  assert m["bound_kind"] == "none" and math.isnan(m["bpd"]) and math.isnan(m["kl_nats"])
  assert m["mi_nats"] == pytest.approx(math.log(32))  # distinct means: w identifies x
  assert "**no bound**" in report.markdown(_evaluate(tiny, c, ["elbo"], 0.0, tmp=tmp_path))


@pytest.mark.slow
def test_guided_samples_of_a_deterministic_encoder_condition_on_the_mean(tiny):
  from vdmrep import sampling
  x = jnp.asarray(tiny["ds"].eval_images[:4])
  m = tiny["models"][6.0]
  w = sampling.posterior_w(m, tiny["params"], x, jax.random.key(0), deterministic=True)
  np.testing.assert_array_equal(w, m.encode(tiny["params"], x)[0])
  kw = dict(mode="guided", num=None, batch_size=4, num_steps=2, deterministic_encoder=True)
  a = sampling.generate(tiny["models"][0.0], tiny["params"], jax.random.key(1),
                        images=tiny["ds"].eval_images[:4], **kw)["images"]
  b = sampling.generate(m, tiny["params"], jax.random.key(1),
                        images=tiny["ds"].eval_images[:4], **kw)["images"]
  np.testing.assert_array_equal(a, b)


# 2. probes measure content, not feature scale
def test_probe_accuracy_does_not_depend_on_feature_scale():
  ds = data.load(config_lib.base_config().data)
  proj = np.random.default_rng(0).normal(size=(64, 16))
  tr = probes.pixel_features(ds.train_images) @ proj
  ev = probes.pixel_features(ds.eval_images) @ proj
  cfg = config_lib.base_config().eval
  one = probes.run_probes({"f": (tr, ev)}, ds.train_labels, ds.eval_labels, cfg)["f"]
  small = probes.run_probes({"f": (0.01 * tr, 0.01 * ev)}, ds.train_labels, ds.eval_labels,
                            cfg)["f"]
  n = len(ev)
  assert abs(one["logreg_acc"] - small["logreg_acc"]) <= 1.0 / n + 1e-12
  assert one["knn_acc"] == small["knn_acc"] and one["logreg_acc"] > 0.5
  assert one["logreg_c"] in [float(x) for x in cfg.probe_cs.split(",")]
  # I(w; label) in bits: label entropy minus held-out cross-entropy, at most log2(10)
  assert 0.0 < one["label_info_bits"] <= one["label_entropy_bits"] <= math.log2(10) + 0.01
  assert one["label_info_bits"] == pytest.approx(
      one["label_entropy_bits"] - one["cross_entropy_bits"])


# 3. trivial baselines
def _histogram_reference(train, evals, vocab, k):
  """Independent per-pixel loop: counts by np.unique, probabilities, mean bits per dim."""
  train = train.reshape(len(train), -1)
  evals = evals.reshape(len(evals), -1)
  bits = np.zeros(len(evals))
  for d in range(train.shape[1]):
    vals, counts = np.unique(train[:, d], return_counts=True)
    table = np.full(vocab, k, np.float64)
    table[vals] += counts
    bits -= np.log2(table[evals[:, d]] / table.sum())
  return bits.mean() / train.shape[1]


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="real MNIST test split not present")
def test_histogram_bpd_on_real_mnist_equals_an_independent_computation():
  c = config_lib.base_config()
  c.data.source = "idx:" + MNIST_DIR
  ds = data.load(c.data)
  got = baselines.histogram_bpd(ds.train_images, ds.eval_images, 256, k=0.5)
  want = _histogram_reference(ds.train_images, ds.eval_images, 256, 0.5)
  assert abs(got["bpd"] - want) < 1e-3 and got["num_eval"] == len(ds.eval_images)
  assert 1.0 < got["bpd"] < 3.0


@pytest.mark.slow
def test_digits_baselines_state_the_17_levels(tiny, tmp_path):
  rep = _evaluate(tiny, _config(), ["elbo", "baselines"], tmp=tmp_path)
  m = rep["metrics"]
  assert m["levels_used"] == 17 and m["uniform_bpd"] == pytest.approx(math.log2(17))
  want = _histogram_reference(tiny["ds"].train_images, tiny["ds"].eval_images[:32], 256, 0.5)
  assert m["histogram_bpd"] == pytest.approx(want, abs=1e-9) and m["histogram_k"] == 0.5
  diff = np.asarray(rep["per_image"]["bpd"]) - np.asarray(rep["per_image"]["histogram_bpd"])
  assert m["bpd_minus_histogram"] == pytest.approx(diff.mean())
  md = report.markdown(rep)
  assert "per-pixel histogram (baseline)" in md and "uses 17 of 256 levels" in md


# 4. the trained objective is that of the last trained step
@pytest.mark.slow
def test_objective_is_evaluated_at_the_last_trained_step(tiny, tmp_path):
  c = _config(schedule="cyclical", cycles=2, cycle_ratio=0.5)  # beta(7) = 1, beta(8) = 0
  assert float(collapse.kl_weight(7, c)) == 1.0 and float(collapse.kl_weight(8, c)) == 0.0
  m = _evaluate(tiny, c, ["elbo"], step=8, tmp=tmp_path)["metrics"]
  assert m["objective_step"] == 7 and m["objective_is_bound"] is True
  assert m["objective_bpd"] == m["bpd"] and m["objective_bpd_se"] == m["bpd_se"]
  assert m["run_trained_elbo_throughout"] is False
  c = _config(beta=2.0)
  m = _evaluate(tiny, c, ["elbo"], step=8, tmp=tmp_path)["metrics"]
  assert m["objective_is_bound"] is False and m["objective_bpd_se"] > 0


# 5. paired differences over the same eval images
def test_paired_difference_of_two_reports(tmp_path):
  rng = np.random.default_rng(0)
  a, b = rng.normal(5, 1, 50), rng.normal(5, 1, 50)
  key = {"source": "digits", "num_images": 50}
  ra = {"eval_key": key, "per_image": {"bpd": a.tolist()}}
  rb = {"eval_key": key, "per_image": {"bpd": (a - 0.1 + 0.01 * b).tolist()}}
  d = report.paired_difference(ra, rb)
  diff = 0.1 - 0.01 * b
  assert d["diff"] == pytest.approx(diff.mean()) and d["n"] == 50
  assert d["se"] == pytest.approx(diff.std(ddof=1) / math.sqrt(50))
  assert d["se"] < 0.01  # far below the unpaired s.e. (~0.2)
  with pytest.raises(ValueError, match="different images"):
    report.paired_difference(ra, dict(rb, eval_key=dict(key, num_images=49)))


# 7. InfoVAE's exact kernel and estimator
def test_infovae_kernel_and_biased_estimator_match_its_formula():
  rng = np.random.default_rng(1)
  z, p = rng.normal(size=(12, 6)), rng.normal(size=(12, 6))

  def k(x, y):  # mean over dims of squared differences, divided by the dimension
    return np.exp(-np.mean((x[:, None] - y[None]) ** 2, -1) / x.shape[1])
  want = k(z, z).mean() + k(p, p).mean() - 2 * k(z, p).mean()
  got = losses.mmd(jnp.asarray(z), jnp.asarray(p), "infovae", estimator="biased")
  assert float(got) == pytest.approx(want, rel=1e-5)
  from configs import digits
  c = digits.get_config("remedy=infovae")
  assert (c.collapse.mmd_alpha, c.collapse.mmd_kernel, c.collapse.mmd_estimator) == (
      1.0, "infovae", "biased")


# 8. high-noise weighting: diffusion only, or the whole objective consistently
def test_sigmoid_consistent_weights_every_term():
  b = 3
  terms = ELBOTerms(recon=jnp.full((b,), 2.0), prior=jnp.full((b,), 0.5),
                    diffusion=jnp.array([10.0, 20.0, 30.0]), kl=jnp.full((b,), 4.0),
                    kl_per_dim=jnp.full((b, 2), 2.0), gamma_t=jnp.array([-5.0, 0.0, 4.0]),
                    gamma_0=jnp.full((b,), -13.3), gamma_1=jnp.full((b,), 5.0),
                    t=jnp.zeros((b,)))
  c = config_lib.base_config()
  sig = jax.nn.sigmoid
  c.collapse.diffusion_weighting = "sigmoid"
  only = float(collapse.objective(terms, 0, c)[0])
  assert only == pytest.approx(2.0 + 0.5 + float(jnp.mean(sig(terms["gamma_t"]) *
                                                          terms["diffusion"])) + 4.0, rel=1e-6)
  c.collapse.diffusion_weighting = "sigmoid_consistent"
  got = float(collapse.objective(terms, 0, c)[0])
  want = (2.0 * sig(-13.3) + 0.5 * sig(5.0)
          + float(jnp.mean(sig(terms["gamma_t"]) * terms["diffusion"])) + 4.0 * sig(5.0))
  assert got == pytest.approx(float(want), rel=1e-6)
  assert collapse.is_bound(c)[0] is False


# 9. EMA: warm-up form or the official constant
def test_ema_schedules():
  from vdmrep import train
  s = jnp.asarray(100)
  assert float(train.ema_decay(s, 0.9999, "warmup")) == pytest.approx(101 / 110)
  assert float(train.ema_decay(s, 0.9999, "constant")) == pytest.approx(0.9999)
  assert float(train.ema_decay(jnp.asarray(8990), 0.9999)) == pytest.approx(0.999, abs=1e-6)
  c = config_lib.base_config()
  c.optim.ema_schedule = "cosine"
  with pytest.raises(config_lib.ConfigError, match="config.optim.ema_schedule"):
    config_lib.validate(c)


# 10. the FD floor is eval vs train
def test_report_and_tables_use_the_eval_vs_train_fd_floor():
  import sys
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import study_common
  m = {"fd_classifier": 30.0, "fd_classifier_eval_vs_train": 4.5,
       "fd_classifier_floor_real_halves": 2.3}
  cell = dict(study_common.COLUMNS)["sample FD (floor: eval vs train)"](m)
  assert cell == "30.00 (4.50)"


# 11. learned_nnet schedule starts as the official code's
def test_learned_nnet_residual_starts_small():
  from vdmrep.models.schedules import LearnedMonotone
  p = LearnedMonotone().init(jax.random.key(0), jnp.zeros(()))["params"]
  for name in ("l2", "l3"):
    assert float(jnp.std(p[name]["kernel"])) == pytest.approx(0.01, rel=0.2), name
  t = jnp.linspace(0, 1, 5)
  g = LearnedMonotone().apply({"params": p}, t)
  np.testing.assert_allclose(g, -13.3 + 18.3 * t, atol=0.02)


# 12. K and the eval seed are reported; the eval seed moves the estimate
@pytest.mark.slow
def test_eval_seed_and_k_are_reported(tiny, tmp_path):
  c = _config()
  a = _evaluate(tiny, c, ["elbo"], tmp=tmp_path)
  c.eval.seed = 5
  b = _evaluate(tiny, c, ["elbo"], tmp=tmp_path)
  assert a["metrics"]["eval_seed"] == 0 and b["metrics"]["eval_seed"] == 5
  assert a["metrics"]["eval_num_time_samples"] == 1
  assert a["metrics"]["bpd"] != b["metrics"]["bpd"]
  assert "K = 1 Monte Carlo draws per image, eval seed 5" in report.markdown(b)
  d = report.paired_difference(a, b)  # same images: pairs; only eval noise differs
  assert abs(d["diff"]) < 5 * d["se"] + 1e-9


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist not installed")
def test_histogram_bpd_of_fashion_mnist_test_split():
  c = config_lib.base_config()
  c.data.source = "fashion_mnist"
  ds = data.load(c.data)
  got = baselines.histogram_bpd(ds.train_images, ds.eval_images, 256, k=0.5)
  assert got["num_train"] == 60000 and got["num_eval"] == 10000
  assert got["bpd"] == pytest.approx(4.5875, abs=2e-3)


# 6. RESULTS.md readings: read against the histogram baseline, no withdrawn claims standing
def _markdown_table_headers(text):
  lines = [l.strip() for l in text.splitlines()]
  return [l for l, nxt in zip(lines, lines[1:] + [""])
          if l.startswith("|") and nxt.startswith("|---")]


def test_results_readings_state_the_baseline_and_the_regime():
  with open(os.path.join(ROOT, "experiments", "RESULTS.md")) as fh:
    text = fh.read()
  readings = text.split("### Reading")[1:]
  assert readings
  for block in readings:
    block = block.split("\n## ")[0]
    assert "histogram" in block, block[:60]
  headers = _markdown_table_headers(text)
  assert headers
  for h in headers:
    if "bpd" in h:
      assert "histogram" in h, h
    if "probe" in h:
      assert ("k-NN" in h or "kNN" in h) and "I(w; label)" in h, h
  assert "undertrained regime" in text and "17 grey" in text
  assert "2.4-4.2 standard-error" not in text and "~2.7 s.e." not in text
  assert "The ELBO-optimal decoder here is the one that ignores w" not in text
