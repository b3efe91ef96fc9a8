"""Probes of a frozen encoder: DINO's weighted k-NN and a logistic-regression linear probe (NumPy, scikit-learn).

Both take embeddings computed elsewhere (``(N, D)`` host arrays) and score held-out ones; nothing here
runs a model. The k-NN follows DINO's ``eval_knn.py`` (Caron et al. 2021, after Wu et al. 2018):
cosine similarity, the ``k`` nearest training embeddings vote for their label with weight
``exp(sim / T)``. The linear probe is scikit-learn's ``LogisticRegression`` on standardised features.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

#: The inverse regularisation strengths the linear probe chooses from (with patient groups).
PROBE_CS = (0.01, 0.1, 1.0, 10.0)
#: Folds of the patient-grouped split that chooses ``C``.
PROBE_FOLDS = 3


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x (N, D)`` L2-normalised in float64 (a zero row stays zero)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Class scores ``(M, C)`` (rows sum to 1) of ``test_emb (M, D)`` by weighted k-NN over ``train_emb (N, D)``.

    For each test embedding the ``min(k, N)`` training embeddings of highest cosine similarity vote
    for their label (int ``train_labels (N,)`` in ``[0, num_classes)``) with weight
    ``exp(sim / temperature)``; nothing is excluded (a test embedding equal to a training one
    counts it). DINO's scores, divided by their row sum (the argmax is DINO's prediction). The
    ``(chunk, N)`` similarities of ``chunk`` test rows at a time are all that is held, never ``M x N``.
    """
    train_emb, test_emb = np.asarray(train_emb), np.asarray(test_emb)
    labels = np.asarray(train_labels).astype(np.int64)
    if train_emb.ndim != 2 or test_emb.ndim != 2 or train_emb.shape[1] != test_emb.shape[1]:
        raise ValueError(f"knn_predict needs (N, D) and (M, D) embeddings, got {train_emb.shape}, {test_emb.shape}")
    if len(train_emb) == 0 or labels.shape != (len(train_emb),):
        raise ValueError(f"knn_predict needs >= 1 training embedding and one label each, got {train_emb.shape}, "
                         f"labels {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if k < 1 or temperature <= 0 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1 and temperature > 0, got {k}, {chunk}, {temperature}")
    tr, te = _unit(train_emb), _unit(test_emb)
    kk = min(int(k), len(tr))
    out = np.zeros((len(te), num_classes))
    for lo in range(0, len(te), chunk):
        sim = te[lo:lo + chunk] @ tr.T  # (m, N)
        top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]  # (m, k) the k most similar, unordered
        s = np.take_along_axis(sim, top, axis=1)
        # exp((s - max) / T): the same votes up to a per-row factor, which the row sum removes; no overflow.
        w = np.exp((s - s.max(axis=1, keepdims=True)) / temperature)
        rows = np.repeat(np.arange(len(top)), kk)
        np.add.at(out[lo:lo + chunk], (rows, labels[top].ravel()), w.ravel())
    return out / out.sum(axis=1, keepdims=True)


def knn_accuracy(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, test_labels: np.ndarray,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of :func:`knn_predict` on ``test_labels (M,)`` (ties: the lowest class index)."""
    probs = knn_predict(train_emb, train_labels, test_emb, num_classes, k, temperature)
    return float(np.mean(probs.argmax(1) == np.asarray(test_labels)))


def linear_probe(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, test_labels: np.ndarray,
                 train_groups: np.ndarray | None = None, c: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Logistic regression on standardised frozen ``(N, D)`` embeddings: ``{"accuracy", "balanced_accuracy", "C"}``.

    ``StandardScaler`` (fitted on the training embeddings) then ``LogisticRegression(C, lbfgs)``.
    With ``train_groups (N,)`` (patient ids, at least :data:`PROBE_FOLDS` distinct) ``C`` is chosen
    from :data:`PROBE_CS` by the mean accuracy of a patient-grouped ``GroupKFold`` over the TRAINING
    embeddings only (ties: the smaller C); without groups (or with too few) the fixed ``c`` (default
    1.0) is used. Accuracies are on ``test_emb (M, D)`` / ``test_labels (M,)``, which never influence
    the choice. Deterministic (``seed``).
    """
    x_tr, x_te = np.asarray(train_emb), np.asarray(test_emb)
    y = np.asarray(train_labels)
    if len(np.unique(y)) < 2:
        raise ValueError("linear_probe needs at least two classes among the training labels")

    def fit(x: np.ndarray, yy: np.ndarray, cc: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=cc, max_iter=2000, random_state=seed)).fit(x, yy)

    if train_groups is not None and len(np.unique(train_groups)) >= PROBE_FOLDS:
        groups = np.asarray(train_groups)
        scores = []
        for cc in PROBE_CS:
            accs = []
            for tr, va in GroupKFold(n_splits=PROBE_FOLDS).split(x_tr, y, groups):
                if len(np.unique(y[tr])) < 2:
                    continue  # a fold whose training part holds one class cannot be fitted
                accs.append(np.mean(fit(x_tr[tr], y[tr], cc).predict(x_tr[va]) == y[va]))
            scores.append(np.mean(accs) if accs else -1.0)
        c = PROBE_CS[int(np.argmax(scores))]
    pred = fit(x_tr, y, c).predict(x_te)
    t = np.asarray(test_labels)
    return {"accuracy": float(np.mean(pred == t)), "balanced_accuracy": float(balanced_accuracy_score(t, pred)),
            "C": float(c)}
