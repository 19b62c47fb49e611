"""Representation quality: linear-probe and k-NN accuracy, fit on train features, scored on eval.

Features are used as they are (no standardisation): standardising would blow the
near-constant coordinates of collapsed latent dimensions up to unit variance and let
their noise dominate a Euclidean k-NN. Raw pixels enter as x / 255 in [0, 1].
"""
from __future__ import annotations

import warnings

import numpy as np


def logistic_probe(train_x, train_y, eval_x, eval_y, *, c: float, max_iter: int) -> dict:
  """Multinomial logistic regression (scikit-learn, lbfgs, L2 with inverse strength `c`).

  Returns accuracy on the eval features (fraction in [0, 1]) and whether lbfgs converged.
  """
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  clf = LogisticRegression(C=c, max_iter=max_iter)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # reported as a field instead
    clf.fit(train_x, train_y)
  return {"acc": float(clf.score(eval_x, eval_y)),
          "converged": bool(np.all(clf.n_iter_ < max_iter))}


def knn_probe(train_x, train_y, eval_x, eval_y, *, k: int) -> dict:
  """k-nearest-neighbour (Euclidean, majority vote) accuracy on the eval features."""
  from sklearn.neighbors import KNeighborsClassifier
  clf = KNeighborsClassifier(n_neighbors=min(k, len(train_x))).fit(train_x, train_y)
  return {"acc": float(clf.score(eval_x, eval_y))}


def pixel_features(images) -> np.ndarray:
  """uint8 [N, H, W, C] -> float64 [N, H W C] in [0, 1]."""
  return np.asarray(images, np.float64).reshape(len(images), -1) / 255.0


def run_probes(features: dict, train_y, eval_y, eval_cfg) -> dict:
  """Both probes on each named feature set.

  Args:
    features: name -> (train features [N, F], eval features [M, F]).
    train_y, eval_y: int labels [N], [M].
    eval_cfg: `config.eval` (probe_c, probe_max_iter, knn_k).
  Returns:
    name -> {"logreg_acc", "logreg_converged", "knn_acc"}.
  """
  out = {}
  for name, (tr, ev) in features.items():
    lr = logistic_probe(tr, train_y, ev, eval_y, c=eval_cfg.probe_c,
                        max_iter=eval_cfg.probe_max_iter)
    out[name] = {"logreg_acc": lr["acc"], "logreg_converged": lr["converged"],
                 "knn_acc": knn_probe(tr, train_y, ev, eval_y, k=eval_cfg.knn_k)["acc"]}
  return out
