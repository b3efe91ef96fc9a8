"""k-NN and linear probes of frozen embeddings against NumPy brute force and scikit-learn."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lclsc_jax.evaluate import probes


def _knn_brute(train, labels, test, c, k, t):
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = np.zeros((len(te), c))
    for i, q in enumerate(te):
        sim = tr @ q
        for j in np.argsort(-sim)[:k]:
            out[i, labels[j]] += np.exp(sim[j] / t)
    return out / out.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def emb():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 2
    y_tr, y_te = rng.integers(0, 3, 60), rng.integers(0, 3, 25)
    return (centres[y_tr] + rng.normal(size=(60, 8)), y_tr, centres[y_te] + rng.normal(size=(25, 8)), y_te)


def test_knn_matches_a_brute_force_loop_in_any_chunking(emb):
    tr, ytr, te, _ = emb
    want = _knn_brute(tr, ytr, te, 3, 7, 0.07)
    np.testing.assert_allclose(probes.knn_predict(tr, ytr, te, 3, k=7, temperature=0.07), want, rtol=1e-9)
    np.testing.assert_allclose(probes.knn_predict(tr, ytr, te, 3, k=7, temperature=0.07, chunk=4), want, rtol=1e-9)


def test_knn_with_a_huge_temperature_is_sklearns_uniform_cosine_vote(emb):
    tr, ytr, te, yte = emb
    ref = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(tr, ytr)
    probs = probes.knn_predict(tr, ytr, te, 3, k=5, temperature=1e9)
    np.testing.assert_allclose(probs, ref.predict_proba(te), atol=1e-6)
    assert probes.knn_accuracy(tr, ytr, te, yte, 3, k=5, temperature=1e9) == pytest.approx(ref.score(te, yte))


def test_knn_refuses_bad_settings(emb):
    tr, ytr, te, _ = emb
    with pytest.raises(ValueError):
        probes.knn_predict(tr[:0], ytr[:0], te, 3)
    with pytest.raises(ValueError):
        probes.knn_predict(tr, ytr, te, 3, k=0)


def test_linear_probe_is_sklearns_logistic_regression(emb):
    tr, ytr, te, yte = emb
    got = probes.linear_probe(tr, ytr, te, yte, c=0.5)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(tr, ytr)
    assert got["accuracy"] == pytest.approx(ref.score(te, yte)) and got["C"] == 0.5
    groups = np.repeat(np.arange(12), 5)
    chosen = probes.linear_probe(tr, ytr, te, yte, train_groups=groups)
    assert chosen["C"] in probes.PROBE_CS and 0.0 <= chosen["balanced_accuracy"] <= 1.0


def test_linear_probe_separates_separable_classes():
    x = np.concatenate([np.zeros((10, 2)), np.ones((10, 2)) * 5]) + np.random.default_rng(1).normal(size=(20, 2)) * 0.1
    y = np.repeat([0, 1], 10)
    assert probes.linear_probe(x, y, x, y)["accuracy"] == 1.0
