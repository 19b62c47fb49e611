"""Representation quality: linear and k-NN probes fit on train features, scored on eval,
and a lower bound on the information the features carry about the label.

  * Logistic probe: features standardised with the training split's mean and standard
    deviation (so the probe measures content, not scale: features multiplied by any
    constant give the same accuracy), then multinomial logistic regression with its
    inverse L2 strength C chosen by stratified k-fold cross-validation on the training
    split (log-loss), refit on the whole training split.
  * k-NN probe: Euclidean k-nearest-neighbour majority vote on the features as they are
    (invariant to a global scale; not standardised, since that would blow the
    near-constant coordinates of collapsed latent dimensions up to unit variance and let
    their noise dominate the distance).
  * I(features; label) in bits, estimated as H(y) - CE: H(y) is the cross-entropy of the
    eval labels under the training split's label frequencies (add-one smoothing) and
    CE the logistic probe's held-out cross-entropy, both in bits. By the variational
    bound of Barber & Agakov (2003) this is a lower bound on the information, up to
    estimation error; it can come out negative for useless features.
Raw pixels enter as x / 255 in [0, 1].
"""
from __future__ import annotations

import math
import warnings

import numpy as np


def _parse_cs(cs) -> list:
  if isinstance(cs, str):
    return [float(c) for c in cs.split(",") if c.strip()]
  return [float(c) for c in np.atleast_1d(cs)]


def label_entropy_bits(train_y, eval_y) -> float:
  """Cross-entropy (bits) of `eval_y` under the label frequencies of `train_y` (add-one)."""
  classes = np.unique(np.concatenate([train_y, eval_y]))
  counts = np.array([np.sum(train_y == c) for c in classes], np.float64) + 1.0
  logp = dict(zip(classes.tolist(), np.log2(counts / counts.sum())))
  return float(-np.mean([logp[y] for y in np.asarray(eval_y).tolist()]))


def logistic_probe(train_x, train_y, eval_x, eval_y, *, cs=(1.0,), folds: int = 3,
                   max_iter: int = 1000, seed: int = 0) -> dict:
  """Standardised multinomial logistic regression, C chosen by cross-validation on train.

  Args:
    train_x, eval_x: [N, F], [M, F] features; train_y, eval_y: int labels.
    cs: candidate inverse L2 strengths (a list or "a,b,c"); folds: CV folds.
  Returns:
    acc (eval accuracy in [0, 1]), c (the chosen C), converged (lbfgs at the final fit),
    cross_entropy_bits (held-out mean -log2 p(y|x)), label_entropy_bits, label_info_bits
    (their difference: the estimate of I(features; label), module docstring).
  """
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import GridSearchCV, StratifiedKFold
  from sklearn.preprocessing import StandardScaler
  scaler = StandardScaler().fit(np.asarray(train_x, np.float64))
  tr = scaler.transform(np.asarray(train_x, np.float64))
  ev = scaler.transform(np.asarray(eval_x, np.float64))
  cs = _parse_cs(cs)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # reported as a field instead
    if len(cs) > 1:
      min_class = int(np.min(np.unique(train_y, return_counts=True)[1]))
      cv = StratifiedKFold(n_splits=max(2, min(folds, min_class)), shuffle=True,
                           random_state=seed)
      search = GridSearchCV(LogisticRegression(max_iter=max_iter), {"C": cs}, cv=cv,
                            scoring="neg_log_loss").fit(tr, train_y)
      c = float(search.best_params_["C"])
    else:
      c = cs[0]
    clf = LogisticRegression(C=c, max_iter=max_iter).fit(tr, train_y)
  proba = clf.predict_proba(ev)
  col = {k: i for i, k in enumerate(clf.classes_.tolist())}
  p_true = np.array([proba[i, col[y]] if y in col else 0.0
                     for i, y in enumerate(np.asarray(eval_y).tolist())])
  ce = float(-np.mean(np.log2(np.clip(p_true, 1e-12, 1.0))))
  h = label_entropy_bits(np.asarray(train_y), np.asarray(eval_y))
  return {"acc": float(clf.score(ev, eval_y)), "c": c,
          "converged": bool(np.all(clf.n_iter_ < max_iter)),
          "cross_entropy_bits": ce, "label_entropy_bits": h, "label_info_bits": h - ce}


def knn_probe(train_x, train_y, eval_x, eval_y, *, k: int) -> dict:
  """k-nearest-neighbour (Euclidean, majority vote) accuracy on the eval features."""
  from sklearn.neighbors import KNeighborsClassifier
  clf = KNeighborsClassifier(n_neighbors=min(k, len(train_x))).fit(train_x, train_y)
  return {"acc": float(clf.score(eval_x, eval_y))}


def pixel_features(images) -> np.ndarray:
  """uint8 [N, H, W, C] -> float64 [N, H W C] in [0, 1]."""
  return np.asarray(images, np.float64).reshape(len(images), -1) / 255.0


def accuracy_se(acc: float, n: int) -> float:
  """Binomial standard error sqrt(acc (1 - acc) / n) of an accuracy over n eval examples."""
  return math.sqrt(max(acc * (1.0 - acc), 0.0) / n) if n > 0 else float("nan")


def run_probes(features: dict, train_y, eval_y, eval_cfg, seed: int = 0) -> dict:
  """Both probes on each named feature set.

  Args:
    features: name -> (train features [N, F], eval features [M, F]).
    train_y, eval_y: int labels [N], [M].
    eval_cfg: `config.eval` (probe_cs, probe_cv_folds, probe_max_iter, knn_k).
  Returns:
    name -> {"logreg_acc", "logreg_acc_se", "logreg_c", "logreg_converged", "knn_acc",
    "label_info_bits", "cross_entropy_bits", "label_entropy_bits"}.
  """
  out = {}
  for name, (tr, ev) in features.items():
    lr = logistic_probe(tr, train_y, ev, eval_y, cs=eval_cfg.probe_cs,
                        folds=eval_cfg.probe_cv_folds, max_iter=eval_cfg.probe_max_iter,
                        seed=seed)
    out[name] = {"logreg_acc": lr["acc"], "logreg_acc_se": accuracy_se(lr["acc"], len(ev)),
                 "logreg_c": lr["c"], "logreg_converged": lr["converged"],
                 "knn_acc": knn_probe(tr, train_y, ev, eval_y, k=eval_cfg.knn_k)["acc"],
                 "label_info_bits": lr["label_info_bits"],
                 "cross_entropy_bits": lr["cross_entropy_bits"],
                 "label_entropy_bits": lr["label_entropy_bits"]}
  return out
