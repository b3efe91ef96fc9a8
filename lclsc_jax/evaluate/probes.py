"""Probes of a frozen encoder: DINO's weighted k-NN and a logistic-regression linear probe (NumPy, scikit-learn).

Both take embeddings computed elsewhere (``(N, D)`` host arrays) and score held-out ones; nothing here
runs a model. The k-NN follows DINO's ``eval_knn.py`` (Caron et al. 2021; Wu et al. 2018): cosine
similarity, the ``k`` nearest training embeddings vote with weight ``exp(sim / T)``.
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


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Class scores ``(M, C)`` (rows sum to 1) of ``test_emb (M, D)`` by weighted k-NN over ``train_emb (N, D)``.

    For each test embedding the ``min(k, N)`` training embeddings of highest cosine similarity vote
    for their label with weight ``exp(sim / temperature)``. Computed ``chunk`` test rows at a time.
    """
    if len(train_emb) == 0:
        raise ValueError("knn_predict needs at least one training embedding")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got {k}, {temperature}")
    tr, te = _unit(train_emb), _unit(test_emb)
    labels = np.asarray(train_labels, np.int64)
    kk = min(int(k), len(tr))
    out = np.zeros((len(te), num_classes))
    for lo in range(0, len(te), chunk):
        sim = te[lo:lo + chunk] @ tr.T  # (m, N)
        top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]  # (m, k) unordered
        w = np.exp(np.take_along_axis(sim, top, axis=1) / temperature)
        rows = np.repeat(np.arange(len(top)), kk)
        np.add.at(out[lo:lo + chunk], (rows, labels[top].ravel()), w.ravel())
    return out / out.sum(axis=1, keepdims=True)


def knn_accuracy(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, test_labels: np.ndarray,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of :func:`knn_predict` on ``test_labels (M,)``."""
    probs = knn_predict(train_emb, train_labels, test_emb, num_classes, k, temperature)
    return float(np.mean(probs.argmax(1) == np.asarray(test_labels)))


def linear_probe(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, test_labels: np.ndarray,
                 train_groups: np.ndarray | None = None, c: float = 1.0, seed: int = 0) -> dict[str, float]:
    """A logistic regression on standardised frozen embeddings: test ``{"accuracy", "balanced_accuracy", "C"}``.

    With ``train_groups (N,)`` (patient ids, at least 3 distinct) the inverse regularisation ``C`` is
    picked from :data:`PROBE_CS` by patient-grouped 3-fold CV on the training embeddings (ties: the
    smaller C); otherwise ``c`` is used. Deterministic (lbfgs, ``seed``).
    """
    y = np.asarray(train_labels)
    if len(np.unique(y)) < 2:
        raise ValueError("linear_probe needs at least two classes among the training labels")

    def fit(x, yy, cc):
        return make_pipeline(StandardScaler(), LogisticRegression(C=cc, max_iter=2000, random_state=seed)).fit(x, yy)

    if train_groups is not None and len(np.unique(train_groups)) >= 3:
        scores = []
        for cc in PROBE_CS:
            accs = []
            for tr, va in GroupKFold(n_splits=3).split(train_emb, y, np.asarray(train_groups)):
                if len(np.unique(y[tr])) < 2:
                    continue
                accs.append(np.mean(fit(train_emb[tr], y[tr], cc).predict(train_emb[va]) == y[va]))
            scores.append(np.mean(accs) if accs else -1.0)
        c = PROBE_CS[int(np.argmax(scores))]
    pred = fit(train_emb, y, c).predict(test_emb)
    t = np.asarray(test_labels)
    return {"accuracy": float(np.mean(pred == t)), "balanced_accuracy": float(balanced_accuracy_score(t, pred)),
            "C": float(c)}
