"""Frame-, class- and patient-level classification metrics (NumPy, host side).

Every function returns plain Python floats / ints / lists / dicts, so a result can go
straight into ``json.dump``. Undefined values (e.g. the recall of a class with no
samples) are ``None`` and are skipped by the macro averages, with a note saying so;
nothing here returns NaN. Formulas and references: ``docs/evaluate.md``.

Conventions shared by all functions:

* ``y_true (N,)`` integer labels in ``0..C-1``; ``probs (N, C)`` class probabilities
  (rows sum to 1); the prediction is ``argmax(probs)`` (ties -> lowest index).
* Macro averages run over the *evaluated classes*: the classes with at least one sample
  in ``y_true``. Precision of a class that is never predicted is 0 (scikit-learn's
  ``zero_division=0``).
* With two classes (or when ``positive_class`` is given) ``sensitivity`` and
  ``specificity`` are those of the positive class (default class 1), as clinical papers
  report them; otherwise they are macro averages over the evaluated classes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

__all__ = [
    "ECE_BINS",
    "aggregate_folds",
    "binary_auroc",
    "calibration_bins",
    "classification_metrics",
    "confusion_matrix",
    "roc_curve_points",
]

ECE_BINS = 15
_PROB_ATOL = 1e-2  # tolerance on "rows sum to 1" (bf16 softmax drifts by ~1e-3)


# ----------------------------------------------------------------------------- checks


def _check_labels_probs(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``y_true (N,)`` ints and ``probs (N, C)`` probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got {p.shape}")
    n, c = p.shape
    if n == 0:
        raise ValueError("probs is empty: need at least one sample")
    if c < 2:
        raise ValueError(f"need at least 2 classes (columns of probs), got {c}")
    if y.shape != (n,):
        raise ValueError(f"y_true must have shape ({n},) to match probs {p.shape}, got {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError("y_true must hold integer class indices")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= c:
        bad = y[(y < 0) | (y >= c)][0]
        raise ValueError(f"label {bad} in y_true is outside 0..{c - 1} (probs has {c} columns)")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or inf")
    if p.min() < -_PROB_ATOL or p.max() > 1 + _PROB_ATOL:
        raise ValueError("probs must lie in [0, 1]; did you pass logits? apply softmax first")
    sums = p.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > _PROB_ATOL):
        i = int(np.argmax(np.abs(sums - 1.0)))
        raise ValueError(
            f"rows of probs must sum to 1 (row {i} sums to {sums[i]:.4f}); "
            "did you pass logits or unnormalised scores? apply softmax first"
        )
    return y, p


def _safe_div(num: float, den: float) -> float | None:
    """``num / den`` as a float, or None when ``den == 0``."""
    return None if den == 0 else float(num) / float(den)


def _mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean of the non-None entries, or None when there are none."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# ------------------------------------------------------------------- building blocks


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Confusion matrix (C, C) of int counts; rows are true classes, columns predictions."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    yp = np.asarray(y_pred, dtype=np.int64).ravel()
    if y.shape != yp.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {yp.shape} differ in length")
    if y.size and (min(y.min(), yp.min()) < 0 or max(y.max(), yp.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return skm.confusion_matrix(y, yp, labels=np.arange(num_classes)).astype(np.int64)


def binary_auroc(y_binary: Any, scores: Any) -> float | None:
    """AUROC of ``scores (N,)`` for ``y_binary (N,)`` via Mann-Whitney U (ties count 1/2); None if one class."""
    y = np.asarray(y_binary).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_binary {y.shape} and scores {s.shape} differ in length")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    return float(skm.roc_auc_score(y, s))  # = Mann-Whitney U / (n_pos n_neg), ties count 1/2


def roc_curve_points(y_binary: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr (K,), tpr (K,), thresholds (K,))`` at every distinct score, from (0, 0)."""
    y = np.asarray(y_binary).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_binary {y.shape} and scores {s.shape} differ in length")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC curve needs both positive and negative samples")
    fpr, tpr, thresholds = skm.roc_curve(y, s, drop_intermediate=False)
    thresholds = thresholds.astype(np.float64)
    thresholds[0] = np.inf  # the (0, 0) point: nothing is called positive
    return fpr, tpr, thresholds


