"""Sample quality (`vdmrep/quality.py`): Frechet distances with the eval-vs-train floor,
the Inception-style score, guided and reconstruction class match, sample pictures."""
from __future__ import annotations

import jax

from vdmrep import console, parallel
from vdmrep.evaluators.base import SAMPLES, Section

# Sample-quality numbers copied into the report's flat metrics.
SAMPLE_METRICS = ("classifier_test_accuracy", "fd_classifier", "fd_classifier_floor_real_halves",
                  "fd_classifier_eval_vs_train", "is_classifier", "is_classifier_real_train",
                  "guided_class_match", "guided_class_match_shuffled",
                  "reconstruction_class_match", "fd_inception", "fd_inception_floor_real_halves")


def run(ctx) -> Section:
  from vdmrep import quality  # the slowest evaluator: imported only when it runs
  sq = quality.sample_quality_section(ctx.model, ctx.params, ctx.ds, ctx.config, ctx.workdir,
                                      ctx.mesh, jax.random.fold_in(ctx.key, SAMPLES),
                                      writer=ctx.writer, step=ctx.step,
                                      log=lambda text: parallel.main_print(console.wrap(text)))
  return Section(metrics={k: v for k, v in sq.items() if k in SAMPLE_METRICS},
                 report={"samples": {k: v for k, v in sq.items() if k != "pictures"}},
                 pictures=dict(sq.get("pictures", {})))
