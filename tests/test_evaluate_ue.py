"""A model trained without the KL term (`ue`) is reported as "not a bound", true ELBO beside."""
import contextlib
import io
import json
import math
import os

import pytest

from vdmrep import train
from test_evaluate import eval_config


@pytest.mark.slow
def test_ue_objective_is_flagged_not_a_bound(tmp_path):
  c = eval_config("ue")
  c.training.num_steps, c.training.checkpoint_every, c.training.eval_every = 12, 12, 0
  c.eval.pictures, c.eval.ood_holdout_class, c.eval.probe_max_train = False, -1, 100
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.train_and_evaluate(c, str(tmp_path))
  with open(os.path.join(tmp_path, "report.json")) as fh:
    m = json.load(fh)["metrics"]
  assert m["objective_is_bound"] is False and "ue" in m["objective_not_bound_reason"]
  # the true ELBO counts the KL; the ue objective does not: their difference is the KL term,
  # up to the Monte Carlo error of two independent estimates (different draws and batches)
  assert m["kl_bpd"] > 0 and m["bpd"] == pytest.approx(
      sum(m[f"{k}_bpd"] for k in ("recon", "prior", "diffusion", "kl")), rel=1e-9)
  tol = 4 * math.hypot(m["objective_bpd_se"], m["bpd_se"])
  assert abs(m["objective_bpd"] - (m["bpd"] - m["kl_bpd"])) < tol
  assert m["objective_step"] == c.training.num_steps - 1  # the last trained step
  flag = (f"| trained objective (step {m['objective_step']}) | {m['objective_bpd']:.4g} | {m['objective_bpd_se']:.4g} | "
          f"**not a bound** ({m['objective_not_bound_reason']}); true ELBO: {m['bpd']:.4g} |")
  with open(os.path.join(tmp_path, "report.md")) as fh:
    assert flag in fh.read()
  assert "is not a bound" in out.getvalue()  # the console's summary says so too
