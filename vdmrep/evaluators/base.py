"""What every evaluator shares: its input (Context), its output (Section), the eval key's
fold_in tags and small helpers. Imports nothing from the evaluators, which import it."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

# fold_in tags of the eval key for each random quantity of an eval
ELBO, OBJECTIVE, MI, USEFUL, OOD, SAMPLES, FIT, PROBE_W = range(8)

# the probes' feature sets (`config.eval.probe_features`; evaluators/probes.py)
PROBE_FEATURES = ("pixels", "encoder", "random_encoder", "encoder_w")


@dataclasses.dataclass
class Context:
  """What every evaluator sees: the model and parameters, data, config and shared results."""
  model: Any
  params: Any
  ds: Any                      # data.Dataset
  config: Any
  mesh: Any
  step: int                    # optimiser steps taken by `params`
  workdir: str
  key: Any                     # the eval key (from the eval seed)
  images: np.ndarray           # uint8 [N, H, W, C] eval images (first max_examples)
  labels: Optional[np.ndarray]  # [N] or None
  full: bool
  writer: Any = None
  shared: dict = dataclasses.field(default_factory=dict)

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.images.shape[1:]))


@dataclasses.dataclass
class Section:
  """One evaluator's output.

  metrics: flat name -> number (report["metrics"], TensorBoard "eval/<name>").
  report: top-level report keys this evaluator owns (e.g. "probes": {...}).
  arrays: name -> array saved into latents.npz by a full eval.
  pictures: name -> PNG path (absolute); images: name -> RGB uint8 [H, W, 3] for TensorBoard.
  """
  metrics: dict = dataclasses.field(default_factory=dict)
  report: dict = dataclasses.field(default_factory=dict)
  arrays: dict = dataclasses.field(default_factory=dict)
  pictures: dict = dataclasses.field(default_factory=dict)
  images: dict = dataclasses.field(default_factory=dict)


def _parse(text: str) -> list:
  return [n.strip() for n in text.split(",") if n.strip()]


def eval_seed(config) -> int:
  """The seed of every random draw of an evaluation: `eval.seed`, or `config.seed` if -1."""
  return int(config.seed if config.eval.seed < 0 else config.eval.seed)


def _head(x, n):
  return x if x is None or not n else x[:n]