def calibration_bins(confidence: Any, correct: Any, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Equal-width confidence bins on [0, 1]: edges (n_bins+1,), count/accuracy/confidence (n_bins,), ece.

    A sample with confidence ``p`` falls in bin ``b`` when ``edges[b] < p <= edges[b+1]``
    (``p == 0`` goes to the first bin), as in Guo et al. (2017). Empty bins have
    ``accuracy``/``confidence`` None. ``ece = sum_b n_b/N * |acc_b - conf_b|``.
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct).astype(bool).ravel()
    if conf.shape != corr.shape or conf.size == 0:
        raise ValueError(f"confidence {conf.shape} and correct {corr.shape} must be equal, non-empty")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin b holds edges[b] < p <= edges[b+1]: count the inner edges strictly below p.
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(idx, minlength=n_bins)
    n_correct = np.bincount(idx, weights=corr.astype(np.float64), minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc = [None if k == 0 else float(a / k) for a, k in zip(n_correct, count)]
    mconf = [None if k == 0 else float(s / k) for s, k in zip(conf_sum, count)]
    ece = float(sum(abs(a - m) * k for a, m, k in zip(acc, mconf, count) if k) / conf.size)
    return {
        "bin_edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "correct": n_correct.astype(int).tolist(),
        "incorrect": (count - n_correct).astype(int).tolist(),
        "accuracy": acc,
        "confidence": mconf,
        "ece": ece,
    }


# ------------------------------------------------------------------------ per patient


def _majority(labels: np.ndarray, weights: np.ndarray, num_classes: int) -> int:
    """Most frequent of ``labels (n,)``; ties -> larger summed ``weights (n, C)``, then lower index."""
    counts = np.bincount(labels, minlength=num_classes)
    tied = np.flatnonzero(counts == counts.max())
    if tied.size == 1:
        return int(tied[0])
    mass = weights[:, tied].sum(axis=0)
    return int(tied[int(np.argmax(mass))])


def _patient_metrics(
    y: np.ndarray, p: np.ndarray, pred: np.ndarray, patients: Sequence[Hashable], names: list[str]
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Per-patient frame accuracy and majority votes; patient-level summary; notes."""
    pat = np.asarray([str(x) for x in patients], dtype=object)
    if pat.shape != y.shape:
        raise ValueError(f"patients must have one entry per sample ({y.size}), got {pat.shape}")
    c = p.shape[1]
    one_hot = np.eye(c)
    per_patient: dict[str, Any] = {}
    notes: list[str] = []
    vote_ok, meanprob_ok = [], []
    for key in sorted(set(pat.tolist())):
        sel = pat == key
        ys, ps, preds = y[sel], p[sel], pred[sel]
        true_label = _majority(ys, one_hot[ys], c)
        voted = _majority(preds, ps, c)
        by_mean = int(np.argmax(ps.mean(axis=0)))
        if np.unique(ys).size > 1:
            notes.append(
                f"patient {key} has frames of several classes; its label is the majority {names[true_label]}"
            )
        per_patient[key] = {
            "n": int(sel.sum()),
            "accuracy": float(np.mean(ys == preds)),
            "majority_label": true_label,
            "majority_label_name": names[true_label],
            "predicted_label": voted,
            "predicted_label_name": names[voted],
            "correct": bool(voted == true_label),
            "mean_probs": ps.mean(axis=0).tolist(),
        }
        vote_ok.append(voted == true_label)
        meanprob_ok.append(by_mean == true_label)
    summary = {
        "n_patients": len(per_patient),
        "accuracy": float(np.mean(vote_ok)),
        "accuracy_mean_prob": float(np.mean(meanprob_ok)),
    }
    return per_patient, summary, notes


# ------------------------------------------------------------------------- main entry


def classification_metrics(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str] | None = None,
    patients: Sequence[Hashable] | None = None,
    positive_class: int | None = None,
    n_bins: int = ECE_BINS,
) -> dict[str, Any]:
    """All frame/class/patient metrics of ``y_true (N,)`` vs ``probs (N, C)`` as a JSON-ready dict.

    Keys: ``n, num_classes, class_names, evaluated_classes, absent_classes, positive_class,
    accuracy, balanced_accuracy, sensitivity, specificity, precision, f1, auroc, ece,
    confusion_matrix, per_class, reliability, notes`` and, with ``patients``,
    ``per_patient, patient_accuracy, patient_accuracy_mean_prob, n_patients``.
    ``absent_classes``: names of the classes with no sample in ``y_true`` (absent from the split).
    """
    y, p = _check_labels_probs(y_true, probs)
    n, c = p.shape
    names = [str(i) for i in range(c)] if class_names is None else [str(s) for s in class_names]
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} entries but probs has {c} columns")
    if len(set(names)) != c:
        raise ValueError(f"class_names must be unique, got {names}")
    if positive_class is None and c == 2:
        positive_class = 1
    if positive_class is not None and not 0 <= int(positive_class) < c:
        raise ValueError(f"positive_class must be in 0..{c - 1}, got {positive_class}")

    pred = np.argmax(p, axis=1)
    cm = confusion_matrix(y, pred, c)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    fp = predicted - tp
    fn = support - tp
    tn = n - tp - fp - fn

    notes: list[str] = []
    evaluated = [k for k in range(c) if support[k] > 0]
    absent = [k for k in range(c) if support[k] == 0]
    if absent:
        notes.append(
            "classes absent from y_true, skipped in macro averages: " + ", ".join(names[k] for k in absent)
        )
    never_pred = [k for k in evaluated if predicted[k] == 0]
    if never_pred:
        notes.append("classes never predicted (precision 0): " + ", ".join(names[k] for k in never_pred))

    # scikit-learn's per-class values; zero_division=0 gives precision 0 for a never-predicted class
    # (the policy above) and F1 0 when P + R = 0. Recall and F1 of an absent class are None (below).
    prec_c, rec_c, f1_c, _ = skm.precision_recall_fscore_support(
        y, pred, labels=np.arange(c), average=None, zero_division=0
    )
    per_class: dict[str, Any] = {}
    for k in range(c):
        rec = None if support[k] == 0 else float(rec_c[k])
        spec = _safe_div(tn[k], tn[k] + fp[k])
        per_class[names[k]] = {
            "precision": float(prec_c[k]),
            "recall": rec,
            "sensitivity": rec,
            "specificity": spec,
            "f1": None if rec is None else float(f1_c[k]),
            "auroc": binary_auroc(y == k, p[:, k]),
            "support": int(support[k]),
        }

    def macro(key: str) -> float | None:
        """Mean of ``per_class[*][key]`` over the evaluated classes, skipping None."""
        return _mean_defined([per_class[names[k]][key] for k in evaluated])

    if positive_class is not None:
        pos = per_class[names[int(positive_class)]]
        sensitivity, specificity = pos["sensitivity"], pos["specificity"]
        if sensitivity is None or specificity is None:
            notes.append(f"positive class {names[int(positive_class)]}: sensitivity/specificity undefined")
    else:
        sensitivity, specificity = macro("sensitivity"), macro("specificity")

    if c == 2:
        auroc = per_class[names[int(positive_class)]]["auroc"]
    else:
        auroc = macro("auroc")
    if auroc is None:
        notes.append("AUROC undefined: y_true needs at least two classes")

    correct = pred == y
    reliability = calibration_bins(p.max(axis=1), correct, n_bins)
    out: dict[str, Any] = {
        "n": int(n),
        "num_classes": int(c),
        "class_names": names,
        "evaluated_classes": evaluated,
        "absent_classes": [names[k] for k in absent],
        "positive_class": None if positive_class is None else int(positive_class),
        "accuracy": float(np.mean(correct)),
        "balanced_accuracy": macro("recall"),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": macro("precision"),
        "f1": macro("f1"),
        "auroc": auroc,
        "ece": reliability["ece"],
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": per_class,
        "reliability": reliability,
    }
    if patients is not None:
        per_patient, summary, pnotes = _patient_metrics(y, p, pred, patients, names)
        notes.extend(pnotes)
        out["per_patient"] = per_patient
        out["patient_accuracy"] = summary["accuracy"]
        out["patient_accuracy_mean_prob"] = summary["accuracy_mean_prob"]
        out["n_patients"] = summary["n_patients"]
    out["notes"] = notes
    return out


# ------------------------------------------------------------------------ across folds

_META_KEYS = frozenset({"n", "num_classes", "positive_class", "n_patients"})
# Metrics that are rates or accuracies, bounded to [0, 1] (top level, or the last part of ``per_class.<c>.<m>``).
RATE_METRICS = frozenset({"accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "recall",
                          "f1", "auroc", "ece", "patient_accuracy", "patient_accuracy_mean_prob"})


def _clip_rate(name: str, lo: float, hi: float) -> tuple[float, float]:
    """``(lo, hi)`` clipped to [0, 1] when ``name`` is one of :data:`RATE_METRICS`, else unchanged."""
    if name.rsplit(".", 1)[-1] not in RATE_METRICS:
        return lo, hi
    return min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)


def _scalars(m: Mapping[str, Any]) -> dict[str, float | None]:
    """Scalar metrics of one result: top-level numbers and ``per_class.<name>.<metric>``."""
    out: dict[str, float | None] = {}
    for k, v in m.items():
        if k in _META_KEYS:
            continue
        if v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)):
            out[k] = None if v is None else float(v)
    for cname, cm in (m.get("per_class") or {}).items():
        for k, v in cm.items():
            if k != "support" and (v is None or isinstance(v, (int, float, np.number))):
                out[f"per_class.{cname}.{k}"] = None if v is None else float(v)
    return out


def aggregate_folds(results: Sequence[Mapping[str, Any]], confidence: float = 0.95,
                    clip_rates: bool = True) -> dict[str, Any]:
    """Mean, std (ddof=1) and a Student-t confidence interval of every scalar metric over folds.

    Returns ``{"n_folds", "metrics": {name: {mean, std, ci_low, ci_high, n, values}},
    "confusion_matrix_sum"}``; folds where a metric is None are left out of its
    statistics (``n`` counts the folds used). With one usable fold, std and the
    interval are None. With ``clip_rates`` the interval of a rate (:data:`RATE_METRICS`)
    is clipped to [0, 1]; pass ``clip_rates=False`` for signed values such as differences.
    The t-interval assumes independent values: right over independent repeats (training seeds),
    too narrow over the folds of one cross-validation (their training sets overlap); for the
    data's variance use ``statistics.hierarchical_bootstrap`` over patients and frames.
    """
    if len(results) == 0:
        raise ValueError("aggregate_folds needs at least one fold result")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    per_fold = [_scalars(r) for r in results]
    names: list[str] = []
    for s in per_fold:
        names.extend(k for k in s if k not in names)
    metrics: dict[str, Any] = {}
    for name in names:
        vals = [s[name] for s in per_fold if s.get(name) is not None]
        if not vals:
            metrics[name] = {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": 0, "values": []}
            continue
        arr = np.asarray(vals, dtype=np.float64)
        mean = float(arr.mean())
        if arr.size > 1:
            std = float(arr.std(ddof=1))
            half = float(stats.t.ppf(0.5 + confidence / 2, df=arr.size - 1)) * std / math.sqrt(arr.size)
            lo, hi = mean - half, mean + half
            if clip_rates:
                lo, hi = _clip_rate(name, lo, hi)
        else:
            std = lo = hi = None
        metrics[name] = {
            "mean": mean, "std": std, "ci_low": lo, "ci_high": hi, "n": int(arr.size), "values": vals
        }
    out: dict[str, Any] = {"n_folds": len(results), "confidence": confidence, "metrics": metrics}
    cms = [np.asarray(r["confusion_matrix"]) for r in results if "confusion_matrix" in r]
    if cms and all(cm.shape == cms[0].shape for cm in cms):
        out["confusion_matrix_sum"] = np.sum(cms, axis=0).astype(int).tolist()
    return out
