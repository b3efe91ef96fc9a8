"""Classification metrics vs scikit-learn, SciPy and hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from lclsc_jax.evaluate.metrics import (
    aggregate_folds,
    binary_auroc,
    calibration_bins,
    classification_metrics,
    roc_curve_points,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _random_case(seed: int, n: int, c: int, never_predicted: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels covering every class and probs from integer logits (so scores tie often)."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
    logits = rng.integers(0, 3, size=(n, c)).astype(np.float64)
    logits[np.arange(n), y] += rng.integers(0, 2, n)  # some signal
    if never_predicted:
        logits[:, c - 1] = -5.0
    return y, _softmax(logits)


# ------------------------------------------------------------------- hand-computed


def test_hand_computed_three_class():
    # y:    0 0 1 1 2 2 ; pred: 0 1 1 1 0 2
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.7, 0.2], [0.2, 0.5, 0.3], [0.5, 0.2, 0.3], [0.1, 0.2, 0.7]]
    )
    m = classification_metrics(y, probs, class_names=["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls 1/2, 1, 1/2 ; precisions 1/2, 2/3, 1 ; specificities 3/4, 3/4, 1
    assert m["sensitivity"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["specificity"] == pytest.approx((0.75 + 0.75 + 1) / 3)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert m["f1"] == pytest.approx(np.mean(f1))
    # class a: pos scores {.8,.3}, neg {.1,.2,.5,.1}: pairs won 4 + 3 = 7 of 8
    assert m["per_class"]["a"]["auroc"] == pytest.approx(7 / 8)
    assert m["per_class"]["b"]["support"] == 2
    assert m["positive_class"] is None


@pytest.mark.parametrize("seed", range(4))
def test_per_class_precision_recall_f1_from_counts(seed):
    """The per-class values (scikit-learn inside) against the formulas of docs/evaluate.md, by counting."""
    rng = np.random.default_rng(seed)
    c = 4
    y = rng.integers(0, c - 1, 30)  # class 3 is absent from y_true
    probs = _softmax(rng.normal(size=(30, c)) + 2 * np.eye(c)[y])
    probs[:, 0] = 0.0  # class 0 is never predicted
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs)
    for k in range(c):
        tp, fp, fn = [int(np.sum(a & b)) for a, b in ((y == k, pred == k), (y != k, pred == k), (y == k, pred != k))]
        pc = m["per_class"][str(k)]
        prec = tp / (tp + fp) if tp + fp else 0.0  # never predicted: 0
        assert pc["precision"] == pytest.approx(prec)
        if tp + fn == 0:  # absent: recall and F1 undefined
            assert k == 3 and pc["recall"] is None and pc["sensitivity"] is None and pc["f1"] is None
            continue
        rec = tp / (tp + fn)
        assert pc["recall"] == pytest.approx(rec) and pc["sensitivity"] == pc["recall"]
        assert pc["f1"] == pytest.approx(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    assert m["per_class"]["0"]["precision"] == 0.0 and m["per_class"]["0"]["f1"] == 0.0
    assert m["precision"] == pytest.approx(np.mean([m["per_class"][str(k)]["precision"] for k in range(3)]))
    assert any("never predicted" in note for note in m["notes"]) and any("absent" in note for note in m["notes"])


def test_hand_computed_binary_with_ties():
    y = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.2, 0.6, 0.6, 0.9, 0.4])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    # pred (p1 > 0.5): 0 1 1 1 0 -> TP=2 FN=1 TN=1 FP=1
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    # pairs (pos, neg): .6>.2, .6=.6 (1/2), .9>both, .4>.2, .4<.6 -> (1+.5+2+1)/6
    assert m["auroc"] == pytest.approx(4.5 / 6)
    assert m["positive_class"] == 1


def test_binary_auroc_mann_whitney_hand_case():
    assert binary_auroc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    assert binary_auroc([1, 1, 0], [0.9, 0.1, 0.5]) == pytest.approx(0.5)
    assert binary_auroc([1, 1], [0.9, 0.1]) is None


# ------------------------------------------------------------------- vs sklearn


@pytest.mark.parametrize(
    "seed,c,never_predicted", [(0, 2, False), (1, 2, True), (2, 3, False), (3, 4, True), (4, 6, False)]
)
def test_random_predictions_match_sklearn(seed, c, never_predicted):
    y, probs = _random_case(seed, 60, c, never_predicted)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs)
    labels = list(range(c))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    if c == 2:
        assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, pos_label=1))
        assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
        assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    else:
        assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
        spec = [skm.recall_score(y != k, pred != k) for k in labels]
        assert m["specificity"] == pytest.approx(np.mean(spec))
        assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    for k in labels:
        pc = m["per_class"][str(k)]
        assert pc["recall"] == pytest.approx(skm.recall_score(y == k, pred == k))
        assert pc["precision"] == pytest.approx(skm.precision_score(y == k, pred == k, zero_division=0))
        assert pc["f1"] == pytest.approx(skm.f1_score(y == k, pred == k, zero_division=0))
        assert pc["auroc"] == pytest.approx(skm.roc_auc_score(y == k, probs[:, k]))
    if never_predicted:
        assert any("never predicted" in note for note in m["notes"])
    json.dumps(m)  # plain Python types only


def test_explicit_positive_class_in_multiclass():
    y, probs = _random_case(7, 40, 3, False)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, positive_class=2)
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y == 2, pred == 2))
    assert m["specificity"] == pytest.approx(skm.recall_score(y != 2, pred != 2))
    # AUROC stays the macro one-vs-rest for > 2 classes.
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_class_absent_from_y_true_is_skipped_with_note():
    rng = np.random.default_rng(5)
    c = 4
    y = np.concatenate([np.arange(3), rng.integers(0, 3, 37)])  # class 3 never occurs
    probs = _softmax(rng.normal(size=(40, c)) + 2 * np.eye(c)[y])
    pred = probs.argmax(1)
    present = [0, 1, 2]
    m = classification_metrics(y, probs, class_names=["w", "x", "y", "z"])
    assert m["evaluated_classes"] == present
    assert any("absent" in note and "z" in note for note in m["notes"])
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, labels=present, average="macro"))
    assert m["precision"] == pytest.approx(
        skm.precision_score(y, pred, labels=present, average="macro", zero_division=0)
    )
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, labels=present, average="macro", zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    auc = np.mean([skm.roc_auc_score(y == k, probs[:, k]) for k in present])
    assert m["auroc"] == pytest.approx(auc)
    assert m["per_class"]["z"]["recall"] is None and m["per_class"]["z"]["auroc"] is None
    json.dumps(m)


def test_roc_curve_points_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    s = np.round(rng.random(50), 1)  # many ties
    fpr, tpr, thr = roc_curve_points(y, s)
    f_ref, t_ref, th_ref = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f_ref)
    np.testing.assert_allclose(tpr, t_ref)
    np.testing.assert_allclose(thr[1:], th_ref[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(binary_auroc(y, s))


# ------------------------------------------------------------------- calibration


def test_ece_hand_computed():
    # confidences .95 (correct), .95 (wrong), .55 (correct), 0.2/3 edge exactly -> bin (0.1333, 0.2]
    conf = np.array([0.95, 0.95, 0.55, 0.2])
    correct = np.array([1, 0, 1, 1])
    out = calibration_bins(conf, correct, n_bins=5)  # edges 0,.2,.4,.6,.8,1
    assert out["count"] == [1, 0, 1, 0, 2]
    assert out["accuracy"][1] is None
    # |.5-.95|*2/4 + |1-.55|*1/4 + |1-.2|*1/4
    assert out["ece"] == pytest.approx(0.45 * 0.5 + 0.45 * 0.25 + 0.8 * 0.25)


def test_ece_numpy_loop_fifteen_bins():
    y, probs = _random_case(11, 80, 3, False)
    m = classification_metrics(y, probs)
    conf, correct = probs.max(1), probs.argmax(1) == y
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    assert m["ece"] == pytest.approx(ece)
    assert sum(m["reliability"]["count"]) == 80
    assert len(m["reliability"]["bin_edges"]) == 16


# ------------------------------------------------------------------- patients


def test_per_patient_majority_vote():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    pred = np.array([1, 0, 1, 1, 1, 0, 0])  # P1: 2/3 right, vote 1 ok ; P2 tie 2-2
    probs = np.full((7, 2), 0.0)
    probs[np.arange(7), pred] = 0.6
    probs[np.arange(7), 1 - pred] = 0.4
    probs[3] = [0.1, 0.9]  # P2 tie broken by summed probs: class 1 (0.9+0.6 vs 0.6+0.6)
    pats = ["p1", "p1", "p1", "p2", "p2", "p2", "p2"]
    m = classification_metrics(y, probs, patients=pats)
    p1 = m["per_patient"]["p1"]
    assert (p1["n"], p1["majority_label"], p1["predicted_label"], p1["correct"]) == (3, 1, 1, True)
    assert p1["accuracy"] == pytest.approx(2 / 3)
    assert p1["mean_probs"] == pytest.approx([(0.4 + 0.6 + 0.4) / 3, (0.6 + 0.4 + 0.6) / 3])
    assert m["per_patient"]["p2"]["accuracy"] == pytest.approx(0.5)
    assert m["per_patient"]["p2"]["predicted_label"] == 1
    assert m["per_patient"]["p2"]["correct"] is False
    assert m["patient_accuracy"] == pytest.approx(0.5)
    assert m["n_patients"] == 2
    json.dumps(m)


# ------------------------------------------------------------------- folds


def test_aggregate_folds_matches_scipy_t_interval():
    folds = [classification_metrics(*_random_case(s, 30, 3, False)) for s in range(4)]
    agg = aggregate_folds(folds)
    acc = np.array([f["accuracy"] for f in folds])
    lo, hi = stats.t.interval(0.95, df=3, loc=acc.mean(), scale=stats.sem(acc))
    a = agg["metrics"]["accuracy"]
    assert a["mean"] == pytest.approx(acc.mean())
    assert a["std"] == pytest.approx(np.std(acc, ddof=1))
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((lo, hi))
    assert agg["metrics"]["per_class.1.f1"]["n"] == 4
    assert "n" not in agg["metrics"]
    assert agg["confusion_matrix_sum"] == np.sum([f["confusion_matrix"] for f in folds], 0).tolist()
    json.dumps(agg)


def test_aggregate_skips_undefined_and_single_fold():
    agg = aggregate_folds([{"auroc": None, "accuracy": 0.5}, {"auroc": 0.75, "accuracy": 0.7}])
    assert agg["metrics"]["auroc"]["n"] == 1 and agg["metrics"]["auroc"]["std"] is None
    assert agg["metrics"]["accuracy"]["mean"] == pytest.approx(0.6)


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "y,probs,match",
    [
        ([0, 1], [[2.0, -1.0], [0.0, 3.0]], "logits"),
        ([0, 1], [[0.9, 0.3], [0.2, 0.8]], "sum to 1"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], "outside 0..1"),
        ([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]], "shape"),
        ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], "integer"),
        ([], np.zeros((0, 2)), "empty"),
    ],
)
def test_bad_input_raises_clear_error(y, probs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(np.asarray(y), np.asarray(probs))


def test_bad_names_and_positive_class():
    with pytest.raises(ValueError, match="class_names"):
        classification_metrics([0, 1], [[1, 0], [0, 1]], class_names=["a"])
    with pytest.raises(ValueError, match="positive_class"):
        classification_metrics([0, 1], [[1, 0], [0, 1]], positive_class=2)
    with pytest.raises(ValueError, match="patients"):
        classification_metrics([0, 1], [[1, 0], [0, 1]], patients=["a"])
